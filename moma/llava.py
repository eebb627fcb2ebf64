"""MoMA's multimodal context encoder (spec 2), built from the original published LLaVA folder.

What is computed, for one reference picture and one (subject, prompt):

1. The prompt's token ids with the -200 picture placeholder (``prompt.py``: template and LLaVA's
   ``tokenizer_image_token`` on the folder's SentencePiece model).
2. CLIP ViT-L/14-336 (``clip_vision.py``): ``hidden_states[-2]`` (penultimate layer, before post_layernorm) without CLS -> [1, 576, 1024]
   -> ``mm_projector`` (Linear 1024->4096, exact GELU, Linear 4096->4096) -> [1, 576, 4096].
3. ``embed_tokens`` of the text ids with the 576 picture rows spliced in at the -200 position -> the bare
   ``LlamaModel`` (no LM head) with positions 0..L-1 and an all-ones mask -> final-RMSNorm hidden states.
4. The SwiGLU ``mapping`` (adapter file) on every position, then the last position ("*") -> ``llava_emb`` [1, 1024].

The folder is read with transformers' own ``LlamaModel`` and ``CLIPVisionModel`` classes (no LLaVA package, no
remote code). Keys of the original checkpoint: ``model.embed_tokens``, ``model.layers.*``, ``model.norm``,
``model.mm_projector.0/2``; ``lm_head`` and any vision-tower keys in the shards are ignored, as the reference
ignores them (it reloads the tower from ``openai/clip-vit-large-patch14-336``). Weights are loaded shard by shard
into a model whose parameters start on the meta device (``checkpoint.py``), so peak memory is the model plus
one tensor.

Precision: ``fp32`` computes in float32 throughout. ``bf16`` reproduces the reference's numerics: its weights went
through float16 first (``from_pretrained(torch_dtype=float16)`` then ``.to(bfloat16)``), its pixels and picture
features are cast ``.half()``, and everything runs under ``autocast(bfloat16)``. ``fp16`` is the same in float16.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    check_complete,
    iter_weights,
    parameters_on_meta,
    read_json,
    reference_cast,
    set_parameter,
    weight_files,
)
from .clip_vision import CLIP_WHERE_TO_GET, load_clip_vision
from .errors import MomaError
from .limits import check_tensor
from .projection import ImageProjModel, SwiGLUMapping, build_mapping, build_projector
from .prompt import (  # noqa: F401  (re-exported: the prompt helpers belong to the LLaVA encoder's API)
    IMAGE_TOKEN_INDEX,
    LLAVA_WHERE_TO_GET,
    LlavaTokenizer,
    llava_prompt,
    llava_user_prompt,
    sd_prompt,
)
from .streaming import LayerStreamer, streamed_layers
from .weights import LLM_HIDDEN, MomaAdapterWeights

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (done, total)
InterruptFn = Callable[[], None]  # raises to stop

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
QUANTIZATIONS = ("none", "8bit", "4bit")
MM_HIDDEN = 1024  # CLIP ViT-L width, the mm_projector's input
VISION_SELECT_LAYER = -2
_IGNORED_KEYS = re.compile(r"^(lm_head\.|model\.vision_tower\.|.*rotary_emb\.inv_freq$)")


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bf16 on CUDA with bf16 support (the reference's dtype), else fp16 on CUDA; fp16 on MPS;
    bf16 on a CPU where torch computes in bf16 (half fp32's memory), else fp32."""
    if precision not in PRECISIONS:
        raise MomaError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "auto":
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this torch build computes the encoder's ops (linear, SDPA, GELU) in bf16 on this CPU."""
    try:
        x = torch.ones(1, 2, 4, 8, dtype=torch.bfloat16)
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        y = torch.nn.functional.gelu(torch.nn.functional.linear(y, torch.ones(8, 8, dtype=torch.bfloat16)))
        return bool(torch.isfinite(y.float()).all())
    except (RuntimeError, NotImplementedError):
        return False


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
        config = read_json(config_file)
        _check_llava_config(config, config_file)
        files = weight_files(folder, LLAVA_WHERE_TO_GET)
        check_complete(folder, files, ("tokenizer.model",), LLAVA_WHERE_TO_GET)
        return cls(path=folder, config=config, weight_files=files)

    def llama_config(self):
        """transformers ``LlamaConfig`` for the language model (sdpa attention)."""
        from transformers import LlamaConfig

        cfg = self.config
        try:
            kwargs = self._llama_kwargs(cfg)
        except (TypeError, ValueError) as error:
            raise MomaError(
                f"{self.path / 'config.json'} has a value of the wrong type ({error}). {LLAVA_WHERE_TO_GET}"
            ) from None
        if cfg.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = cfg["rope_scaling"]
        try:
            return LlamaConfig(**kwargs)
        except Exception as error:  # transformers validates rope_scaling etc. with its own exception types
            raise MomaError(
                f"{self.path / 'config.json'} is not a valid Llama config ({type(error).__name__}: "
                f"{error}). {LLAVA_WHERE_TO_GET}"
            ) from None

    @staticmethod
    def _llama_kwargs(cfg: dict) -> dict:
        heads = int(cfg["num_attention_heads"])
        return dict(
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
    # Sizes are read before any weight, so implausible ones would build a huge (meta) model or fail deep in torch.
    limits = {
        "intermediate_size": 1 << 20,
        "num_hidden_layers": 1024,
        "num_attention_heads": 1024,
        "vocab_size": 1 << 24,
        "num_key_value_heads": 1024,
        "max_position_embeddings": 1 << 24,
    }
    bad = [
        f"{key}={cfg[key]!r}"
        for key, limit in limits.items()
        if key in cfg
        and cfg[key] is not None
        and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or not 0 < cfg[key] <= limit)
    ]
    if not bad and isinstance(cfg["num_attention_heads"], int) and LLM_HIDDEN % cfg["num_attention_heads"]:
        bad.append(f"num_attention_heads={cfg['num_attention_heads']!r} (does not divide hidden_size {LLM_HIDDEN})")
    if bad:
        raise MomaError(f"{config_file} has invalid sizes: {', '.join(bad)}. {LLAVA_WHERE_TO_GET}")
    expected = {
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": VISION_SELECT_LAYER,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": MM_HIDDEN,
        "hidden_size": LLM_HIDDEN,
    }
    defaults = {"mm_vision_select_feature": "patch"}  # LLaVA's own default when the key is absent
    wrong = [
        f"{key}={cfg.get(key)!r} (MoMA needs {value!r})"
        for key, value in expected.items()
        if cfg.get(key, defaults.get(key)) != value
    ]
    if cfg.get("mm_use_im_start_end") or cfg.get("mm_use_im_patch_token"):
        wrong.append("mm_use_im_start_end/mm_use_im_patch_token are set (MoMA's prompt uses neither)")
    if wrong:
        raise MomaError(
            f"{config_file} is not the LLaVA-1.5-7B layout MoMA was trained with: {'; '.join(wrong)}. "
            f"{LLAVA_WHERE_TO_GET}"
        )


def _build_mm_projector() -> nn.Sequential:
    return nn.Sequential(nn.Linear(MM_HIDDEN, LLM_HIDDEN), nn.GELU(), nn.Linear(LLM_HIDDEN, LLM_HIDDEN))


class LlavaContextEncoder(nn.Module):
    """CLIP vision tower + mm_projector + LlamaModel + MoMA's mapping and 4-token projector.

    A plain ``nn.Module`` (not a transformers model) so ComfyUI's ModelPatcher can move it and set ``.device``.
    """

    def __init__(
        self,
        language_model: nn.Module,
        vision_tower: nn.Module,
        mm_projector: nn.Sequential,
        mapping: SwiGLUMapping,
        projector: ImageProjModel,
        compute_dtype: torch.dtype,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.mapping = mapping
        self.projector = projector
        self.compute_dtype = compute_dtype
        self.max_length = max_length
        self.streamer: LayerStreamer | None = None  # set by ``stream_encoder``: weights on the host, layers streamed

    @property
    def num_layers(self) -> int:
        return len(self.language_model.layers)

    def _device(self) -> torch.device:
        if self.streamer is not None:
            return self.streamer.device
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
            raise MomaError(
                f"The tokenizer produced ids outside the model's vocabulary ({vocab}); tokenizer.model "
                f"does not belong to this LLaVA folder. {LLAVA_WHERE_TO_GET}"
            )
        embeds = self.language_model.embed_tokens(torch.tensor(text_ids, device=self._device()))
        cut = positions[0]
        return torch.cat([embeds[:cut], features[0].to(embeds.dtype), embeds[cut:]])[None]

    @torch.no_grad()
    def forward(
        self,
        input_ids: list[int],
        pixel_values: torch.Tensor,
        progress: ProgressFn | None = None,
        interrupt: InterruptFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(llava_emb [1, 1024], cond tokens [1, 4, 768], uncond tokens [1, 4, 768]), float32 on CPU."""
        total = self.num_layers + 2
        step = _Steps(total, progress, interrupt)
        device = self._device()
        hooks = []
        streaming = self.streamer.session() if self.streamer is not None else contextlib.nullcontext()
        try:
            for layer in self.language_model.layers:
                hooks.append(layer.register_forward_pre_hook(lambda *_: step.check()))
                hooks.append(layer.register_forward_hook(lambda *_: step.advance()))
            with streaming, self._autocast(device):
                step.check()
                features = self.picture_features(pixel_values)
                step.advance()
                embeds = self.splice(input_ids, features)
                length = embeds.shape[1]
                if self.max_length is not None and length > self.max_length:
                    raise MomaError(
                        f"The LLaVA input is {length} tokens (576 for the picture), more than the model's "
                        f"{self.max_length}; shorten the prompt."
                    )
                hidden = self.language_model(
                    inputs_embeds=embeds,
                    attention_mask=None,  # the reference's all-ones mask (B=1, no padding): plain causal
                    position_ids=None,  # the default 0..L-1, as the reference passes
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


def _load_language_model(
    folder: LlavaFolder, dtype: torch.dtype, device: torch.device, step: _Steps
) -> tuple[nn.Module, nn.Sequential]:
    from transformers import LlamaModel

    config = folder.llama_config()
    try:
        with parameters_on_meta():
            language_model = LlamaModel(config)
            mm_projector = _build_mm_projector()
    except (KeyError, ValueError, TypeError) as error:  # e.g. an unknown hidden_act
        raise MomaError(
            f"{folder.path / 'config.json'} does not describe a buildable Llama model "
            f"({type(error).__name__}: {error}). {LLAVA_WHERE_TO_GET}"
        ) from None
    round_rope_tables_to_fp16(language_model.rotary_emb)
    targets: dict[str, tuple[nn.Module, str]] = {}
    for name, _ in language_model.named_parameters():
        targets["model." + name] = (language_model, name)
    for name, _ in mm_projector.named_parameters():
        targets["model.mm_projector." + name] = (mm_projector, name)

    unexpected: list[str] = []
    loaded: set[str] = set()
    ignored = 0
    for file in folder.weight_files:
        step.check()
        for key, tensor in iter_weights(file):
            if key not in targets:
                if _IGNORED_KEYS.match(key):
                    ignored += 1
                else:
                    unexpected.append(key)
                continue
            module, name = targets[key]
            expected_shape = module.get_parameter(name).shape
            if tensor.shape != expected_shape:
                raise MomaError(
                    f"{file}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(expected_shape)}. The folder's files do not belong together. {LLAVA_WHERE_TO_GET}"
                )
            # checked as it lands (after the cast, on the device: one pass, fast on a GPU; a value beyond fp16 shows)
            set_parameter(
                module, name, check_tensor(reference_cast(tensor, dtype).to(device), str(file), key, LLAVA_WHERE_TO_GET)
            )
            loaded.add(key)
        step.advance()
    missing = [key for key in targets if key not in loaded]
    if unexpected or missing:
        hint = ""
        if any(key.startswith(("language_model.", "model.language_model.")) for key in unexpected):
            hint = " These are 'llava-hf' key names; MoMA needs the original LLaVA checkpoint."
        raise MomaError(
            f"{folder.path} does not hold MoMA's LLaVA checkpoint: missing keys {missing[:8]} ({len(missing)}), "
            f"unexpected keys {unexpected[:8]} ({len(unexpected)}).{hint} {LLAVA_WHERE_TO_GET}"
        )
    log.debug("LLaVA: %d checkpoint tensors ignored (lm_head, vision tower), as the reference ignores them.", ignored)
    return language_model.requires_grad_(False).eval(), mm_projector.requires_grad_(False).eval()


def round_rope_tables_to_fp16(rotary_emb: nn.Module) -> nn.Module:
    """Make ``rotary_emb`` return cos/sin rounded to fp16, then cast to the activations' dtype, as the reference does.

    The reference's transformers (4.37) built LlamaRotaryEmbedding's cos/sin tables once, in fp32, and stored them
    in the default dtype, which ``from_pretrained(torch_dtype=float16)`` had set to fp16; casting the model to
    bf16/fp32 afterwards cast those rounded tables (MoMA was fine-tuned with them). Current transformers computes
    them per call in fp32. ``rotary_emb`` only reads its input's device and dtype, so it is called with an empty
    fp32 tensor to get the fp32 tables, which are then rounded.
    """
    compute = rotary_emb.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = compute(x.new_empty(0, dtype=torch.float32), *args, **kwargs)
        return cos.to(torch.float16).to(x.dtype), sin.to(torch.float16).to(x.dtype)

    rotary_emb.forward = forward
    return rotary_emb


def _quantized_linear(child: nn.Linear, mode: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes int8 / nf4 (double quant) copy of a CPU ``nn.Linear``, quantised on ``device``."""
    import bitsandbytes as bnb

    weight = child.weight.data.to(torch.float16)
    has_bias = child.bias is not None
    if mode == "8bit":
        layer = bnb.nn.Linear8bitLt(
            child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    if has_bias:
        layer.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantises when moved from the CPU to CUDA


def _quantize_linears(root: nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Swap every nn.Linear under ``root`` for its bitsandbytes copy, quantised on ``device``."""
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, _quantized_linear(child, mode, compute_dtype, device))


def _check_quantization(quantization: str, device: torch.device) -> None:
    if quantization not in QUANTIZATIONS:
        raise MomaError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    if quantization == "none":
        return
    if device.type != "cuda":
        raise MomaError(
            f"quantization '{quantization}' needs a CUDA GPU (bitsandbytes); this run uses {device}. "
            f"Set quantization to 'none'."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MomaError(
            f"quantization '{quantization}' needs the bitsandbytes package: pip install bitsandbytes "
            f"(in ComfyUI's Python), or set quantization to 'none'."
        ) from None


def load_context_encoder(
    llava_dir: str | Path,
    clip_vision_path: str | Path,
    adapter: MomaAdapterWeights,
    *,
    precision: str = "auto",
    quantization: str = "none",
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    interrupt: InterruptFn | None = None,
    stream: bool = False,
    pin: bool = False,
) -> LlavaContextEncoder:
    """Build the whole context encoder on ``device`` from the LLaVA folder, the CLIP vision tower and the adapter.

    ``stream``: the weights stay on the CPU (``pin``: page-locked) and the encoder computes on ``device``, moving
    the CLIP and decoder layers there one at a time (``streaming.py``); the tokens equal the resident encoder's.
    ``progress(done, total)`` is called after each weight file; ``interrupt()`` before each (it should raise).
    """
    device = torch.device(device)
    dtype = resolve_dtype(precision, device)
    _check_quantization(quantization, device)
    compute_device, device = device, (torch.device("cpu") if stream else device)
    folder = LlavaFolder.open(llava_dir)
    log.info(
        "MoMA: loading LLaVA from %s (%d weight files) and CLIP vision from %s, %s on %s%s%s.",
        folder.path,
        len(folder.weight_files),
        clip_vision_path,
        str(dtype).removeprefix("torch."),
        compute_device,
        " (streamed from RAM)" if stream else "",
        "" if quantization == "none" else f", {quantization} quantised",
    )
    step = _Steps(len(folder.weight_files) + 1, progress, interrupt)
    quantized = quantization != "none"
    # Quantised layers are built from the fp16 CPU tensors (memory-mapped from the shards, no copy, as
    # bitsandbytes takes fp16) and quantised as they move to the GPU; the rest is cast to ``dtype`` after.
    language_model, mm_projector = _load_language_model(
        folder, torch.float16 if quantized else dtype, torch.device("cpu") if quantized else device, step
    )
    step.check()
    vision_tower = load_clip_vision(clip_vision_path, dtype, device)
    if vision_tower.config.hidden_size != MM_HIDDEN:
        raise MomaError(
            f"The CLIP vision model {clip_vision_path} is {vision_tower.config.hidden_size} wide; LLaVA's "
            f"projector needs CLIP ViT-L/14-336 (1024). {CLIP_WHERE_TO_GET}"
        )
    step.advance()
    if quantized:
        if not stream:  # streamed: quantised as each layer arrives on the GPU (the same fp16 weights, the same code)
            for module in (language_model.layers, mm_projector):
                _quantize_linears(module, quantization, dtype, device)
        for module in language_model.modules():  # embeddings and RMSNorms: plain parameters, in ``dtype``
            if isinstance(module, nn.Embedding) or type(module).__name__.endswith("RMSNorm"):
                module.to(dtype=dtype)
    mapping = build_mapping(adapter, dtype, device)
    projector = build_projector(adapter, dtype, device)
    encoder = LlavaContextEncoder(
        language_model, vision_tower, mm_projector, mapping, projector, dtype, max_length=folder.max_length
    )
    # Parameters were placed on ``device`` one by one; buffers built at construction (RoPE frequencies, CLIP
    # position ids) and anything still on the CPU follow here.
    encoder = encoder.to(device).eval()
    if stream:
        quantize = None
        if quantized:

            def quantize(linear: nn.Linear, target: torch.device) -> nn.Module:
                return _quantized_linear(linear, quantization, dtype, target)

        encoder.streamer = LayerStreamer(
            encoder,
            streamed_layers(vision_tower) + list(language_model.layers),
            compute_device,
            pin=pin,
            quantize=quantize,
            quantize_modules=[*language_model.layers, mm_projector],
        )
    return encoder
