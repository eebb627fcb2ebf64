"""The host contract: every ComfyUI symbol, signature and behaviour the pack relies on, checked once when it loads.

ComfyUI has no stable Python API below its node API, and the pack patches the UNet through hooks that a ComfyUI
release can rename or give another meaning (attention replace patches, model-patcher wrappers and callbacks, the
sampler's model options). Each hook is listed here with the nodes that need it and a cheap check (introspection,
tiny tensors, a ModelPatcher around a one-weight module; no model file). ``check_host()`` runs them all once; a
broken hook gives one log line naming it and the ComfyUI version, and the nodes that need it refuse to run with a
``MomaError`` (``require``) instead of failing with a traceback in the middle of sampling.

What a check accepts: names and meanings the pack uses. A new optional parameter, a new key in
``transformer_options`` or a new wrapper type does not trip it. ``scripts/check_host.sh`` runs the same checks,
plus the runner's (``RUNNER``), against any ComfyUI tree.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..moma.errors import MomaError
from .node_api import API_VERSION

log = logging.getLogger(__name__)

APPLY = "Apply MoMA Attention"
GRAB = "Self-Attention Feature Grab"
ENCODER = "LLaVA Context Encoder"
LOADER = "MoMA Loader"
MASKER = "MoMA Object Masker"
TEXT = "MoMA Text Encode"
SAVE = "Save MoMA Context"
LOAD = "Load MoMA Context"
PREVIEW = "MoMA Subject Mask Preview"
EVERY_NODE = (APPLY, GRAB, ENCODER, LOADER, MASKER, TEXT, SAVE, LOAD, PREVIEW)
RUNNER = "the runner (scripts/run_workflow.py, the tests)"  # not checked when the pack loads

SD15_ATTN2_BLOCK = ("input", 1)  # the first SD1.5 cross-attention block: 320 channels, 8 heads


class HookBroken(Exception):
    """A hook is missing or does not behave as the pack relies on (the message says how)."""


@dataclasses.dataclass(frozen=True)
class Hook:
    """One thing the pack relies on: its name in ComfyUI, who needs it, and the check."""

    name: str
    needed_by: tuple[str, ...]
    check: Callable[[], None]


@dataclasses.dataclass
class ContractReport:
    """The result of ``check_host``: the ComfyUI version and, per broken hook, why."""

    comfyui_version: str
    broken: dict[str, str]  # hook name -> reason
    hooks: tuple[Hook, ...]

    @property
    def ok(self) -> bool:
        return not self.broken

    def broken_for(self, node: str) -> dict[str, str]:
        return {
            hook.name: self.broken[hook.name]
            for hook in self.hooks
            if hook.name in self.broken and node in hook.needed_by
        }

    def summary(self) -> str:
        if self.ok:
            return f"ComfyUI {self.comfyui_version}: all {len(self.hooks)} hooks the pack relies on are there."
        nodes = sorted({node for hook in self.hooks if hook.name in self.broken for node in hook.needed_by})
        problems = "; ".join(f"{name}: {reason}" for name, reason in self.broken.items())
        return (
            f"ComfyUI {self.comfyui_version} lacks or changed {len(self.broken)} of the {len(self.hooks)} hooks "
            f"MoMA relies on ({problems}); these will refuse to run: {', '.join(nodes)}. Update ComfyUI-MoMA, or "
            f"use a ComfyUI listed in its docs/compatibility.md."
        )


# --- small helpers for the checks ----------------------------------------------------------------------------------


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:  # ImportError, or anything the module raises while importing
        raise HookBroken(f"module {name} does not import ({type(error).__name__}: {error})") from None


def _attr(owner: Any, path: str) -> Any:
    value = owner
    for part in path.split("."):
        if not hasattr(value, part):
            where = getattr(owner, "__name__", type(owner).__name__)
            raise HookBroken(f"{where}.{path} is missing")
        value = getattr(value, part)
    return value


def _accepts(function: Callable, *names: str, positional: Sequence[str] = ()) -> None:
    """``function`` takes these keyword arguments (or **kwargs), and its first positional parameters are
    ``positional`` in this order (extra trailing optional parameters are fine)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        raise HookBroken(f"{getattr(function, '__qualname__', function)}: no readable signature") from None
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    missing = [name for name in names if name not in named and not var_keyword]
    if missing:
        raise HookBroken(f"{function.__qualname__} takes no {', '.join(missing)} argument")
    leading = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and leading[: len(positional)] != list(positional):
        raise HookBroken(
            f"{function.__qualname__}{inspect.signature(function)}: the pack passes "
            f"({', '.join(positional)}) in this order"
        )


def _source_mentions(function: Callable, *tokens: str) -> None:
    """``function``'s source still contains each token (a call or key the pack's hook depends on)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return  # no source (compiled or frozen): nothing to read, nothing to refuse
    missing = [token for token in tokens if token not in source]
    if missing:
        raise HookBroken(f"{function.__qualname__} no longer uses {', '.join(missing)}")


def _tiny_patcher(patcher_class: Any = None) -> Any:
    """A real ModelPatcher around a one-weight module on the CPU (as the pack builds one for LLaVA)."""
    import torch

    model_patcher = _module("comfy.model_patcher")
    cls = patcher_class or _attr(model_patcher, "ModelPatcher")
    module = torch.nn.Linear(1, 1)
    module.device = torch.device("cpu")
    return cls(module, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


# --- the checks --------------------------------------------------------------------------------------------------


def _check_node_api() -> None:
    api = _module(f"comfy_api.{API_VERSION}")
    io = _attr(api, "io")
    _attr(api, "ComfyExtension.get_node_list")
    for name in (
        "ComfyNode",
        "Schema",
        "NodeOutput",
        "Custom",
        "Model",
        "Clip",
        "Vae",
        "Conditioning",
        "Latent",
        "Image",
        "Mask",
        "Combo",
        "Float",
        "Int",
        "String",
        "Boolean",
    ):
        _attr(io, name)
    fields = {field.name for field in dataclasses.fields(io.Schema)} if dataclasses.is_dataclass(io.Schema) else set()
    missing = {"node_id", "display_name", "category", "description", "inputs", "outputs", "is_output_node"} - fields
    if missing:
        raise HookBroken(f"io.Schema has no field(s) {', '.join(sorted(missing))}")
    for name in ("define_schema", "execute", "validate_inputs", "fingerprint_inputs"):
        _attr(io.ComfyNode, name)
    _accepts(io.Float.Input.__init__, "default", "min", "max", "step", "optional", "tooltip")
    _accepts(io.Combo.Input.__init__, "options", "default", "tooltip")
    _accepts(io.String.Input.__init__, "default", "optional", "force_input", "tooltip")
    _accepts(io.Mask.Output.__init__, "display_name", "tooltip")
    _accepts(io.NodeOutput.__init__, "ui")


def _check_attention_lookup() -> None:
    """ComfyUI's transformer block calls the replace patch at (block, index, transformer_index) if there is one,
    else at (block, index), for attn1 and attn2, with q, k, v and extra_options (n_heads, block, ...)."""
    import torch

    attention = _module("comfy.ldm.modules.attention")
    block_class = _attr(attention, "BasicTransformerBlock")
    _accepts(block_class.forward, "context", "transformer_options")
    generator = torch.Generator().manual_seed(0)
    block = block_class(8, 1, 8, context_dim=8)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    calls: list[tuple[str, tuple, dict]] = []

    def patch(name: str, key: tuple) -> Callable:
        def replace(q, k, v, extra_options):
            calls.append((name, key, extra_options))
            return q

        return replace

    def run(table: dict) -> list[tuple[str, tuple]]:
        calls.clear()
        options = {"block": SD15_ATTN2_BLOCK, "block_index": 0, "patches_replace": table}
        with torch.no_grad():
            block(
                torch.randn(1, 4, 8, generator=generator),
                context=torch.randn(1, 3, 8, generator=generator),
                transformer_options=options,
            )
        return [(name, key) for name, key, _ in calls]

    two, three = SD15_ATTN2_BLOCK, (*SD15_ATTN2_BLOCK, 0)
    for kind in ("attn1", "attn2"):
        if run({kind: {two: patch(kind, two)}}) != [(kind, two)]:
            raise HookBroken(f"a {kind} replace patch at the key {two} is not called")
        if run({kind: {three: patch(kind, three)}}) != [(kind, three)]:
            raise HookBroken(f"a {kind} replace patch at the key {three} is not called")
        if run({kind: {two: patch(kind, two), three: patch(kind, three)}}) != [(kind, three)]:
            raise HookBroken(
                f"with {kind} replace patches at {three} and {two}, ComfyUI no longer calls only the "
                f"one at {three} (the pack chains onto the one ComfyUI calls)"
            )
    run({"attn2": {two: patch("attn2", two)}})
    extra = calls[0][2]
    for key in ("n_heads", "block", "attn_precision"):
        if key not in extra:
            raise HookBroken(f"a replace patch's extra_options have no {key!r}")
    if extra["n_heads"] != 1 or tuple(extra["block"]) != two:
        raise HookBroken(
            f"a replace patch's extra_options say n_heads={extra['n_heads']!r}, "
            f"block={extra['block']!r} (expected 1 and {two})"
        )
    _source_mentions(_attr(attention, "SpatialTransformer.forward"), "activations_shape", "block_index")


def _check_optimized_attention() -> None:
    import torch

    attention = _module("comfy.ldm.modules.attention")
    optimized_attention = _attr(attention, "optimized_attention")
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 8, generator=generator) for _ in range(3))
    try:
        out = optimized_attention(q, k, v, 2, attn_precision=None, transformer_options={})
    except TypeError as error:
        raise HookBroken(
            f"optimized_attention(q, k, v, heads, attn_precision=, transformer_options=): {error}"
        ) from None
    split = [t.reshape(2, 5, 2, 4).transpose(1, 2) for t in (q, k, v)]
    expected = torch.softmax(split[0] @ split[1].transpose(-1, -2) / 2.0, dim=-1) @ split[2]
    expected = expected.transpose(1, 2).reshape(2, 5, 8)
    if out.shape != expected.shape or not torch.allclose(out.float(), expected, atol=1e-4, rtol=1e-3):
        raise HookBroken(
            "optimized_attention(q, k, v, heads) no longer computes multi-head softmax attention "
            "on [batch, tokens, heads * dim] tensors"
        )


def _check_patch_replace() -> None:
    model_patcher = _module("comfy.model_patcher")
    _accepts(
        _attr(model_patcher, "ModelPatcher.set_model_patch_replace"),
        "transformer_index",
        positional=("self", "patch", "name", "block_name", "number"),
    )
    patcher = _tiny_patcher()
    marker = object()
    patcher.set_model_patch_replace(marker, "attn2", "input", 1)
    patcher.set_model_patch_replace(marker, "attn2", "input", 1, 0)
    table = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    if table.get(("input", 1)) is not marker or table.get(("input", 1, 0)) is not marker:
        raise HookBroken(
            "set_model_patch_replace no longer stores patches in model_options['transformer_options']"
            "['patches_replace'][name] under (block, number) / (block, number, transformer_index)"
        )
    clone = patcher.clone()
    clone.set_model_patch_replace(object(), "attn2", "input", 2)
    if ("input", 2) in table:
        raise HookBroken("a patch set on a clone reaches the model it was cloned from")


def _check_clone_callbacks() -> None:
    extension = _module("comfy.patcher_extension")
    on_clone = _attr(extension, "CallbacksMP.ON_CLONE")
    patcher = _tiny_patcher()
    for name in ("add_callback_with_key", "get_callbacks", "clone", "get_model_object"):
        _attr(patcher, name)
    seen: list[tuple[Any, Any]] = []

    def callback(source: Any, clone: Any) -> None:
        seen.append((source, clone))

    patcher.add_callback_with_key(on_clone, "moma-contract", callback)
    if callback not in patcher.get_callbacks(on_clone, "moma-contract"):
        raise HookBroken("get_callbacks(CallbacksMP.ON_CLONE, key) does not return the callback added with that key")
    clone = patcher.clone()
    if seen != [(patcher, clone)]:
        raise HookBroken("ModelPatcher.clone() does not call the ON_CLONE callbacks with (source, clone)")
    if type(clone) is not type(patcher):
        raise HookBroken("ModelPatcher.clone() does not keep the patcher's class")


def _check_wrappers() -> None:
    extension = _module("comfy.patcher_extension")
    samplers = _module("comfy.samplers")
    model_patcher = _module("comfy.model_patcher")
    outer, cond_batch = _attr(extension, "WrappersMP.OUTER_SAMPLE"), _attr(extension, "WrappersMP.CALC_COND_BATCH")
    _accepts(_attr(extension, "WrapperExecutor.__init__"), "class_obj")
    _accepts(
        _attr(model_patcher, "ModelPatcher.add_wrapper_with_key"), positional=("self", "wrapper_type", "key", "wrapper")
    )
    # the pack's OUTER_SAMPLE wrapper reads (noise, latent_image, sampler, sigmas) and the guider's model_options,
    # which the guider reads again when it samples; CALC_COND_BATCH gets (model, conds, x_in, timestep, options)
    guider_class = _attr(samplers, "CFGGuider")
    _accepts(_attr(guider_class, "outer_sample"), positional=("self", "noise", "latent_image", "sampler", "sigmas"))
    _source_mentions(_attr(guider_class, "sample"), "OUTER_SAMPLE", "self.outer_sample")
    _source_mentions(_attr(guider_class, "inner_sample"), "self.model_options")
    _accepts(_attr(samplers, "calc_cond_batch"), positional=("model", "conds", "x_in", "timestep", "model_options"))
    patcher = _tiny_patcher()
    guider = guider_class(patcher)
    if getattr(guider, "model_patcher", None) is not patcher or not isinstance(
        getattr(guider, "model_options", None), dict
    ):
        raise HookBroken("CFGGuider(model) no longer keeps .model_patcher and .model_options")
    # the guider's sample() merges the patcher's wrappers into its model options (prepare_model_patcher); there
    # calc_cond_batch runs the CALC_COND_BATCH ones first, with (executor, model, conds, x_in, timestep, options)
    seen: list[tuple] = []

    class Stop(Exception):
        pass

    def stop(executor: Any, *args: Any) -> Any:
        seen.append(args)
        raise Stop

    _source_mentions(guider_class.sample, "prepare_model_patcher")
    for wrapper_type in (outer, cond_batch):
        patcher.add_wrapper_with_key(wrapper_type, "moma-contract", stop)
    options = _attr(_module("comfy.model_patcher"), "create_model_options_clone")(patcher.model_options)
    options.setdefault("transformer_options", {})
    _attr(_module("comfy.sampler_helpers"), "prepare_model_patcher")(patcher, {}, options)
    if stop not in _attr(extension, "get_all_wrappers")(outer, options, is_model_options=True):
        raise HookBroken(
            "prepare_model_patcher no longer puts the patcher's OUTER_SAMPLE wrappers in the model options"
        )
    conds, x_in, timestep = [[], None], object(), object()
    try:
        samplers.calc_cond_batch("model", conds, x_in, timestep, options)
    except Stop:
        pass
    if len(seen) != 1 or seen[0][:4] != ("model", conds, x_in, timestep) or seen[0][4] is not options:
        raise HookBroken(
            "calc_cond_batch no longer runs the CALC_COND_BATCH wrappers with (model, conds, x_in, "
            "timestep, model_options)"
        )


def _check_step_wrappers() -> None:
    """PREDICT_NOISE (one sampler step: the guider's ``outer_predict_noise(x, timestep, model_options, seed)``, which
    the pack's wrapper reads the run's state from) and APPLY_MODEL (one UNet call: ``BaseModel.apply_model(x, t,
    c_concat, c_crossattn, control, transformer_options)``, where the pack builds the call's frame)."""
    extension = _module("comfy.patcher_extension")
    _attr(extension, "WrappersMP.PREDICT_NOISE")
    _attr(extension, "WrappersMP.APPLY_MODEL")
    guider_class = _attr(_module("comfy.samplers"), "CFGGuider")
    outer_predict_noise = _attr(guider_class, "outer_predict_noise")
    _accepts(outer_predict_noise, positional=("self", "x", "timestep", "model_options"))
    _source_mentions(outer_predict_noise, "PREDICT_NOISE")
    _source_mentions(_attr(guider_class, "__call__"), "outer_predict_noise")
    apply_model = _attr(_module("comfy.model_base"), "BaseModel.apply_model")
    _accepts(apply_model, positional=("self", "x", "t", "c_concat", "c_crossattn", "control", "transformer_options"))
    _source_mentions(apply_model, "APPLY_MODEL")


def _check_model_options_clone() -> None:
    clone_options = _attr(_module("comfy.model_patcher"), "create_model_options_clone")
    original = {"transformer_options": {"patches_replace": {"attn1": {}}}}
    copied = clone_options(original)
    copied.setdefault("transformer_options", {})["moma"] = 1
    if "moma" in original["transformer_options"]:
        raise HookBroken("create_model_options_clone no longer copies transformer_options")


def _check_model_sampling() -> None:
    import torch

    sampling = _module("comfy.model_sampling")
    discrete = _attr(sampling, "ModelSamplingDiscrete")
    for name in ("timestep", "sigma", "percent_to_sigma", "sigma_max", "sigma_min"):
        _attr(discrete, name)
    schedule = discrete()
    top, bottom = float(schedule.sigma_max), float(schedule.sigma_min)
    start, middle, end = (float(schedule.percent_to_sigma(percent)) for percent in (0.0, 0.5, 1.0))
    if not (start >= top > middle > bottom and end == 0.0):
        raise HookBroken(
            f"ModelSamplingDiscrete.percent_to_sigma(0, 0.5, 1) = {start}, {middle}, {end}: no longer "
            f"from sigma_max ({top}) or above down to 0"
        )
    if abs(float(schedule.timestep(torch.tensor([top])).reshape(-1)[0]) - 999.0) > 0.5:
        raise HookBroken("ModelSamplingDiscrete.timestep(sigma_max) is no longer 999 (SD1.5's 0..999 timesteps)")


def _check_model_patcher_construction() -> None:
    model_management = _module("comfy.model_management")
    _attr(model_management, "LoadedModel.model_loaded_memory")
    patcher = _tiny_patcher()
    for name in ("model", "load_device", "model_options"):
        _attr(patcher, name)


def _check_folder_paths() -> None:
    folder_paths = _module("folder_paths")
    for name in (
        "models_dir",
        "folder_names_and_paths",
        "get_folder_paths",
        "get_filename_list",
        "get_input_directory",
        "get_output_directory",
        "get_save_image_path",
    ):
        _attr(folder_paths, name)
    if not isinstance(folder_paths.folder_names_and_paths, dict):
        raise HookBroken("folder_paths.folder_names_and_paths is no longer a dict")
    _accepts(folder_paths.get_save_image_path, positional=("filename_prefix", "output_dir"))


def _check_progress_bar() -> None:
    utils = _module("comfy.utils")
    _accepts(_attr(utils, "ProgressBar.__init__"), positional=("self", "total"))
    _accepts(_attr(utils, "ProgressBar.update_absolute"), positional=("self", "value", "total"))


def _model_management(*names: str) -> Callable[[], None]:
    def check() -> None:
        model_management = _module("comfy.model_management")
        for name in names:
            _attr(model_management, name)

    return check


def _check_tokenizer() -> None:
    tokenizer = _attr(_module("comfy.sd1_clip"), "SDTokenizer")
    _accepts(tokenizer.__init__, "embedding_directory")
    _attr(tokenizer, "tokenize_with_weights")


def _check_reference_pass() -> None:
    _attr(_module("comfy.ldm.models.autoencoder"), "DiagonalGaussianRegularizer")
    base = _attr(_module("comfy.model_base"), "BaseModel")
    _accepts(base.apply_model, "c_crossattn", "transformer_options")
    _attr(base, "process_latent_in")
    vae = _attr(_module("comfy.sd"), "VAE")
    _source_mentions(
        vae.__init__,
        "self.process_input",
        "self.vae_dtype",
        "self.output_device",
        "self.patcher",
        "self.first_stage_model",
    )


def _check_executor() -> None:
    execution = _module("execution")
    _accepts(_attr(execution, "PromptExecutor.__init__"), "cache_type", "cache_args", positional=("self", "server"))
    _attr(execution, "CacheType.CLASSIC")
    _source_mentions(execution.PromptExecutor, "self.success", "self.status_messages", "self.history_result")
    if not inspect.iscoroutinefunction(_attr(execution, "validate_prompt")):
        raise HookBroken("execution.validate_prompt is no longer a coroutine function")
    nodes = _module("nodes")
    _accepts(_attr(nodes, "init_extra_nodes"), "init_custom_nodes", "init_api_nodes")
    for name in ("NODE_CLASS_MAPPINGS", "LOADED_MODULE_DIRS"):
        _attr(nodes, name)
    for name in ("set_progress_bar_enabled", "set_progress_bar_global_hook"):
        _attr(_module("comfy.utils"), name)
    folder_paths = _module("folder_paths")
    for name in (
        "set_output_directory",
        "set_input_directory",
        "set_temp_directory",
        "exists_annotated_filepath",
        "get_directory_by_type",
    ):
        _attr(folder_paths, name)
    _attr(_module("comfy.options"), "enable_args_parsing")
    args = _attr(_module("comfy.cli_args"), "args")
    for name in ("cpu", "force_fp32", "base_directory", "output_directory", "fp16_unet", "fp8_e4m3fn_unet"):
        _attr(args, name)


HOOKS: tuple[Hook, ...] = (
    Hook(
        f"comfy_api.{API_VERSION} (ComfyExtension, io.ComfyNode, io.Schema, io.NodeOutput, io.Custom, inputs)",
        EVERY_NODE,
        _check_node_api,
    ),
    Hook(
        "attn1/attn2 replace patches (comfy.ldm.modules.attention.BasicTransformerBlock: 3-tuple key, then 2-tuple)",
        (APPLY, GRAB),
        _check_attention_lookup,
    ),
    Hook(
        "comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, attn_precision=, transformer_options=)",
        (APPLY, GRAB),
        _check_optimized_attention,
    ),
    Hook("comfy.model_patcher.ModelPatcher.set_model_patch_replace", (APPLY,), _check_patch_replace),
    Hook(
        "comfy.patcher_extension.CallbacksMP.ON_CLONE (add_callback_with_key, get_callbacks, clone)",
        (APPLY,),
        _check_clone_callbacks,
    ),
    Hook(
        "comfy.patcher_extension.WrappersMP.OUTER_SAMPLE / CALC_COND_BATCH (add_wrapper_with_key, CFGGuider, "
        "calc_cond_batch)",
        (APPLY,),
        _check_wrappers,
    ),
    Hook(
        "comfy.patcher_extension.WrappersMP.PREDICT_NOISE / APPLY_MODEL (CFGGuider.outer_predict_noise, "
        "BaseModel.apply_model)",
        (APPLY,),
        _check_step_wrappers,
    ),
    Hook("comfy.model_patcher.create_model_options_clone", (APPLY,), _check_model_options_clone),
    Hook(
        "comfy.model_sampling.ModelSamplingDiscrete (percent_to_sigma, timestep, sigma_max)",
        (APPLY, GRAB),
        _check_model_sampling,
    ),
    Hook(
        "comfy.model_patcher.ModelPatcher(model, load_device=, offload_device=)",
        (ENCODER,),
        _check_model_patcher_construction,
    ),
    Hook(
        "folder_paths (models_dir, folder_names_and_paths, get_folder_paths, get_filename_list, input/output "
        "directories, get_save_image_path)",
        (LOADER, MASKER, TEXT, SAVE, LOAD, APPLY),
        _check_folder_paths,
    ),
    Hook("comfy.utils.ProgressBar(total).update_absolute(value, total)", (ENCODER, MASKER), _check_progress_bar),
    Hook(
        "comfy.model_management (sampling and loading)",
        (APPLY, GRAB, ENCODER, MASKER),
        _model_management(
            "load_models_gpu",
            "intermediate_device",
            "throw_exception_if_processing_interrupted",
            "get_torch_device",
            "soft_empty_cache",
        ),
    ),
    Hook(
        "comfy.model_management (LLaVA placement)",
        (ENCODER,),
        _model_management(
            "minimum_inference_memory",
            "get_free_memory",
            "current_loaded_models",
            "free_memory",
            "text_encoder_offload_device",
        ),
    ),
    Hook("comfy.sd1_clip.SDTokenizer(embedding_directory=).tokenize_with_weights", (APPLY, TEXT), _check_tokenizer),
    Hook(
        "the reference pass (BaseModel.apply_model(c_crossattn=, transformer_options=), the SD1.5 VAE's parts)",
        (GRAB,),
        _check_reference_pass,
    ),
)

RUNNER_HOOKS: tuple[Hook, ...] = (
    Hook(
        "execution.PromptExecutor(server, cache_type=, cache_args=), validate_prompt, nodes.init_extra_nodes, "
        "folder_paths and comfy.cli_args as the runner sets them",
        (RUNNER,),
        _check_executor,
    ),
)


def comfyui_version() -> str:
    """ComfyUI's own version string (``comfyui_version.__version__``), or 'unknown'."""
    try:
        return str(importlib.import_module("comfyui_version").__version__)
    except Exception:
        return "unknown"


def run_checks(hooks: Sequence[Hook]) -> ContractReport:
    """Run ``hooks``' checks (each one isolated: an unexpected error marks its hook broken, with the error)."""
    broken: dict[str, str] = {}
    for hook in hooks:
        try:
            hook.check()
        except HookBroken as error:
            broken[hook.name] = str(error)
        except Exception as error:
            broken[hook.name] = f"its check failed: {type(error).__name__}: {error}"
    return ContractReport(comfyui_version(), broken, tuple(hooks))


_REPORT: ContractReport | None = None


def check_host(*, refresh: bool = False) -> ContractReport:
    """The pack's hooks, checked once per process (``refresh`` checks again); one log line if any is broken."""
    global _REPORT
    if _REPORT is None or refresh:
        _REPORT = run_checks(HOOKS)
        if not _REPORT.ok:
            log.error("[ComfyUI-MoMA] %s", _REPORT.summary())
    return _REPORT


def require(node: str) -> None:
    """Raise a MomaError naming the broken hooks if ``node`` needs one (checks the host on first use)."""
    broken = check_host().broken_for(node)
    if broken:
        problems = "; ".join(f"{name}: {reason}" for name, reason in broken.items())
        raise MomaError(
            f"{node} cannot run on this ComfyUI ({comfyui_version()}): {problems}. Update ComfyUI-MoMA, "
            f"or use a ComfyUI listed in its docs/compatibility.md (the pack's log says so at start-up)."
        )


__all__ = [
    "HOOKS",
    "RUNNER_HOOKS",
    "ContractReport",
    "Hook",
    "HookBroken",
    "check_host",
    "comfyui_version",
    "require",
    "run_checks",
]
