"""MoMA's multimodal context encoder (spec 2), built from the original published LLaVA folder.

What is computed, for one reference picture and one (subject, prompt):

1. Prompt ``USER: <image>\\n A photo of a {subject}. Describe a new image of the same {subject} in: {prompt}. ASSISTANT: *``
   tokenised as LLaVA's ``tokenizer_image_token``: the text is split at ``<image>``, each chunk is encoded by the
   folder's SentencePiece model as the slow LlamaTokenizer does (BOS + pieces, dummy-prefix space included), the
   BOS is kept only at the very start and id -200 marks the picture between the chunks.
2. CLIP ViT-L/14-336: ``hidden_states[-2]`` (penultimate layer, before post_layernorm) without CLS -> [1, 576, 1024]
   -> ``mm_projector`` (Linear 1024->4096, exact GELU, Linear 4096->4096) -> [1, 576, 4096].
3. ``embed_tokens`` of the text ids with the 576 picture rows spliced in at the -200 position -> the bare
   ``LlamaModel`` (no LM head) with positions 0..L-1 and an all-ones mask -> final-RMSNorm hidden states.
4. The SwiGLU ``mapping`` (adapter file) on every position, then the last position ("*") -> ``llava_emb`` [1, 1024].

The folder is read with transformers' own ``LlamaModel`` and ``CLIPVisionModel`` classes (no LLaVA package, no
remote code). Keys of the original checkpoint: ``model.embed_tokens``, ``model.layers.*``, ``model.norm``,
``model.mm_projector.0/2``; ``lm_head`` and any vision-tower keys in the shards are ignored, as the reference
ignores them (it reloads the tower from ``openai/clip-vit-large-patch14-336``). Weights are loaded shard by shard
into a model whose parameters start on the meta device, so peak memory is the model plus one tensor.

Precision: ``fp32`` computes in float32 throughout. ``bf16`` reproduces the reference's numerics: its weights went
through float16 first (``from_pretrained(torch_dtype=float16)`` then ``.to(bfloat16)``), its pixels and picture
features are cast ``.half()``, and everything runs under ``autocast(bfloat16)``. ``fp16`` is the same in float16.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import MomaError
from .projection import ImageProjModel, SwiGLUMapping, build_mapping, build_projector
from .weights import LLAVA_EMBED_DIM, LLM_HIDDEN, MomaAdapterWeights

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (done, total)
InterruptFn = Callable[[], None]  # raises to stop

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for the picture features
PROMPT_TEMPLATE = (
    "USER: <image>\n A photo of a {subject}. Describe a new image of the same {subject} in: {prompt}. ASSISTANT: *"
)
SD_PREFIX = "photo of a {subject}"
RESERVED_TEXT = (IMAGE_TOKEN, "<s>", "</s>", "<unk>")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
QUANTIZATIONS = ("none", "8bit", "4bit")
MM_HIDDEN = 1024  # CLIP ViT-L width, the mm_projector's input
VISION_SELECT_LAYER = -2
LLAVA_WHERE_TO_GET = (
    "Download the whole folder of the Hugging Face repo KunpengSong/MoMA_llava_7b (config.json, "
    "pytorch_model-0000x-of-00002.bin + pytorch_model.bin.index.json, tokenizer.model) into ComfyUI/models/LLM/."
)
CLIP_WHERE_TO_GET = (
    "Download openai/clip-vit-large-patch14-336 from Hugging Face (config.json, model.safetensors, "
    "preprocessor_config.json) into a folder under ComfyUI/models/clip_vision/."
)
_IGNORED_KEYS = re.compile(r"^(lm_head\.|model\.vision_tower\.|.*rotary_emb\.inv_freq$)")


# --------------------------------------------------------------------------------------------- prompts


def _check_text(subject: str, prompt: str) -> None:
    if not subject.strip():
        raise MomaError("subject is empty: give the object's class word, e.g. 'car' or 'teddy bear'.")
    for name, text in (("subject", subject), ("prompt", prompt)):
        for reserved in RESERVED_TEXT:
            if reserved in text:
                raise MomaError(
                    f"The {name} contains {reserved!r}, which LLaVA's tokenizer treats as a control token; "
                    f"remove it from the {name}."
                )


def _strip_sd_prefix(subject: str, prompt: str) -> str | None:
    prefix = SD_PREFIX.format(subject=subject)
    if not prompt.lower().startswith(prefix.lower()):
        return None
    rest = prompt[len(prefix):].lstrip()
    if rest.startswith("."):
        rest = rest[1:].lstrip()
    return rest


def sd_prompt(subject: str, prompt: str) -> str:
    """The SD text prompt: ``"photo of a {subject}. {prompt}"`` (the reference's), unless ``prompt`` already
    starts with ``"photo of a {subject}"`` (case-insensitive), in which case it is used unchanged."""
    if _strip_sd_prefix(subject, prompt) is not None:
        return prompt
    return f"photo of a {subject}. {prompt}"


def llava_user_prompt(subject: str, prompt: str) -> str:
    """The ``{prompt}`` part of the LLaVA template: ``prompt`` with a leading ``"photo of a {subject}"`` and the
    period after it removed (so a prompt written as the full SD prompt gives the reference's LLaVA input)."""
    stripped = _strip_sd_prefix(subject, prompt)
    return prompt if stripped is None else stripped


def llava_prompt(subject: str, prompt: str) -> str:
    """The whole LLaVA input text (no system prompt; the user prompt verbatim, so a final '.' gives '..')."""
    _check_text(subject, prompt)
    return PROMPT_TEMPLATE.format(subject=subject, prompt=llava_user_prompt(subject, prompt))


# ------------------------------------------------------------------------------------------- tokenizer


class LlavaTokenizer:
    """The folder's ``tokenizer.model`` with the slow LlamaTokenizer's semantics on plain text:
    ``[BOS] + sentencepiece.encode(text)`` (the model's dummy-prefix space included)."""

    def __init__(self, model_file: str | Path, add_bos: bool = True) -> None:
        import sentencepiece

        model_file = Path(model_file)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as error:
            raise MomaError(f"Could not read the SentencePiece model {model_file}: {error}. {LLAVA_WHERE_TO_GET}") from None
        self.add_bos = add_bos
        self.bos_id = self.sp.bos_id()
        if add_bos and self.bos_id < 0:
            raise MomaError(f"{model_file} defines no BOS token; LLaVA's tokenizer needs one. {LLAVA_WHERE_TO_GET}")

    @classmethod
    def from_folder(cls, folder: str | Path) -> LlavaTokenizer:
        """``tokenizer.model`` (+ ``add_bos_token`` from tokenizer_config.json, default true) of a LLaVA folder."""
        folder = Path(folder)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise MomaError(f"No tokenizer.model in {folder}. {LLAVA_WHERE_TO_GET}")
        add_bos = True
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            add_bos = bool(_read_json(config_file).get("add_bos_token", True))
        return cls(model_file, add_bos=add_bos)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """One chunk as ``tokenizer(text).input_ids``: BOS (if enabled) then the pieces."""
        ids = list(self.sp.encode(text))
        return [self.bos_id] + ids if self.add_bos else ids

    def image_prompt_ids(self, text: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: chunks split at ``<image>``, BOS only at the start, -200 between."""
        chunks = [self.encode(chunk) for chunk in text.split(IMAGE_TOKEN)]
        starts_with_bos = bool(chunks[0]) and chunks[0][0] == self.bos_id
        ids = [self.bos_id] if starts_with_bos else []
        for position, chunk in enumerate(chunks):
            if position:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[1:] if starts_with_bos else chunk)
        return ids

    def prompt_ids(self, subject: str, prompt: str) -> list[int]:
        """Token ids of MoMA's LLaVA prompt for (subject, prompt), with the -200 picture placeholder."""
        return self.image_prompt_ids(llava_prompt(subject, prompt))


# ------------------------------------------------------------------------------------ precision, meta


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on CUDA with bf16 support (the reference's dtype), else fp16 on CUDA/MPS, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise MomaError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "auto":
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def reference_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast like the reference: to bf16 via fp16 (it loaded fp16 and recast the model to bf16)."""
    if dtype == torch.bfloat16 and tensor.dtype == torch.float32:
        tensor = tensor.to(torch.float16)
    return tensor.to(dtype)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory) but real buffers (e.g. RoPE's inv_freq).

    Patches ``nn.Module.register_parameter`` for the duration (as accelerate's ``init_empty_weights`` does), so
    it must not overlap module construction in another thread; ComfyUI runs one prompt at a time.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _set_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _meta_parameters(root: nn.Module) -> list[str]:
    return [name for name, param in root.named_parameters() if param.is_meta]


# ------------------------------------------------------------------------------------------ file access


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise MomaError(f"Could not read {path} as JSON ({error}).") from None
    if not isinstance(data, dict):
        raise MomaError(f"{path} is not a JSON object.")
    return data


def _weight_files(folder: Path, where_to_get: str) -> list[Path]:
    """The weight files of a Hugging Face folder: safetensors (sharded or single) preferred, then .bin."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_file = folder / index_name
        if index_file.is_file():
            weight_map = _read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MomaError(f"{index_file} has no weight_map. {where_to_get}")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise MomaError(f"{folder} is incomplete: {index_name} lists {missing}, which are missing. {where_to_get}")
            return files
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise MomaError(f"No model weights (model*.safetensors or pytorch_model*.bin) in {folder}. {where_to_get}")


def _iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weight file, read without running code; one tensor at a time for safetensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
            return
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except MomaError:
        raise
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError):
            raise MomaError(
                f"Refused to load {path}: the pickle holds more than tensors, so loading it could run code "
                f"({str(error).strip().splitlines()[0] if str(error).strip() else 'weights_only check'})."
            ) from None
        raise MomaError(f"Could not read {path} ({type(error).__name__}: {error}); the file is probably truncated.") from None
    if not isinstance(state, dict):
        raise MomaError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    for key in list(state):
        yield key, state.pop(key)
    del state


# -------------------------------------------------------------------------------------------- config


@dataclass
class LlavaFolder:
    """A LLaVA-1.5 folder in the original format, checked: its Llama config and weight files."""

    path: Path
    config: dict
    weight_files: list[Path]

    @classmethod
    def open(cls, folder: str | Path) -> LlavaFolder:
        folder = Path(folder)
        config_file = folder / "config.json"
        if not folder.is_dir() or not config_file.is_file():
            raise MomaError(f"{folder} is not a LLaVA folder (no config.json). {LLAVA_WHERE_TO_GET}")
        config = _read_json(config_file)
        _check_llava_config(config, config_file)
        return cls(path=folder, config=config, weight_files=_weight_files(folder, LLAVA_WHERE_TO_GET))

    def llama_config(self):
        """transformers ``LlamaConfig`` for the language model (sdpa attention)."""
        from transformers import LlamaConfig

        cfg = self.config
        heads = int(cfg["num_attention_heads"])
        kwargs = dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            hidden_act=cfg.get("hidden_act", "silu"),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            pad_token_id=cfg.get("pad_token_id"),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=cfg.get("eos_token_id", 2),
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        if cfg.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = cfg["rope_scaling"]
        return LlamaConfig(**kwargs)

    @property
    def max_length(self) -> int | None:
        value = self.config.get("tokenizer_model_max_length")
        return int(value) if value else None


def _check_llava_config(cfg: dict, config_file: Path) -> None:
    model_type = cfg.get("model_type")
    if "text_config" in cfg or "vision_config" in cfg:
        raise MomaError(
            f"{config_file} is a transformers 'llava-hf' conversion (LlavaForConditionalGeneration), not the original "
            f"LLaVA format MoMA ships. {LLAVA_WHERE_TO_GET}"
        )
    if model_type not in ("llava", "llava_llama"):
        raise MomaError(
            f"{config_file} has model_type {model_type!r}; MoMA's context encoder is a LLaVA-1.5 folder "
            f"(model_type 'llava'). {LLAVA_WHERE_TO_GET}"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if key not in cfg]
    if missing:
        raise MomaError(f"{config_file} lacks {missing}. {LLAVA_WHERE_TO_GET}")
    expected = {
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": VISION_SELECT_LAYER,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": MM_HIDDEN,
        "hidden_size": LLM_HIDDEN,
    }
    defaults = {"mm_vision_select_feature": "patch"}  # LLaVA's own default when the key is absent
    wrong = [f"{key}={cfg.get(key)!r} (MoMA needs {value!r})" for key, value in expected.items()
             if cfg.get(key, defaults.get(key)) != value]
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_use_im_patch_token"):
        wrong.append("mm_use_im_start_end/mm_use_im_patch_token are set (MoMA's prompt uses neither)")
    if wrong:
        raise MomaError(f"{config_file} is not the LLaVA-1.5-7B layout MoMA was trained with: {'; '.join(wrong)}. "
                        f"{LLAVA_WHERE_TO_GET}")


# --------------------------------------------------------------------------------------- CLIP vision


_VISION_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def _vision_state(items: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The vision transformer's tensors, keyed relative to it: files name them ``vision_model.*`` (full CLIP, or
    CLIPVisionModel saved by transformers 4.x) or bare ``embeddings.*`` / ``encoder.*`` (saved by 5.x)."""
    prefixed: dict[str, torch.Tensor] = {}
    bare: dict[str, torch.Tensor] = {}
    for key, tensor in items:
        if key.startswith("vision_model."):
            prefixed[key[len("vision_model."):]] = tensor
        elif key.startswith(_VISION_PARTS):
            bare[key] = tensor
    return prefixed or bare


def _clip_vision_config_from_keys(state: dict[str, torch.Tensor], path: Path):
    """A ``CLIPVisionConfig`` read off a single-file state dict (widths, depth, patch and picture size)."""
    from transformers import CLIPVisionConfig

    try:
        patch = state["embeddings.patch_embedding.weight"]  # [hidden, 3, p, p]
        positions = state["embeddings.position_embedding.weight"]  # [(size/p)^2 + 1, hidden]
        fc1 = state["encoder.layers.0.mlp.fc1.weight"]  # [intermediate, hidden]
    except KeyError as error:
        raise MomaError(
            f"{path} is not a transformers CLIPVisionModel state dict (no {error.args[0]!r}); MoMA needs the vision "
            f"tower of openai/clip-vit-large-patch14-336 (keys 'vision_model.*'). {CLIP_WHERE_TO_GET}"
        ) from None
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(round((positions.shape[0] - 1) ** 0.5))
    layers = {int(match.group(1)) for key in state if (match := re.match(r"encoder\.layers\.(\d+)\.", key))}
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=max(1, hidden // 64),
        patch_size=patch_size,
        image_size=grid * patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def load_clip_vision(path: str | Path, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu"):
    """transformers ``CLIPVisionModel`` from a Hugging Face folder (full CLIP or vision-only) or one safetensors file.

    Text-tower and projection keys are ignored; every vision-transformer parameter must be present.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MomaError(f"{path} has no config.json; it is not a CLIP vision folder. {CLIP_WHERE_TO_GET}")
        try:
            config = CLIPVisionConfig.from_pretrained(str(path))
        except Exception as error:
            raise MomaError(f"Could not read {path / 'config.json'} as a CLIP config ({error}). {CLIP_WHERE_TO_GET}") from None
        files = _weight_files(path, CLIP_WHERE_TO_GET)
        state = _vision_state(item for file in files for item in _iter_weights(file))
    elif path.is_file() and path.suffix == ".safetensors":
        state = _vision_state(_iter_weights(path))
        config = _clip_vision_config_from_keys(state, path)
    else:
        raise MomaError(f"CLIP vision model not found (or not a folder / .safetensors file): {path}. {CLIP_WHERE_TO_GET}")
    config._attn_implementation = "eager"  # the reference's transformers (4.37) had no SDPA path for CLIP
    with _parameters_on_meta():
        model = CLIPVisionModel(config)
    # transformers 4.x nests the transformer as CLIPVisionModel.vision_model; 5.x does not.
    expected = dict(model.named_parameters())
    inner_prefix = "vision_model." if any(name.startswith("vision_model.") for name in expected) else ""
    relative = {name: name[len(inner_prefix):] for name in expected}
    problems = [f"vision_model.{relative[name]} {tuple(state[relative[name]].shape)} (expected {tuple(param.shape)})"
                for name, param in expected.items()
                if relative[name] in state and state[relative[name]].shape != param.shape]
    missing = ["vision_model." + relative[name] for name in expected if relative[name] not in state]
    if problems or missing:
        raise MomaError(f"{path} does not match its CLIP vision config: missing {missing[:8]} ({len(missing)}), "
                        f"wrong shapes {problems[:8]}. {CLIP_WHERE_TO_GET}")
    for name in expected:
        _set_parameter(model, name, reference_cast(state.pop(relative[name]), dtype).to(device))
    return model.requires_grad_(False).eval()


# -------------------------------------------------------------------------------------------- encoder


def _build_mm_projector() -> nn.Sequential:
    return nn.Sequential(nn.Linear(MM_HIDDEN, LLM_HIDDEN), nn.GELU(), nn.Linear(LLM_HIDDEN, LLM_HIDDEN))


class LlavaContextEncoder(nn.Module):
    """CLIP vision tower + mm_projector + LlamaModel + MoMA's mapping and 4-token projector.

    A plain ``nn.Module`` (not a transformers model) so ComfyUI's ModelPatcher can move it and set ``.device``.
    """

    def __init__(self, language_model: nn.Module, vision_tower: nn.Module, mm_projector: nn.Sequential,
                 mapping: SwiGLUMapping, projector: ImageProjModel, compute_dtype: torch.dtype,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.mapping = mapping
        self.projector = projector
        self.compute_dtype = compute_dtype
        self.max_length = max_length

    @property
    def num_layers(self) -> int:
        return len(self.language_model.layers)

    def _device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def _autocast(self, device: torch.device):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        try:
            return torch.autocast(device_type=device.type, dtype=self.compute_dtype)
        except RuntimeError:  # a backend without autocast for this dtype
            return contextlib.nullcontext()

    def picture_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, 3, 336, 336] -> CLIP penultimate layer without CLS -> mm_projector -> [1, 576, 4096]."""
        vision_dtype = next(self.vision_tower.parameters()).dtype
        pixels = pixel_values.to(self._device())
        reduced = self.compute_dtype != torch.float32
        if reduced:
            pixels = pixels.half()  # the reference casts LLaVA's pixels .half() before the tower's own dtype
        outputs = self.vision_tower(pixel_values=pixels.to(vision_dtype), output_hidden_states=True)
        features = outputs.hidden_states[VISION_SELECT_LAYER][:, 1:]  # [1, 576, 1024]
        if reduced:
            # LLaVA's tower returns features in the pixels' dtype (fp16); autocast then casts them to the compute dtype.
            features = features.half().to(self.compute_dtype)
        return self.mm_projector(features)

    def splice(self, input_ids: list[int], features: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the picture rows at the -200 position -> [1, L, 4096]."""
        positions = [index for index, token in enumerate(input_ids) if token == IMAGE_TOKEN_INDEX]
        if len(positions) != 1:
            raise MomaError(f"Internal: expected one picture placeholder in the LLaVA prompt, found {len(positions)}.")
        vocab = self.language_model.embed_tokens.num_embeddings
        text_ids = [token for token in input_ids if token != IMAGE_TOKEN_INDEX]
        if any(token < 0 or token >= vocab for token in text_ids):
            raise MomaError(f"The tokenizer produced ids outside the model's vocabulary ({vocab}); tokenizer.model "
                            f"does not belong to this LLaVA folder. {LLAVA_WHERE_TO_GET}")
        embeds = self.language_model.embed_tokens(torch.tensor(text_ids, device=self._device()))
        cut = positions[0]
        return torch.cat([embeds[:cut], features[0].to(embeds.dtype), embeds[cut:]])[None]

    @torch.no_grad()
    def forward(self, input_ids: list[int], pixel_values: torch.Tensor, progress: ProgressFn | None = None,
                interrupt: InterruptFn | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(llava_emb [1, 1024], cond tokens [1, 4, 768], uncond tokens [1, 4, 768]), float32 on CPU."""
        total = self.num_layers + 2
        step = _Steps(total, progress, interrupt)
        device = self._device()
        hooks = []
        try:
            for layer in self.language_model.layers:
                hooks.append(layer.register_forward_pre_hook(lambda *_: step.check()))
                hooks.append(layer.register_forward_hook(lambda *_: step.advance()))
            with self._autocast(device):
                step.check()
                features = self.picture_features(pixel_values)
                step.advance()
                embeds = self.splice(input_ids, features)
                length = embeds.shape[1]
                if self.max_length is not None and length > self.max_length:
                    raise MomaError(f"The LLaVA input is {length} tokens (576 for the picture), more than the model's "
                                    f"{self.max_length}; shorten the prompt.")
                hidden = self.language_model(
                    inputs_embeds=embeds,
                    attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
                    position_ids=torch.arange(length, device=device)[None],
                    use_cache=False,
                ).last_hidden_state  # [1, L, 4096], after the final RMSNorm
                step.check()
                llava_emb = self.mapping(hidden)[:, -1, :]  # [1, 1024]
                cond = self.projector(llava_emb)
                uncond = self.projector(torch.zeros_like(llava_emb))
                step.advance()
        finally:
            for hook in hooks:
                hook.remove()
        return llava_emb.float().cpu(), cond.float().cpu(), uncond.float().cpu()


class _Steps:
    """Progress + interrupt bookkeeping for one phase."""

    def __init__(self, total: int, progress: ProgressFn | None, interrupt: InterruptFn | None) -> None:
        self.total, self.done = total, 0
        self.progress, self.interrupt = progress, interrupt

    def check(self) -> None:
        if self.interrupt is not None:
            self.interrupt()

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


# ---------------------------------------------------------------------------------------------- loader


def _load_language_model(folder: LlavaFolder, dtype: torch.dtype, device: torch.device,
                         step: _Steps) -> tuple[nn.Module, nn.Sequential]:
    from transformers import LlamaModel

    config = folder.llama_config()
    with _parameters_on_meta():
        language_model = LlamaModel(config)
        mm_projector = _build_mm_projector()
    targets: dict[str, tuple[nn.Module, str]] = {}
    for name, param in language_model.named_parameters():
        targets["model." + name] = (language_model, name)
    for name, _ in mm_projector.named_parameters():
        targets["model.mm_projector." + name] = (mm_projector, name)

    unexpected: list[str] = []
    for file in folder.weight_files:
        step.check()
        for key, tensor in _iter_weights(file):
            if key not in targets:
                if not _IGNORED_KEYS.match(key):
                    unexpected.append(key)
                continue
            module, name = targets[key]
            expected_shape = module.get_parameter(name).shape
            if tensor.shape != expected_shape:
                raise MomaError(f"{file}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                                f"{tuple(expected_shape)}. The folder's files do not belong together. {LLAVA_WHERE_TO_GET}")
            _set_parameter(module, name, reference_cast(tensor, dtype).to(device))
        step.advance()
    missing = ["model." + name for name in _meta_parameters(language_model)]
    missing += ["model.mm_projector." + name for name in _meta_parameters(mm_projector)]
    if unexpected or missing:
        hint = ""
        if any(key.startswith(("language_model.", "model.language_model.")) for key in unexpected):
            hint = " These are 'llava-hf' key names; MoMA needs the original LLaVA checkpoint."
        raise MomaError(
            f"{folder.path} does not hold MoMA's LLaVA checkpoint: missing keys {missing[:8]} ({len(missing)}), "
            f"unexpected keys {unexpected[:8]} ({len(unexpected)}).{hint} {LLAVA_WHERE_TO_GET}"
        )
    return language_model.requires_grad_(False).eval(), mm_projector.requires_grad_(False).eval()


def _quantize_linears(root: nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Swap every nn.Linear under ``root`` for bitsandbytes int8 / nf4 (double quant), quantised on ``device``."""
    import bitsandbytes as bnb

    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            weight = child.weight.data.to(torch.float16)
            has_bias = child.bias is not None
            if mode == "8bit":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                            has_fp16_weights=False, threshold=6.0)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
            if has_bias:
                layer.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, child_name, layer.to(device))  # bitsandbytes quantises when moved to CUDA


def _check_quantization(quantization: str, device: torch.device) -> None:
    if quantization not in QUANTIZATIONS:
        raise MomaError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    if quantization == "none":
        return
    if device.type != "cuda":
        raise MomaError(f"quantization '{quantization}' needs a CUDA GPU (bitsandbytes); this run uses {device}. "
                        f"Set quantization to 'none'.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MomaError(f"quantization '{quantization}' needs the bitsandbytes package: pip install bitsandbytes "
                        f"(in ComfyUI's Python), or set quantization to 'none'.") from None


def load_context_encoder(llava_dir: str | Path, clip_vision_path: str | Path, adapter: MomaAdapterWeights, *,
                         precision: str = "auto", quantization: str = "none",
                         device: torch.device | str = "cpu", progress: ProgressFn | None = None,
                         interrupt: InterruptFn | None = None) -> LlavaContextEncoder:
    """Build the whole context encoder on ``device`` from the LLaVA folder, the CLIP vision tower and the adapter.

    ``progress(done, total)`` is called after each weight file; ``interrupt()`` before each (it should raise).
    """
    device = torch.device(device)
    dtype = resolve_dtype(precision, device)
    _check_quantization(quantization, device)
    folder = LlavaFolder.open(llava_dir)
    step = _Steps(len(folder.weight_files) + 1, progress, interrupt)
    quantized = quantization != "none"
    # Quantised layers are built from CPU weights and quantised as they move to the GPU.
    weights_device = torch.device("cpu") if quantized else device
    language_model, mm_projector = _load_language_model(folder, dtype, weights_device, step)
    step.check()
    vision_tower = load_clip_vision(clip_vision_path, dtype, device)
    if vision_tower.config.hidden_size != MM_HIDDEN:
        raise MomaError(f"The CLIP vision model {clip_vision_path} is {vision_tower.config.hidden_size} wide; LLaVA's "
                        f"projector needs CLIP ViT-L/14-336 (1024). {CLIP_WHERE_TO_GET}")
    step.advance()
    if quantized:
        for module in (language_model.layers, mm_projector):
            _quantize_linears(module, quantization, dtype, device)
        language_model.to(device)
        mm_projector.to(device)
    mapping = build_mapping(adapter, dtype, device)
    projector = build_projector(adapter, dtype, device)
    return LlavaContextEncoder(language_model, vision_tower, mm_projector, mapping, projector, dtype,
                               max_length=folder.max_length).eval()
