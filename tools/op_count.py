"""Counting the aten operations (and the host reads among them) that run inside ComfyUI's model calls.

A ``TorchDispatchMode`` sees every aten op torch dispatches, views included; on a GPU each op that is not a
view is (at least) one kernel launch, which is what bounds SD1.5 sampling on fast GPUs. Host reads
(``aten._local_scalar_dense`` behind ``.item()``/``float()``/``bool()``, ``aten.equal``, ``aten.nonzero``, ...)
are host-device syncs on CUDA. Used by the op-count test and by ``benchmarks/sampling.py``.

    with count_model_calls() as calls:
        comfy.sample.sample_custom(...)
    calls.per_call      # one Counter per BaseModel.apply_model call (a UNet call)
    calls.per_eval      # one Counter per comfy.samplers.calc_cond_batch (a model evaluation: cond + uncond)
    calls.total         # everything counted while the context was open
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose result the host has to wait for (on CUDA: a sync with everything queued before them)
HOST_READS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "allclose",
        "nonzero",
        "nonzero_static",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "argwhere",
        "repeat_interleave_tensor",
        "device_to_host_copy",
    }
)


def host_reads(counts: Counter) -> int:
    """How many of the counted ops read a device value on the host."""
    return sum(n for name, n in counts.items() if name in HOST_READS)


class AtenCounter(TorchDispatchMode):
    """Counts every aten op into each open scope (a stack of Counters)."""

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[Counter] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.overloadpacket is torch.ops.aten.repeat_interleave and func._overloadname == "Tensor":
            name = "repeat_interleave_tensor"  # repeats from a tensor: output size read on the host
        for scope in self.scopes:
            scope[name] += 1
        if name == "_to_copy" and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            device = (kwargs or {}).get("device")
            if device is not None and torch.device(device).type == "cpu":
                for scope in self.scopes:
                    scope["device_to_host_copy"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def scope(self, into: list[Counter]) -> Iterator[Counter]:
        counts: Counter = Counter()
        self.scopes.append(counts)
        try:
            yield counts
        finally:
            del self.scopes[next(i for i, c in enumerate(self.scopes) if c is counts)]
            into.append(counts)


@dataclass
class ModelCallCounts:
    per_call: list[Counter] = field(default_factory=list)
    per_eval: list[Counter] = field(default_factory=list)
    total: Counter = field(default_factory=Counter)

    @staticmethod
    def ops(counts: Counter) -> int:
        return sum(n for name, n in counts.items() if name != "device_to_host_copy")


@contextlib.contextmanager
def count_model_calls() -> Iterator[ModelCallCounts]:
    """Count aten ops per UNet call (``comfy.model_base.BaseModel.apply_model``) and per model evaluation
    (``comfy.samplers.calc_cond_batch``, which also runs the CALC_COND_BATCH wrappers) while open."""
    import comfy.model_base
    import comfy.samplers

    result = ModelCallCounts()
    counter = AtenCounter()
    original_apply = comfy.model_base.BaseModel.apply_model
    original_calc = comfy.samplers.calc_cond_batch

    @functools.wraps(original_apply)
    def apply_model(self, *args, **kwargs):
        with counter.scope(result.per_call):
            return original_apply(self, *args, **kwargs)

    @functools.wraps(original_calc)
    def calc_cond_batch(*args, **kwargs):
        with counter.scope(result.per_eval):
            return original_calc(*args, **kwargs)

    comfy.model_base.BaseModel.apply_model = apply_model
    comfy.samplers.calc_cond_batch = calc_cond_batch
    counter.scopes.append(result.total)
    try:
        with counter:
            yield result
    finally:
        comfy.model_base.BaseModel.apply_model = original_apply
        comfy.samplers.calc_cond_batch = original_calc
