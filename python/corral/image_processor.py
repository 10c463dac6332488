"""Llama 4 image preprocessing, bit-exact with Hugging Face transformers' `Llama4ImageProcessor`
(torchvision backend, CPU), in numpy + Pillow.

The steps (spec: shared/docs/llama4-vision.md §2) are: pick a canvas of R x C tiles, resize the image
into it keeping the aspect ratio (antialiased bilinear, uint8), pad with black at the bottom and
right, normalize through a 256-entry bf16 table, cut row-major T x T tiles, and append a global
T x T thumbnail tile when R*C > 1.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corral._core import ConfigError, InvalidInputError
from corral.json_file import read_json_object


@dataclass(frozen=True)
class ImageProcessorConfig:
    tile_size: int = 336  # the processor's size {height, width}; must be square
    max_patches: int = 16  # the most tiles an image is cut into (the global tile not counted)
    resize_to_max_canvas: bool = False

    def __post_init__(self):
        for name in ("tile_size", "max_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageProcessorConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.resize_to_max_canvas, bool):
            raise ValueError(
                f"ImageProcessorConfig.resize_to_max_canvas must be a bool, got {self.resize_to_max_canvas!r}"
            )

    @classmethod
    def from_model_dir(cls, folder: str | os.PathLike, tile_size_default: int) -> ImageProcessorConfig:
        """Reads the image processor's settings from a model folder, in transformers' order: the
        "image_processor" object of processor_config.json (v5 layout), else
        preprocessor_config.json (v4 layout; a v4 processor_config.json has no such object).
        Without either, the defaults with tile_size=tile_size_default (the model's
        vision_config.image_size). A file that cannot be used raises ConfigError (a ValueError)
        naming the file and the field. As in transformers, a file without "size" means 336."""
        folder = Path(folder)
        v5_path = folder / "processor_config.json"
        v4_path = folder / "preprocessor_config.json"
        outer = read_json_object(v5_path) if v5_path.is_file() else {}
        if "image_processor" in outer:
            path, settings = v5_path, outer["image_processor"]
            if not isinstance(settings, dict):
                raise ConfigError(f"{path}: field 'image_processor' must be an object, got {type(settings).__name__}")
        elif v4_path.is_file():
            path, settings = v4_path, read_json_object(v4_path)
        else:
            return cls(tile_size=tile_size_default)
        return cls._from_settings(path, settings)

    @classmethod
    def _from_settings(cls, path: Path, settings: dict[str, Any]) -> ImageProcessorConfig:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{path}: field {field!r} {why}, got {settings[field]!r}")

        def positive_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        tile_size = cls.tile_size
        if "size" in settings:
            size = settings["size"]
            if not (isinstance(size, dict) and positive_int(size.get("height")) and positive_int(size.get("width"))):
                raise bad("size", "must be an object with positive integer 'height' and 'width'")
            if size["height"] != size["width"]:
                raise bad("size", "must be square (Llama 4 tiles are square)")
            tile_size = size["height"]
        max_patches = settings.get("max_patches", cls.max_patches)
        if not positive_int(max_patches):
            raise bad("max_patches", "must be a positive integer")
        resize_to_max_canvas = settings.get("resize_to_max_canvas", cls.resize_to_max_canvas)
        if not isinstance(resize_to_max_canvas, bool):
            raise bad("resize_to_max_canvas", "must be true or false")
        # The rest is fixed here (bilinear, x/255, mean = std = 0.5, bf16 arithmetic): a file asking
        # for anything else would be processed differently by transformers, so it is refused.
        for field, expected in _FIXED_SETTINGS.items():
            if field in settings and not _same_setting(settings[field], expected):
                raise bad(field, f"is not supported (only Llama 4's {expected!r})")
        return cls(tile_size=tile_size, max_patches=max_patches, resize_to_max_canvas=resize_to_max_canvas)


_FIXED_SETTINGS: dict[str, Any] = {
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 2,  # PIL's BILINEAR
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _same_setting(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, list):
        return isinstance(value, list) and len(value) == len(expected) and all(map(_same_setting, value, expected))
    # rescale_factor may be written with fewer digits than 1/255 has
    return isinstance(value, (int, float)) and math.isclose(value, expected, rel_tol=1e-9)


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # float32 [num_tiles, 3, T, T]; every value is an exact bf16 number
    rows: int  # R: tile rows of the canvas
    cols: int  # C: tile columns of the canvas

    @property
    def num_tiles(self) -> int:
        """R*C tiles, plus the global tile when there is more than one."""
        return self.rows * self.cols + 1 if self.rows * self.cols > 1 else 1


# ---------------------------------------------------------------------------------------------
# Input decoding


def load_image(image: Any) -> np.ndarray:
    """A uint8 [H, W, 3] RGB array from:
    - a PIL.Image of any mode (converted like transformers: a mode with alpha, or with a
      transparency key, is composited onto white; others go through convert("RGB"));
    - bytes/bytearray holding an encoded image (PNG, JPEG, WebP, GIF, BMP, ...: whatever Pillow
      decodes; the first frame of an animation);
    - a "data:image/<fmt>;base64,..." URL, a "file://" URL, or a filesystem path (str or PathLike);
    - a uint8 numpy array [H, W, 3], or [H, W] grayscale (replicated to 3 channels).
    EXIF orientation is not applied (transformers does not apply it either).
    Anything else raises InvalidInputError saying what was wrong."""
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (bytes, bytearray)):
        return _decode(bytes(image), "the image bytes")
    if isinstance(image, str) and image[:5].lower() == "data:":
        return _decode(_data_url_payload(image), "the data URL's image")
    if isinstance(image, str) and image[:7].lower() == "file://":
        return _read_file(_file_url_path(image))
    if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
        raise InvalidInputError("image URLs are not fetched: pass the image bytes, a data URL or a local file")
    if isinstance(image, (str, os.PathLike)):
        return _read_file(os.fspath(image))
    from PIL import Image

    if isinstance(image, Image.Image):
        return _from_pil(image)
    raise InvalidInputError(
        f"unsupported image input of type {type(image).__name__}: expected a PIL image, encoded bytes, "
        "a data: or file:// URL, a file path, or a uint8 numpy array"
    )


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidInputError(f"an image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim != 3 or array.shape[2] != 3:
        raise InvalidInputError(
            f"an image array must be [H, W, 3] (RGB) or [H, W] (grayscale), got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"the image is empty ({array.shape[0]}x{array.shape[1]})")
    return np.ascontiguousarray(array)


def _from_pil(image) -> np.ndarray:
    from PIL import Image

    if image.width == 0 or image.height == 0:
        raise InvalidInputError(f"the image is empty ({image.height}x{image.width})")
    # transformers' convert_to_rgb (image_transforms.py), kept to the letter: whether to composite
    # is decided from the bands and the transparency key, not from the mode's name.
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (ValueError, OSError) as e:  # a mode Pillow cannot convert, a truncated file
        raise InvalidInputError(f"cannot convert the {image.mode} image to RGB ({e})") from None
    return np.array(rgb, dtype=np.uint8)


def _decode(data: bytes, what: str) -> np.ndarray:
    from PIL import Image

    if not data:
        raise InvalidInputError(f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return _from_pil(image)
    except InvalidInputError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders of untrusted bytes raise many kinds of errors
        raise InvalidInputError(f"{what} could not be decoded as an image ({type(e).__name__}: {e})") from None


def _data_url_payload(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise InvalidInputError("a data URL must have the form data:image/<format>;base64,<data>")
    params = header[5:].split(";")
    media_type = params[0].strip().lower()
    if not media_type.startswith("image/"):
        raise InvalidInputError(f"the data URL's media type {media_type!r} is not an image type")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise InvalidInputError("only base64 data URLs are supported (data:image/<format>;base64,<data>)")
    try:
        # line breaks and spaces are tolerated; any other non-base64 character is an error
        return base64.b64decode("".join(urllib.parse.unquote(payload).split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"the data URL's base64 payload is invalid ({e})") from None


def _file_url_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidInputError(f"file URL {url!r} names a remote host; only local files are read")
    return urllib.request.url2pathname(parsed.path)


def _read_file(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidInputError(f"cannot read image file {path}: {e.strerror or e}") from None
    return _decode(data, f"image file {path}")


# ---------------------------------------------------------------------------------------------
# Resampling


def _axis_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """For one axis of torch's uint8 antialiased bilinear resize: per output index the first input
    index [out] and the fixed-point weights [out, K] (zero past each index's own span), and the
    weights' precision in bits. Mirrors HelperInterpBase::_compute_index_ranges_weights and
    _compute_index_ranges_int16_weights in ATen's native/cpu/UpSampleKernel.cpp, in float64 with
    the same operation order, so that every weight comes out identical."""
    scale = in_size / out_size  # area_pixel_compute_scale: input/output as double
    # The triangle filter's support widens with the downscale factor (that is the antialiasing).
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    # static_cast<int64_t> truncates toward zero
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    count = np.clip(count, 0, taps)
    offsets = np.arange(taps)
    x = np.abs((offsets[None, :] + first[:, None] - center[:, None] + 0.5) * invscale)
    weights = np.where((x < 1.0) & (offsets[None, :] < count[:, None]), 1.0 - x, 0.0)
    # The C++ loop adds the weights left to right; cumsum keeps that order (np.sum would not), and
    # the zeros past the span change nothing.
    total = np.cumsum(weights, axis=1)[:, -1]
    weights = weights / np.where(total != 0.0, total, 1.0)[:, None]
    # The most fractional bits (up to 22) for which the largest weight still fits in an int16.
    w_max = max(float(weights.max()), 0.0)
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = np.floor(0.5 + weights * (1 << precision)).astype(np.int32)  # (int)(0.5 + v), v >= 0
    return first, fixed, precision


def _resample_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass along axis 0 (rows) or 1 (columns) of an [H, W, C] uint8 image: integer
    sums of pixel * weight plus a half, shifted down and clamped to uint8, as torch does."""
    in_size = image.shape[axis]
    first, fixed, precision = _axis_taps(in_size, out_size)
    out_shape = list(image.shape)
    out_shape[axis] = out_size
    acc = np.full(out_shape, 1 << (precision - 1), dtype=np.int32)
    # One gather per tap over all output positions at once; indices past a span have weight 0 and
    # are clamped only to stay in bounds.
    weight_shape = (-1, 1, 1) if axis == 0 else (-1, 1)
    for k in range(fixed.shape[1]):
        if not fixed[:, k].any():
            continue
        src = np.minimum(first + k, in_size - 1)
        acc += np.take(image, src, axis=axis) * fixed[:, k].reshape(weight_shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bilinear_antialias(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a uint8 [H, W, C] image (HWC, channels last) to [height, width, C], bit-exact with
    torch.nn.functional.interpolate(chw[None], size=(height, width), mode="bilinear",
    antialias=True, align_corners=False) on the uint8 CHW tensor (which is what torchvision's
    resize does on CPU): a Pillow-SIMD style separable triangle filter with fixed-point weights,
    the horizontal pass first, each pass rounded to uint8. A pass whose size is unchanged is
    skipped (its weights would be the identity)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 [H, W, C] array, got {image.dtype} {image.shape}")
    if height < 1 or width < 1 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"cannot resize {image.shape[:2]} to {(height, width)}")
    if image.shape[1] != width:
        image = _resample_axis(image, 1, width)
    if image.shape[0] != height:
        image = _resample_axis(image, 0, height)
    return image


# ---------------------------------------------------------------------------------------------
# Tiling


def _candidate_canvases(max_patches: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every canvas of at most max_patches tiles, in the order of transformers'
    find_supported_resolutions (tile counts downward, grouped by aspect ratio in first-seen order);
    the order only decides ties that also tie on area."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_patches, 0, -1):
        for rows in range(1, n + 1):
            if n % rows == 0:
                by_ratio.setdefault(rows / (n // rows), []).append((rows * tile, n // rows * tile))
    return [canvas for group in by_ratio.values() for canvas in group]


def _best_canvas(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """transformers' get_best_fit. The scales are float32 as there: transformers divides a torch
    int64 tensor by a Python int. (float64 picks the same canvas for every size up to 6000x6000
    at 336/16 and 56/4, but float32 is what transformers computes.)"""
    canvases = _candidate_canvases(config.max_patches, config.tile_size)
    f32 = np.float32
    scales = [min(f32(ch) / f32(height), f32(cw) / f32(width)) for ch, cw in canvases]
    upscales = [s for s in scales if s >= 1]
    if upscales:
        chosen = max(upscales) if config.resize_to_max_canvas else min(upscales)
    else:
        chosen = max(scales)
    # the smallest area among the canvases with the chosen scale; the first one on a tie
    return min((c for c, s in zip(canvases, scales) if s == chosen), key=lambda c: c[0] * c[1])


def _size_in_canvas(height: int, width: int, canvas: tuple[int, int], config: ImageProcessorConfig) -> tuple[int, int]:
    """The size the image is resized to before padding: transformers' upscale limit (no side grows
    past max(side, tile) unless resize_to_max_canvas) and get_max_res_without_distortion, with
    transformers' number types, which decide some sizes by one pixel.

    transformers takes each target side either from the canvas (a torch int64 tensor: its ratios,
    products and comparisons are float32) or from Python ints (float64). Python's min() returns
    its first argument on a tie, so the canvas side is used only where it is strictly smaller.
    All-float32 differs for small images (23x23 at tile 56 would give 56x55, not 56x56) and
    all-float64 for large ones (1700x3264 at 336/16 would give 874x1680, not 875x1680)."""
    ch, cw = canvas
    if config.resize_to_max_canvas:
        target_h, target_w, h_f32, w_f32 = ch, cw, True, True
    else:
        limit_h, limit_w = max(height, config.tile_size), max(width, config.tile_size)
        target_h, h_f32 = (ch, True) if ch < limit_h else (limit_h, False)
        target_w, w_f32 = (cw, True) if cw < limit_w else (limit_w, False)
    f32 = np.float32
    scale_w = f32(target_w) / f32(width) if w_f32 else target_w / width
    scale_h = f32(target_h) / f32(height) if h_f32 else target_h / height
    # a float32 tensor compared with a Python float: torch compares in float32
    narrower = f32(scale_w) < f32(scale_h) if (w_f32 or h_f32) else scale_w < scale_h
    if narrower:
        product = f32(height) * scale_w if w_f32 else height * scale_w
        new_h, new_w = min(math.floor(product), target_h), target_w
    else:
        product = f32(width) * scale_h if h_f32 else width * scale_h
        new_h, new_w = target_h, min(math.floor(product), target_w)
    return max(new_h, 1), max(new_w, 1)


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32. Inputs are finite."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def _normalization_table() -> np.ndarray:
    """transformers normalizes in bf16, rounding after each op:
    (u8.to(bf16) * (1/255) - 0.5) / 0.5. Torch's CPU bf16 kernels compute each op in float32 and
    round the result to bf16; the Python scalar 1/255 enters as float32 (not rounded to bf16).
    Dividing by 0.5 is an exact doubling. LUT[0] = -1, LUT[255] = 1, LUT[127] = -0.00390625."""
    x = np.arange(256, dtype=np.float32)
    scaled = _bf16(x * np.float32(1 / 255))
    return 2 * _bf16(scaled - np.float32(0.5))


_LUT = _normalization_table()


def preprocess(image: Any, config: ImageProcessorConfig) -> ProcessedImage:
    """Llama 4 image preprocessing of one image (anything load_image takes): the tiles
    [num_tiles, 3, T, T] in float32 (exact bf16 values) and the canvas' tile grid (R, C)."""
    rgb = load_image(image)
    height, width = rgb.shape[:2]
    tile = config.tile_size
    ch, cw = _best_canvas(height, width, config)
    new_h, new_w = _size_in_canvas(height, width, (ch, cw), config)
    canvas = np.zeros((ch, cw, 3), dtype=np.uint8)  # zero padding, bottom and right
    canvas[:new_h, :new_w] = resize_bilinear_antialias(rgb, new_h, new_w)
    rows, cols = ch // tile, cw // tile
    # [R*T, C*T, 3] -> [R, T, C, T, 3] -> [R, C, 3, T, T]: tile r*C + c covers rows r*T.., cols c*T..
    tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        # the global tile: the original image squeezed to T x T, aspect ratio not kept
        thumbnail = resize_bilinear_antialias(rgb, tile, tile).transpose(2, 0, 1)
        tiles = np.concatenate([tiles, thumbnail[None]])
    return ProcessedImage(pixel_values=_LUT[tiles], rows=rows, cols=cols)
