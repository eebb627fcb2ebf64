"""Layer streaming: a model whose weights stay in host memory and visit the compute device a layer at a time.

The LLaVA encoder runs one forward pass per reference; its arithmetic is small, its weights (13.5 GB in fp16)
are what is big. Streaming keeps every tensor on the host (pinned when the device is CUDA and the caller allows
it, else where the loader left it: memory-mapped from the shards when no cast was needed). For one forward
(``LayerStreamer.session``):

- the *resident* part (everything outside the streamed layers: embeddings, norms, RoPE tables, projectors)
  is copied to the device at the start and dropped at the end;
- each streamed layer is copied in by a forward pre-hook just before it runs and dropped by a forward hook
  after it; on CUDA the next layer's copy is issued on a side stream while the current one computes, so at
  most two layers are on the device at a time.

The computation is the resident model's, tensor for tensor (same dtype, same modules, same kernels): only
where the weights live changes. With ``quantize`` (bitsandbytes), the ``nn.Linear`` weights of the chosen
modules stay fp16 on the host and are quantised as they arrive, as the resident quantised encoder does at load.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MomaError

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "gpu", "stream", "cpu")
QuantizeFn = Callable[[nn.Linear, torch.device], nn.Module]  # host fp16 Linear -> quantised layer on the device


def resolve_placement(
    placement: str, device: torch.device | str, needed_bytes: int | None = None, available_bytes: int | None = None
) -> str:
    """``auto`` -> ``gpu`` (resident) when ``needed_bytes`` fit in ``available_bytes``, else ``stream``.

    On a CPU compute device every choice but ``stream`` means resident on the CPU (``cpu``); MPS memory is the
    host's, so ``auto`` is resident there. Without figures ``auto`` stays resident.
    """
    if placement not in PLACEMENTS:
        raise MomaError(f"llava_placement must be one of {PLACEMENTS}, got {placement!r}.")
    device = torch.device(device)
    if placement == "cpu" or (device.type == "cpu" and placement != "stream"):
        return "cpu"
    if placement != "auto":
        return placement
    if device.type != "cuda" or needed_bytes is None or available_bytes is None:
        return "gpu"
    return "gpu" if needed_bytes <= available_bytes else "stream"


@dataclass
class _Slot:
    owner: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor


@dataclass
class _Unit:
    """The tensors of one module (minus the sub-trees other units own), kept on the host."""

    slots: list[_Slot] = field(default_factory=list)
    linears: list[tuple[nn.Module, str, nn.Linear]] = field(default_factory=list)  # to quantise on arrival
    on_device: list[torch.Tensor] | None = None
    ready: torch.cuda.Event | None = None
    installed: bool = False

    @property
    def nbytes(self) -> int:
        tensors = [slot.host for slot in self.slots] + [t for *_, linear in self.linears for t in linear.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _collect(
    module: nn.Module, skip: set[int], quantize_roots: set[int], unit: _Unit, quantizing: bool = False
) -> None:
    quantizing = quantizing or id(module) in quantize_roots
    for name, param in module._parameters.items():
        if param is not None:
            unit.slots.append(_Slot(module, name, True, param.data))
    for name, buffer in module._buffers.items():
        if buffer is not None:
            unit.slots.append(_Slot(module, name, False, buffer))
    for name, child in module._modules.items():
        if child is None or id(child) in skip:
            continue
        if quantizing and type(child) is nn.Linear:
            unit.linears.append((module, name, child))
            continue
        _collect(child, skip, quantize_roots, unit, quantizing)


class LayerStreamer:
    """Streams ``root``'s ``layers`` (in execution order) to ``device`` one at a time; the rest visits per session.

    ``pin``: copy the host tensors into page-locked memory (CUDA only: asynchronous copies). ``quantize``: a
    function building a quantised layer on the device from a host ``nn.Linear``, applied to the Linears under
    ``quantize_modules``. On the CPU the "device" copy is a real copy too (``cpu`` -> ``cpu``), which is how the
    tests exercise this code without a GPU.
    """

    def __init__(
        self,
        root: nn.Module,
        layers: Sequence[nn.Module],
        device: torch.device | str,
        *,
        pin: bool = False,
        prefetch: bool = True,
        quantize: QuantizeFn | None = None,
        quantize_modules: Sequence[nn.Module] = (),
    ) -> None:
        self.device = torch.device(device)
        self.layers = list(layers)
        self._cuda = self.device.type == "cuda"
        self.prefetch = prefetch and self._cuda
        self.quantize = quantize
        roots = {id(module) for module in quantize_modules} if quantize is not None else set()
        layer_ids = {id(layer) for layer in self.layers}
        self._resident = _Unit()
        _collect(root, layer_ids, roots, self._resident)
        self._units: list[_Unit] = []
        for layer in self.layers:
            unit = _Unit()
            _collect(layer, set(), roots, unit, quantizing=False)
            self._units.append(unit)
        if pin and self._cuda:
            self._pin()
        self._stream = torch.cuda.Stream(self.device) if self.prefetch else None
        self._active = False
        # Observed during the last session (the tests check streaming really happened):
        self.max_layers_on_device = 0
        self.layers_fetched = 0

    @property
    def host_bytes(self) -> int:
        return self._resident.nbytes + sum(unit.nbytes for unit in self._units)

    @property
    def resident_bytes(self) -> int:
        return self._resident.nbytes

    @property
    def largest_layer_bytes(self) -> int:
        return max((unit.nbytes for unit in self._units), default=0)

    def _pin(self) -> None:
        """Page-lock the host weights (faster, asynchronous copies); where the OS refuses (e.g. Windows' pinned
        memory budget), the rest stays pageable: slower copies, the same results."""
        try:
            self._pin_all()
        except RuntimeError as error:
            log.warning(
                "LLaVA streaming: could not pin the weights in RAM (%s); copying from pageable memory.",
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )

    def _pin_all(self) -> None:
        for unit in [self._resident, *self._units]:
            for slot in unit.slots:
                if not slot.host.is_pinned():
                    slot.host = slot.host.pin_memory()
                    self._put(slot, slot.host)
            for _, _, linear in unit.linears:
                for param in linear.parameters():
                    param.data = param.data.pin_memory()

    @staticmethod
    def _put(slot: _Slot, tensor: torch.Tensor) -> None:
        if slot.is_param:
            slot.owner._parameters[slot.name].data = tensor
        else:
            slot.owner._buffers[slot.name] = tensor

    # --- moving one unit

    def _fetch(self, unit: _Unit) -> None:
        """Start copying ``unit`` to the device (on the side stream when prefetching)."""
        if unit.on_device is not None:
            return
        stream = self._stream if self.prefetch else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            unit.on_device = [slot.host.to(self.device, non_blocking=self._cuda, copy=True) for slot in unit.slots]
            if stream is not None:
                unit.ready = torch.cuda.Event()
                unit.ready.record(stream)

    def _install(self, unit: _Unit) -> None:
        """Make ``unit``'s module compute with its device copy (waiting for the copy to land)."""
        if unit.installed:
            return
        self._fetch(unit)
        if unit.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(unit.ready)
            for tensor in unit.on_device:
                # Allocated on the side stream, used on this one: the allocator must not reuse the memory
                # before this stream is done with it, even once we drop our references.
                tensor.record_stream(current)
            unit.ready = None
        for slot, tensor in zip(unit.slots, unit.on_device):
            self._put(slot, tensor)
        for parent, name, linear in unit.linears:
            parent._modules[name] = self.quantize(linear, self.device)
        unit.installed = True
        self.layers_fetched += unit is not self._resident

    def _drop(self, unit: _Unit) -> None:
        for slot in unit.slots:
            self._put(slot, slot.host)
        for parent, name, linear in unit.linears:
            parent._modules[name] = linear
        unit.on_device, unit.ready, unit.installed = None, None, False

    def _on_device(self) -> int:
        return sum(unit.on_device is not None for unit in self._units)

    # --- one forward pass

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Within this block the model computes on ``device``; afterwards every tensor is back on the host."""
        if self._active:
            raise MomaError("Internal: the LLaVA layer streamer was entered twice.")
        self._active = True
        self.max_layers_on_device = self.layers_fetched = 0
        hooks = []
        try:
            self._install(self._resident)
            if self._units:
                self._fetch(self._units[0])
            for index, layer in enumerate(self.layers):
                hooks.append(layer.register_forward_pre_hook(self._pre_hook(index)))
                hooks.append(layer.register_forward_hook(self._post_hook(index)))
            yield
        finally:
            for hook in hooks:
                hook.remove()
            try:
                if self._cuda:  # nothing of ours may still be in flight when the device copies are released
                    torch.cuda.current_stream(self.device).synchronize()
                    if self._stream is not None:
                        self._stream.synchronize()
            finally:  # even after a CUDA error: the modules point at the host weights again, the next encode works
                for unit in [*self._units, self._resident]:
                    self._drop(unit)
                self._active = False

    def _pre_hook(self, index: int) -> Callable:
        def hook(*_) -> None:
            self._install(self._units[index])
            if index + 1 < len(self._units):
                self._fetch(self._units[index + 1])
            self.max_layers_on_device = max(self.max_layers_on_device, self._on_device())

        return hook

    def _post_hook(self, index: int) -> Callable:
        def hook(*_) -> None:
            self._drop(self._units[index])

        return hook


def streamed_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the first ``nn.ModuleList`` named ``layers``), in order."""
    for name, child in module.named_modules():
        if name.rpartition(".")[2] == "layers" and isinstance(child, nn.ModuleList):
            return list(child)
    raise MomaError(f"Internal: {type(module).__name__} has no 'layers' list to stream.")


# CLIP ViT-L/14-336: one encoder layer, and what stays outside the layers (patch and position embeddings, norms).
_CLIP_LAYER_PARAMS = 4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024
_CLIP_OTHER_PARAMS = 1024 * 3 * 14 * 14 + 577 * 1024 + 5 * 1024
_MOMA_HEAD_PARAMS = 2 * 1024 * 4096 + 1024 * 1024 + 3072 * 1024 + 3072 + 2 * 768  # mapping + 4-token projector


def stream_device_bytes(llava_config: dict, itemsize: int) -> int:
    """Weights on the device at the peak of a streamed encode: the resident part plus two layers of each tower.

    ``llava_config``: the LLaVA folder's config.json; ``itemsize``: bytes per weight in the compute dtype
    (quantised layers arrive in fp16 before bitsandbytes shrinks them, so 2 is their upper bound)."""
    hidden = int(llava_config["hidden_size"])
    heads = int(llava_config["num_attention_heads"])
    kv_width = hidden * int(llava_config.get("num_key_value_heads") or heads) // heads
    inter = int(llava_config["intermediate_size"])
    layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter + 2 * hidden
    resident = int(llava_config["vocab_size"]) * hidden + hidden + 1024 * hidden + hidden * hidden + 2 * hidden
    params = resident + 2 * layer + _CLIP_OTHER_PARAMS + 2 * _CLIP_LAYER_PARAMS
    return params * itemsize + _MOMA_HEAD_PARAMS * 4
