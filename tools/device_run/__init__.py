"""The GPU checks as one prepared call of the device tool on a lent, bare GPU machine (docs/gpu.md).

- ``machine.py``: what that machine has (Python 3.12, torch 2.11 CUDA 13, its package list) and the tool's limits;
- ``pack.py``: builds the carried folder ``.gpu-pack/`` here (a ComfyUI tree cut to what in-process execution of
  an SD1.5 graph needs, and wheels of the few packages the machine lacks) and accounts the call's size;
- ``runner.py``: runs steps one after the other, each under its own time limit (a step that overruns is cut off
  and recorded, the next still runs), and writes one JSON summary, the logs and a tarball under ``$OUT``;
- ``plan.py``: the steps (CUDA exactness tests, sampling and LLaVA benchmarks) and what each result is held to;
- ``fixtures.py``: writes the tests' real-format model fixtures (there: not carried);
- ``dryrun.py``: on this CPU machine, checks the packing and runs the same runner, from the carried files and a
  Python environment holding only the machine's packages, on CPU-sized steps;
- ``cli.py``: ``python3 -m device_run`` (``scripts/gpu_check.sh`` calls it).

Standard library only at import time: the runner starts before the carried wheels are installed.
"""
