"""MoMA's adapter file ``attn_adapters_projectors.th`` (spec 4.4): safe loading, strict validation, safetensors.

The upstream file is a ``torch.save`` pickle holding three state dicts::

    {"projectors":            {"proj.weight": [3072,1024], "proj.bias": [3072], "norm.weight": [768], "norm.bias": [768]},
     "self_cross_attentions": {"{i}.to_k_ip.weight": [C, C or 768], "{i}.to_v_ip.weight": ..., "{i}.scale_learnable": [1] (even i)},
     "llm_mapping":           {"mapping.gate_proj.weight": [1024,4096], "mapping.up_proj.weight": [1024,4096],
                               "mapping.down_proj.weight": [1024,1024]}}

Upstream loads two of the three groups non-strictly, so a wrongly named key silently loads as
nothing (and a missing ``scale_learnable`` switches the object path off). Here every key and shape is
checked and the file is read without running code (``torch.load(weights_only=True)`` or safetensors).

The safetensors equivalent stores the same tensors flat as ``"<group>.<inner key>"``, e.g.
``projectors.proj.weight``, ``self_cross_attentions.0.to_k_ip.weight``, ``llm_mapping.mapping.gate_proj.weight``.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import unpickling_refusal
from .errors import MomaError
from .limits import check_tensor
from .sd15 import CHANNELS_BY_INDEX, CROSS_ATTENTION_DIM, NUM_MOMA_TOKENS

LLAVA_EMBED_DIM = 1024  # width of llava_emb (the SwiGLU mapping's output, the projector's input)
LLM_HIDDEN = 4096  # LLaVA-7B hidden size (the mapping's input)
GROUPS = ("projectors", "self_cross_attentions", "llm_mapping")
MAPPING_PREFIX = "mapping."  # upstream loads llm_mapping into the whole wrapper, so keys carry the attribute name
SAFETENSORS_FORMAT = "moma-adapter"
WHERE_TO_GET = (
    "Download attn_adapters_projectors.th from the Hugging Face repo KunpengSong/MoMA_llava_7b "
    "into ComfyUI/models/moma/."
)
_MAX_NAMES = 12  # keys listed per problem in an error message


def expected_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Every key of the adapter file with its shape, per group (spec 4.4; C from ``sd15.CHANNELS_BY_INDEX``)."""
    projectors = {
        "proj.weight": (NUM_MOMA_TOKENS * CROSS_ATTENTION_DIM, LLAVA_EMBED_DIM),
        "proj.bias": (NUM_MOMA_TOKENS * CROSS_ATTENTION_DIM,),
        "norm.weight": (CROSS_ATTENTION_DIM,),
        "norm.bias": (CROSS_ATTENTION_DIM,),
    }
    attentions: dict[str, tuple[int, ...]] = {}
    for index in sorted(CHANNELS_BY_INDEX):
        channels = CHANNELS_BY_INDEX[index]
        is_self = index % 2 == 0  # even = attn1 (self, C->C), odd = attn2 (cross, 768->C)
        in_features = channels if is_self else CROSS_ATTENTION_DIM
        attentions[f"{index}.to_k_ip.weight"] = (channels, in_features)
        attentions[f"{index}.to_v_ip.weight"] = (channels, in_features)
        if is_self:
            attentions[f"{index}.scale_learnable"] = (1,)
    mapping = {
        MAPPING_PREFIX + "gate_proj.weight": (LLAVA_EMBED_DIM, LLM_HIDDEN),
        MAPPING_PREFIX + "up_proj.weight": (LLAVA_EMBED_DIM, LLM_HIDDEN),
        MAPPING_PREFIX + "down_proj.weight": (LLAVA_EMBED_DIM, LLAVA_EMBED_DIM),
    }
    return {"projectors": projectors, "self_cross_attentions": attentions, "llm_mapping": mapping}


@dataclass
class MomaAdapterWeights:
    """The validated adapter tensors, as stored in the file (dtype unchanged, on CPU).

    ``projector``: ImageProjModel keys ``proj.weight/bias``, ``norm.weight/bias``.
    ``to_k_ip`` / ``to_v_ip``: adapter index 0..31 -> nn.Linear weight [C_out, C_in] (even = attn1, odd = attn2).
    ``scale_learnable``: even index -> [1] tensor (the learned per-layer gain of the object path).
    ``mapping``: SwiGLU head keys without the ``mapping.`` prefix: ``gate_proj.weight``, ``up_proj.weight``,
    ``down_proj.weight``.
    """

    projector: dict[str, torch.Tensor]
    to_k_ip: dict[int, torch.Tensor]
    to_v_ip: dict[int, torch.Tensor]
    scale_learnable: dict[int, torch.Tensor]
    mapping: dict[str, torch.Tensor]
    source: str = ""

    def grouped_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The upstream layout: ``{"projectors": ..., "self_cross_attentions": ..., "llm_mapping": ...}``."""
        attentions: dict[str, torch.Tensor] = {}
        for index in sorted(self.to_k_ip):
            attentions[f"{index}.to_k_ip.weight"] = self.to_k_ip[index]
            attentions[f"{index}.to_v_ip.weight"] = self.to_v_ip[index]
            if index in self.scale_learnable:
                attentions[f"{index}.scale_learnable"] = self.scale_learnable[index]
        return {
            "projectors": dict(self.projector),
            "self_cross_attentions": attentions,
            "llm_mapping": {MAPPING_PREFIX + key: value for key, value in self.mapping.items()},
        }

    def flat_state_dict(self) -> dict[str, torch.Tensor]:
        """The safetensors layout: ``"<group>.<inner key>" -> tensor``."""
        return {
            f"{group}.{key}": value
            for group, inner in self.grouped_state_dicts().items()
            for key, value in inner.items()
        }


def load_adapter(path: str | Path) -> MomaAdapterWeights:
    """Read and strictly validate ``attn_adapters_projectors.th`` or its ``.safetensors`` equivalent.

    Raises ``MomaError`` naming the file and every missing, unexpected or mis-shaped key; a pickle that
    would run code is refused before anything runs.
    """
    path = Path(path)
    if not path.is_file():
        raise MomaError(f"MoMA adapter file not found: {path}. {WHERE_TO_GET}")
    if path.suffix.lower() == ".safetensors":
        groups = _read_safetensors(path)
    else:
        groups = _read_pickle(path)
    return _validate(groups, path)


def adapter_fingerprint(weights: MomaAdapterWeights) -> str:
    """sha256 (hex) of the adapter's tensors (keys, dtypes, shapes and values), the same for the .th file and its
    .safetensors conversion; computed once per weights object."""
    cached = getattr(weights, "_fingerprint", None)
    if cached:
        return cached
    import hashlib

    digest = hashlib.sha256()
    for key, tensor in sorted(weights.flat_state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{key}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    weights._fingerprint = digest.hexdigest()
    return weights._fingerprint


def save_adapter_safetensors(weights: MomaAdapterWeights, destination: str | Path) -> Path:
    """Write ``weights`` as a flat ``.safetensors`` file that ``load_adapter`` reads back identically."""
    from safetensors.torch import save_file

    destination = Path(destination)
    tensors = {key: value.detach().contiguous().cpu() for key, value in weights.flat_state_dict().items()}
    save_file(tensors, str(destination), metadata={"format": SAFETENSORS_FORMAT})
    return destination


def convert_adapter_to_safetensors(source: str | Path, destination: str | Path | None = None) -> Path:
    """Convert the upstream pickle to safetensors (validated on the way); default name: same stem, ``.safetensors``."""
    source = Path(source)
    weights = load_adapter(source)
    if destination is None:
        destination = source.with_suffix(".safetensors")
    return save_adapter_safetensors(weights, destination)


def _read_pickle(path: Path) -> Any:
    is_zip = zipfile.is_zipfile(path)
    try:
        # mmap only works for the zip container torch.save writes since torch 1.6.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        runs_code, detail = unpickling_refusal(error)
        if runs_code:
            raise MomaError(
                f"Refused to load {path}: it is a pickle that contains something other than plain tensors and "
                f"containers, so loading it could run code (torch.load weights_only check: {detail}). "
                f"Use the original file or a .safetensors conversion. {WHERE_TO_GET}"
            ) from None
        raise MomaError(
            f"Could not read {path} as a PyTorch file ({detail}). The file is probably truncated or not a MoMA "
            f"adapter; download it again. {WHERE_TO_GET}"
        ) from None
    except Exception as error:  # the unpickler raises many types on garbage (IndexError, KeyError, struct.error...)
        raise MomaError(
            f"Could not read {path} as a PyTorch file ({type(error).__name__}: {_first_line(error)}). "
            f"The file is probably truncated or not a MoMA adapter; download it again. {WHERE_TO_GET}"
        ) from None


def _read_safetensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                group, _, inner = key.partition(".")
                if not inner:
                    raise MomaError(
                        f"{path}: key {key!r} is not '<group>.<key>' (groups: {', '.join(GROUPS)}); this is not a "
                        f"MoMA adapter .safetensors. {WHERE_TO_GET}"
                    )
                groups.setdefault(group, {})[inner] = handle.get_tensor(key)
    except MomaError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError / OSError on bad headers or short files
        raise MomaError(
            f"Could not read {path} as safetensors ({type(error).__name__}: {_first_line(error)}). The file is "
            f"probably truncated or not a MoMA adapter; convert it again or download it again. {WHERE_TO_GET}"
        ) from None
    return groups


def _validate(groups: Any, path: Path) -> MomaAdapterWeights:
    if not isinstance(groups, Mapping):
        raise MomaError(
            f"{path} holds a {type(groups).__name__}, not the dict of 3 groups of a MoMA adapter. {WHERE_TO_GET}"
        )
    keys = set(groups)
    if keys & {"image_proj", "ip_adapter"}:
        raise MomaError(
            f"{path} is an IP-Adapter file (groups {sorted(map(str, keys))}), not MoMA's attn_adapters_projectors.th "
            f"(groups {', '.join(GROUPS)}). Pick the MoMA adapter in the loader. {WHERE_TO_GET}"
        )
    missing_groups = [group for group in GROUPS if group not in keys]
    extra_groups = sorted(str(key) for key in keys if key not in GROUPS)
    if missing_groups or extra_groups:
        raise MomaError(
            f"{path} is not a MoMA adapter: missing groups {missing_groups}, unexpected groups "
            f"{_names(extra_groups)} (expected exactly {', '.join(GROUPS)}). {WHERE_TO_GET}"
        )

    problems: list[str] = []
    checked: dict[str, dict[str, torch.Tensor]] = {}
    for group, shapes in expected_shapes().items():
        inner = groups[group]
        if not isinstance(inner, Mapping):
            problems.append(f"group '{group}' is a {type(inner).__name__}, not a state dict")
            continue
        missing = [key for key in shapes if key not in inner]
        unexpected = [str(key) for key in inner if key not in shapes]
        wrong_shape = [
            f"{key} {tuple(inner[key].shape)} (expected {shapes[key]})"
            for key in shapes
            if key in inner and isinstance(inner[key], torch.Tensor) and tuple(inner[key].shape) != shapes[key]
        ]
        not_tensors = [str(key) for key in shapes if key in inner and not isinstance(inner[key], torch.Tensor)]
        not_float = [
            f"{key} ({inner[key].dtype})"
            for key in shapes
            if key in inner and isinstance(inner[key], torch.Tensor) and not inner[key].is_floating_point()
        ]
        for label, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong_shape),
            ("not tensors", not_tensors),
            ("not floating point", not_float),
        ):
            if names:
                problems.append(f"'{group}' {label}: {_names(names)}")
        checked[group] = dict(inner)
    if problems:
        raise MomaError(
            f"{path} does not match MoMA's adapter layout (spec: 4 projector + 80 attention + 3 mapping tensors "
            f"for SD1.5): " + "; ".join(problems) + f". Upstream would silently ignore such keys; use the original "
            f"file. {WHERE_TO_GET}"
        )

    for group, inner in checked.items():  # one pass over the values: NaN, infinities or absurd magnitudes
        for key, tensor in inner.items():
            check_tensor(tensor, str(path), f"{group}.{key}", f"Use the original file. {WHERE_TO_GET}")
    attentions = checked["self_cross_attentions"]
    indices = sorted(CHANNELS_BY_INDEX)
    return MomaAdapterWeights(
        projector=dict(checked["projectors"]),
        to_k_ip={index: attentions[f"{index}.to_k_ip.weight"] for index in indices},
        to_v_ip={index: attentions[f"{index}.to_v_ip.weight"] for index in indices},
        scale_learnable={index: attentions[f"{index}.scale_learnable"] for index in indices if index % 2 == 0},
        mapping={key[len(MAPPING_PREFIX) :]: value for key, value in checked["llm_mapping"].items()},
        source=str(path),
    )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return f"[{shown}{', ...' if len(names) > _MAX_NAMES else ''}] ({len(names)})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
