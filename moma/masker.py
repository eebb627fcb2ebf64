"""Object masks for reference images: rembg (from an explicit ONNX file), RGBA alpha or a given mask,
then threshold / grow / invert, and the white-background picture LLaVA sees (spec §1, §3.1).

Images are ComfyUI-style tensors, [H, W, C] or [B, H, W, C] float in 0..1 with C = 1 (grey),
2 (grey + alpha), 3 (RGB) or 4 (RGBA); masks are [H, W] or [B, H, W] float in 0..1, 1 = object.
rembg is imported lazily: the alpha and input-mask paths never need it, nor a model file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import MomaError
from .images import image_to_rgb_uint8

log = logging.getLogger(__name__)

# Where rembg's own sessions download their models from; MOMA_REMBG_BASE_URL replaces it (a mirror).
REMBG_RELEASE_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/"
BASE_URL_ENV = "MOMA_REMBG_BASE_URL"
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RembgModel:
    """A rembg session that runs from one ONNX file: its session name, release file and checksum."""

    name: str  # rembg session name, e.g. "u2net"
    release_file: str  # file name in rembg's GitHub release
    checksum: str  # "md5:<hex>" or "sha256:<hex>", as in rembg's session source

    @property
    def file_name(self) -> str:
        """The name we store it under in models/rembg (the same name rembg itself uses)."""
        return f"{self.name}.onnx"

    def url(self) -> str:
        base = os.environ.get(BASE_URL_ENV) or REMBG_RELEASE_URL
        return base.rstrip("/") + "/" + self.release_file


# Single-file, local, prompt-free rembg sessions (URLs and checksums from rembg's sessions/*.py).
# Left out: sam (two files, needs prompts), u2net_cloth_seg (3 garment classes, not one object),
# *_custom (arbitrary user files), birefnet-general-fp16 (converted locally, extra dependency),
# bria-rmbg (CC BY-NC licence: not auto-downloaded), withoutbg / atlascloud (remote services).
REMBG_MODELS: dict[str, RembgModel] = {
    m.name: m
    for m in (
        RembgModel("u2net", "u2net.onnx", "md5:60024c5c889badc19c04ad937298a77b"),
        RembgModel("u2netp", "u2netp.onnx", "md5:8e83ca70e441ab06c318d82300c84806"),
        RembgModel("u2net_human_seg", "u2net_human_seg.onnx", "md5:c09ddc2e0104f800e3e1bb4652583d1f"),
        RembgModel("silueta", "silueta.onnx", "md5:55e59e0d8062d2f5d013f4725ee84782"),
        RembgModel("isnet-general-use", "isnet-general-use.onnx", "md5:fc16ebd8b0c10d971d3513d564d01e29"),
        RembgModel("isnet-anime", "isnet-anime.onnx", "md5:6f184e756bb3bd901c8849220a83e38e"),
        RembgModel("birefnet-general", "BiRefNet-general-epoch_244.onnx", "md5:7a35a0141cbbc80de11d9c9a28f52697"),
        RembgModel(
            "birefnet-general-lite",
            "BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx",
            "md5:4fab47adc4ff364be1713e97b7e66334",
        ),
        RembgModel("birefnet-portrait", "BiRefNet-portrait-epoch_150.onnx", "md5:c3a64a6abf20250d090cd055f12a3b67"),
        RembgModel("birefnet-dis", "BiRefNet-DIS-epoch_590.onnx", "md5:2d4d44102b446f33a4ebb2e56c051f2b"),
        RembgModel("birefnet-hrsod", "BiRefNet-HRSOD_DHU-epoch_115.onnx", "md5:c017ade5de8a50ff0fd74d790d268dda"),
        RembgModel("birefnet-cod", "BiRefNet-COD-epoch_125.onnx", "md5:f6d0d21ca89d287f17e7afe9f5fd3b45"),
        RembgModel(
            "birefnet-massive",
            "BiRefNet-massive-TR_DIS5K_TR_TEs-epoch_420.onnx",
            "md5:33e726a2136a3d59eb0fdf613e31e3e9",
        ),
    )
}
DEFAULT_REMBG_MODEL = "u2net"

ProgressCallback = Callable[[int, "int | None"], None]  # (bytes done, total bytes or None)


def rembg_model(name: str) -> RembgModel:
    """The table entry for ``name``, or a MomaError listing the supported names."""
    try:
        return REMBG_MODELS[name]
    except KeyError:
        raise MomaError(f"Unknown rembg model {name!r}. Supported: {', '.join(REMBG_MODELS)}.") from None


# --- model files -------------------------------------------------------------------------------------


def find_model_file(name: str, folders: Sequence[str | os.PathLike]) -> Path | None:
    """The model's file in the first folder holding it, as ``<name>.onnx`` or the release file name."""
    model = rembg_model(name)
    for folder in folders:
        for file_name in (model.file_name, model.release_file):
            path = Path(folder) / file_name
            if path.is_file():
                return path
    return None


def download_model(
    name: str,
    folder: str | os.PathLike,
    progress: ProgressCallback | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download the model into ``folder/<name>.onnx``, verifying rembg's checksum; MomaError if it fails.

    The file is written as ``.partial`` and renamed only once complete and verified.
    """
    model = rembg_model(name)
    folder = Path(folder)
    target = folder / model.file_name
    url = model.url()
    partial = target.with_name(target.name + ".partial")
    algorithm, expected = model.checksum.split(":", 1)
    digest = hashlib.new(algorithm)
    log.info("Downloading rembg model %s from %s to %s", model.file_name, url, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if digest.hexdigest() != expected:
            raise MomaError(
                f"Downloaded {model.file_name} from {url} but its {algorithm} is {digest.hexdigest()}, "
                f"not {expected} as rembg expects: the download is corrupt or the file changed. Nothing was "
                f"saved; retry, or fetch it by hand into {folder}."
            )
        os.replace(partial, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise MomaError(
            f"The rembg model file {model.file_name} is not in {folder} and could not be downloaded "
            f"({err}). Download it from {url} and save it as {target} (or pick another model, or connect "
            f"a MASK input so no rembg model is needed)."
        ) from err
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_model_file(
    name: str,
    folders: Sequence[str | os.PathLike],
    progress: ProgressCallback | None = None,
) -> Path:
    """The model's file from ``folders``; if absent, download it into ``folders[0]``."""
    found = find_model_file(name, folders)
    if found is not None:
        return found
    if not folders:
        raise MomaError("No rembg model folder is configured (ComfyUI's models/rembg).")
    return download_model(name, folders[0], progress=progress)


# --- rembg sessions ----------------------------------------------------------------------------------

_session_lock = threading.Lock()
_session_cache: dict[tuple, Any] = {}  # one entry: the last (file, providers) session


def load_rembg_session(name: str, model_path: str | os.PathLike, providers: Sequence[str] | None = None) -> Any:
    """rembg's own session class for ``name``, reading its ONNX from ``model_path`` (never downloading).

    ``providers``: onnxruntime execution providers, or None to let rembg choose (CUDA when available).
    The last session is cached while the file is unchanged.
    """
    model = rembg_model(name)
    path = Path(model_path)
    try:
        stat = path.stat()
    except OSError as err:
        raise MomaError(f"Cannot read the rembg model file {path}: {err}.") from err
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, name, tuple(providers or ()))
    with _session_lock:
        if key in _session_cache:
            return _session_cache[key]
        session_class = _rembg_session_class(model.name)
        # rembg's BaseSession.__init__ loads `cls.download_models()`; this subclass answers with our file,
        # so the session's own normalize/predict run unchanged and nothing is fetched into the home folder.
        pinned = type(
            f"Pinned{session_class.__name__}",
            (session_class,),
            {"download_models": classmethod(lambda cls, *args, **kwargs: str(path))},
        )
        import onnxruntime as ort

        kwargs = {"providers": list(providers)} if providers else {}
        try:
            session = pinned(model.name, ort.SessionOptions(), **kwargs)
        except Exception as err:  # onnxruntime raises its own types for a bad file
            raise MomaError(
                f"onnxruntime could not load the rembg model {path} ({type(err).__name__}: {err}). The file "
                f"is probably incomplete or not {model.name}: delete it (it is downloaded again from "
                f"{model.url()}) or replace it."
            ) from err
        _session_cache.clear()
        _session_cache[key] = session
        return session


def _rembg_session_class(name: str) -> type:
    try:
        import onnxruntime  # noqa: F401  (rembg's bg.py calls sys.exit(1) when it is missing)
    except ImportError as err:
        raise MomaError(
            "onnxruntime is not installed, and rembg needs it: pip install onnxruntime (or onnxruntime-gpu)."
        ) from err
    try:
        from rembg.sessions import sessions_class
    except ImportError as err:
        raise MomaError(f"rembg is not installed or broken ({err}): pip install 'rembg>=2.0.50'.") from err
    for session_class in sessions_class:
        if session_class.name() == name:
            return session_class
    raise MomaError(
        f"The installed rembg has no {name!r} session: upgrade it (pip install -U rembg) or pick another model."
    )


def rembg_mask(image: torch.Tensor, session: Any) -> torch.Tensor:
    """rembg's soft object mask [H, W] in 0..1 for one image [H, W, C] (colour channels only)."""
    picture = Image.fromarray(image_to_rgb_uint8(image))
    try:
        predicted = session.predict(picture)[0]
    except Exception as err:
        raise MomaError(
            f"rembg model {getattr(session, 'model_name', '?')} failed on a {picture.width}x{picture.height} "
            f"image ({type(err).__name__}: {err}): is the ONNX file really that model?"
        ) from err
    mask = np.asarray(predicted.convert("L"), dtype=np.float32) / 255.0
    if mask.shape != (picture.height, picture.width):
        mask = (
            np.asarray(predicted.convert("L").resize(picture.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        )
    return torch.from_numpy(np.nan_to_num(mask)).to(image.device)


# --- masks from the image itself ---------------------------------------------------------------------


def alpha_cutout(image: torch.Tensor) -> torch.Tensor | None:
    """The alpha channel [H, W] when it holds a real cut-out (some pixels under 0.5, some at or over),
    else None (no alpha, or all opaque / all transparent, which says nothing about the object)."""
    channels = image.shape[-1]
    if channels not in (2, 4):
        return None
    alpha = image[..., -1].float()
    if bool((alpha < 0.5).any()) and bool((alpha >= 0.5).any()):
        return alpha.clamp(0.0, 1.0)
    return None


def refine_mask(mask: torch.Tensor, threshold: float = 0.5, grow: int = 0, invert: bool = False) -> torch.Tensor:
    """Threshold, grow/shrink, then invert a mask [..., H, W] in 0..1.

    - ``threshold`` > 0 binarises (mask > threshold); 0 keeps the soft values.
    - ``grow`` > 0 dilates the object by that many pixels, < 0 erodes it, over a square (Chebyshev)
      neighbourhood: a w×h box grown by g becomes (w+2g)×(h+2g). Pixels outside the image count as
      neither object nor background, so the border does not erode an object touching it.
    - ``invert`` is applied last, so grow always refers to the object before inversion.
    """
    if not 0.0 <= threshold <= 1.0:
        raise MomaError(f"threshold must be in 0..1, got {threshold}.")
    out = mask.float().clamp(0.0, 1.0)
    if threshold > 0.0:
        out = (out > threshold).float()
    if grow:
        out = _dilate(out, grow) if grow > 0 else -_dilate(-out, -grow)
    if invert:
        out = 1.0 - out
    return out


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    # Square max filter, done separably (rows then columns): O(radius) per pixel instead of O(radius²).
    # max_pool2d pads with -inf, so pixels outside the image never win the max.
    shape = mask.shape
    k = 2 * radius + 1
    x = mask.reshape(-1, 1, shape[-2], shape[-1])
    x = F.max_pool2d(x, kernel_size=(1, k), stride=1, padding=(0, radius))
    x = F.max_pool2d(x, kernel_size=(k, 1), stride=1, padding=(radius, 0))
    return x.reshape(shape)


def white_background(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """image·mask + 1·(1−mask) as RGB [..., H, W, 3]: the object on pure white, as LLaVA sees it."""
    rgb = _colour(image).float()
    if rgb.shape[-1] == 1:
        rgb = rgb.expand(*rgb.shape[:-1], 3)
    m = mask.to(rgb.device, rgb.dtype).unsqueeze(-1)
    return rgb * m + (1.0 - m)


# --- the whole masker --------------------------------------------------------------------------------


def object_masks(
    images: torch.Tensor,
    load_session: Callable[[], Any],
    input_mask: torch.Tensor | None = None,
    threshold: float = 0.5,
    grow: int = 0,
    invert: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Object masks [B, H, W] and white-background images [B, H, W, 3] for images [B, H, W, C].

    Per item the raw mask comes from ``input_mask`` when given (refined, rembg not run), else from a
    real alpha cut-out, else from rembg via ``load_session()`` (called at most once, only when needed).
    A batch of 1 on either side is broadcast to the other's batch size.
    """
    images = _as_batch(images, 4, "image", "[B, H, W, C]")
    batch, height, width, channels = images.shape
    if channels not in (1, 2, 3, 4):
        raise MomaError(
            f"The image has {channels} channels (shape {list(images.shape)}); expected 1 (grey), 2 (grey + "
            f"alpha), 3 (RGB) or 4 (RGBA) in the last dimension."
        )
    masks_in = None
    if input_mask is not None:
        masks_in = _as_batch(input_mask, 3, "mask", "[B, H, W]").to(images.device).float()
        if masks_in.shape[0] != batch and 1 not in (masks_in.shape[0], batch):
            raise MomaError(
                f"The mask batch ({masks_in.shape[0]}) does not match the image batch ({batch}); give one "
                f"mask per image or a single mask for all."
            )
        if masks_in.shape[-2:] != (height, width):
            log.info(
                "Resizing the input mask from %s to the image size %sx%s", list(masks_in.shape[-2:]), width, height
            )
            masks_in = F.interpolate(masks_in.unsqueeze(1), size=(height, width), mode="bilinear").squeeze(1)
        batch = max(batch, masks_in.shape[0])

    loaded: list[Any] = []

    def get_session() -> Any:
        if not loaded:
            loaded.append(load_session())
        return loaded[0]

    masks, whites = [], []
    for i in range(batch):
        image = images[i if images.shape[0] > 1 else 0]
        if masks_in is not None:
            raw = masks_in[i if masks_in.shape[0] > 1 else 0]
        else:
            raw = alpha_cutout(image)
            if raw is None:
                raw = rembg_mask(image, get_session())
        mask = refine_mask(raw, threshold, grow, invert)
        if not bool(mask.any()):
            log.warning("MoMA Object Masker: the mask of image %d is empty (no object found).", i)
        masks.append(mask)
        whites.append(white_background(image, mask))
    return torch.stack(masks), torch.stack(whites)


def _as_batch(t: torch.Tensor, dims: int, what: str, expected: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise MomaError(f"The {what} must be a torch tensor {expected}, got {type(t).__name__}.")
    if t.dim() == dims - 1:
        t = t.unsqueeze(0)
    if t.dim() != dims or 0 in t.shape:
        raise MomaError(f"The {what} has shape {list(t.shape)}; expected {expected}.")
    return t


def _colour(image: torch.Tensor) -> torch.Tensor:
    """Drop the alpha channel: [.., 1|3] stays, [.., 2] -> grey, [.., 4] -> RGB."""
    return image[..., :1] if image.shape[-1] in (1, 2) else image[..., :3]
