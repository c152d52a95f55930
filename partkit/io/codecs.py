"""Decode and encode sample fields (images, label maps, arrays, JSON) with clear errors."""
from __future__ import annotations

import functools
import io
import json
import warnings
from typing import Any, Optional

import numpy as np
from PIL import Image

from ..errors import BadSample, missing_field

__all__ = [
    "IMAGE_EXTS", "MAX_PIXELS", "image_field", "decode_image", "decode_label_map", "encode_png",
    "decode_npy", "encode_npy", "decode_json", "encode_json", "get_field",
]

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp", "bmp", "tif", "tiff")
# Images above this many pixels are refused before decoding (a 20,000 x 20,000 header
# would otherwise allocate 1.2 GB); raise it with PARTKIT_MAX_PIXELS.
MAX_PIXELS = 8192 * 8192
# Images with a side below this are refused: nothing can be segmented into parts there.
MIN_IMAGE_SIDE = 8
Image.MAX_IMAGE_PIXELS = None  # we check sizes ourselves, with a message that says what to do


def _max_pixels() -> int:
    import os

    return int(os.environ.get("PARTKIT_MAX_PIXELS", MAX_PIXELS))


def get_field(sample: dict, field: str) -> bytes:
    if field not in sample:
        raise missing_field(sample["__key__"], field)
    return sample[field]


def image_field(sample: dict) -> str:
    """The name of the sample's image field (``jpg``, ``png``, ...)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise missing_field(sample["__key__"], "jpg")


def _open_checked(data: bytes, key: str, what: str, min_side: int = 1) -> Image.Image:
    if len(data) == 0:
        raise BadSample(key, f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Exception:
        raise BadSample(key, f"{what} is not a readable image") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise BadSample(key, f"{what} has zero size ({w}x{h})")
    if min(w, h) < min_side:
        raise BadSample(key, f"{what} is only {w}x{h} pixels, below the {min_side}-pixel minimum side; "
                             "drop it or pass --skip-bad")
    if w * h > _max_pixels():
        raise BadSample(
            key, f"{what} is {w}x{h}, above the {_max_pixels()}-pixel limit; downscale it or raise PARTKIT_MAX_PIXELS"
        )
    return im


def decode_image(sample: dict, min_size: int = 1) -> np.ndarray:
    """The sample's image as H x W x 3 uint8 RGB (grayscale, RGBA, palette, 16-bit converted)."""
    key = sample["__key__"]
    ext = image_field(sample)
    im = _open_checked(sample[ext], key, f"image field '{ext}'", MIN_IMAGE_SIDE)
    try:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            hi = arr.max() if arr.size else 1.0
            arr = (arr * (255.0 / max(hi, 1.0))).round().astype(np.uint8)
            im = Image.fromarray(arr, mode="L")
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = ((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
            im = Image.fromarray(arr, mode="L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        out = np.asarray(im)
    except BadSample:
        raise
    except Exception:
        raise BadSample(key, f"image field '{ext}' is truncated or corrupt") from None
    if min(out.shape[:2]) < min_size:
        raise BadSample(key, f"image is {out.shape[1]}x{out.shape[0]}, smaller than the model's {min_size}-pixel patch")
    return out


def decode_label_map(sample: dict, field: str) -> np.ndarray:
    """A label-map PNG field as an H x W integer array (uint8 or uint16 as stored)."""
    key = sample["__key__"]
    im = _open_checked(get_field(sample, field), key, f"label map '{field}'")
    try:
        if im.mode == "P":
            arr = np.array(im)  # palette indices are the labels
        elif im.mode in ("L", "I;16", "I;16B", "I;16L", "I"):
            arr = np.array(im)
        else:
            raise BadSample(key, f"label map '{field}' has mode {im.mode}; expected a single-channel PNG of label ids")
    except BadSample:
        raise
    except Exception:
        raise BadSample(key, f"label map '{field}' is truncated or corrupt") from None
    if arr.dtype == np.int32:
        arr = arr.astype(np.uint16) if arr.max(initial=0) < 65536 and arr.min(initial=0) >= 0 else arr
    return arr


def encode_png(labels: np.ndarray) -> bytes:
    """Encode a label map losslessly: uint8 when ids fit, else uint16."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError("label ids must lie in 0..65535")
    dtype = np.uint8 if labels.size == 0 or labels.max() < 256 else np.uint16
    buf = io.BytesIO()
    Image.fromarray(labels.astype(dtype)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_image_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()


def all_finite(arr: np.ndarray) -> bool:
    """``np.isfinite(arr).all()``; for float16 (which numpy has no fast isfinite for, 5x slower than float32)
    a test of the exponent bits: a value is NaN or inf exactly when all five are set."""
    if arr.dtype == np.float16 and arr.dtype.isnative and arr.flags.c_contiguous:
        return not bool(((arr.view(np.uint16) & np.uint16(0x7C00)) == np.uint16(0x7C00)).any())
    return bool(np.isfinite(arr).all())


@functools.lru_cache(maxsize=256)
def _npy_header(prefix: bytes) -> tuple:
    """``(shape, fortran order, dtype)`` of a ``.npy`` header (magic, length and header dict): parsed by numpy
    (a Python literal, ~0.1 ms) once per distinct header; a stream's samples mostly share theirs."""
    f = io.BytesIO(prefix)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if f.tell() != len(prefix):
        raise ValueError("malformed .npy header")
    return shape, fortran, dtype


def _read_npy(data: bytes) -> np.ndarray:
    """``np.load`` of ``.npy`` bytes without pickles, parsing the header in place (one copy of the data)."""
    if data[:6] == b"\x93NUMPY" and data[6:8] in (b"\x01\x00", b"\x02\x00"):
        size = 2 if data[6] == 1 else 4
        offset = 8 + size + int.from_bytes(data[8:8 + size], "little")
        shape, fortran, dtype = _npy_header(bytes(data[:offset]))
    else:
        return np.load(io.BytesIO(data), allow_pickle=False)
    if dtype.hasobject:
        raise ValueError("object arrays need pickles")
    count = int(np.prod(shape, dtype=np.int64))
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy()
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def decode_npy(sample: dict, field: str, ndim: Optional[int] = None, expect: str = "") -> np.ndarray:
    """A ``.npy`` field as a numeric array: refuses strings/objects, NaN/inf and (with ``ndim``) the wrong rank."""
    key = sample["__key__"]
    data = get_field(sample, field)
    try:
        arr = _read_npy(data)
    except Exception:
        raise BadSample(key, f"field '{field}' is not a valid .npy array") from None
    what = f"; expected {expect}" if expect else ""
    if arr.dtype.kind not in "biuf":
        raise BadSample(key, f"field '{field}' holds {arr.dtype} values, not numbers{what}")
    if ndim is not None and arr.ndim != ndim:
        raise BadSample(key, f"field '{field}' has shape {arr.shape}{what or f'; expected {ndim} dimensions'}")
    if arr.dtype.kind == "f" and not all_finite(arr):
        raise BadSample(key, f"field '{field}' holds NaN or inf values; regenerate it (float16 overflow?)")
    return arr


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_json(sample: dict, field: str = "json") -> Any:
    key = sample["__key__"]
    data = get_field(sample, field)
    try:
        return json.loads(data)
    except Exception:
        raise BadSample(key, f"field '{field}' is not valid JSON") from None


def encode_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, compact separators, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
