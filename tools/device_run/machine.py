"""What a lent GPU machine (the device tool's ``nvidia-h200`` kind) has and allows, as documented in the device
tool's notes (KINDS.md, README.md there, read 2026-12-04): the facts the packer and the dry-run check against.

The machine is bare: Python 3.12 with torch 2.11 (CUDA 13) and the packages below, no package registry, and it
receives only the working tree plus the carried paths. Nothing here imports torch.
"""

from __future__ import annotations

import re

PYTHON = "3.12"  # python3 there: 3.12.3 (/opt/torch/.venv/bin/python3)

# Limits of one device-tool call (README.md of the device tool, "Limits").
TREE_LIMIT_BYTES = 64 * 2**20  # working tree (tracked + untracked-not-ignored) + carried paths
CARRY_MAX_PATHS = 8
COMMAND_MAX_CHARS = 2000
COMMAND_LIMIT_S = 600  # one command's timeout_s at most
OUT_MAX_FILES = 8  # files that come back from $OUT
OUT_MAX_FILE_BYTES = 16 * 2**20
OUT_MAX_TOTAL_BYTES = 64 * 2**20
OUT_MAX_DEPTH = 2  # folders below $OUT: $OUT/a/b/file comes back, $OUT/a/b/c/file does not
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# Python distributions installed there (KINDS.md, "Python packages already there", read on a machine 2026-11-17).
MACHINE_PACKAGES = frozenset(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split()
)

# Versions seen there (KINDS.md's pip list row, 2026-11) of the packages the run leans on.
MACHINE_VERSIONS = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tokenizers": "0.23.2",
    "numpy": "2.5.2",
    "huggingface-hub": "1.33.0",
}


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def on_machine(name: str) -> bool:
    """Whether the distribution ``name`` is installed on the lent machine."""
    return normalize(name) in MACHINE_PACKAGES
