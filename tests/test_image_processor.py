"""corral.image_processor against independent references: torch's own antialiased bilinear resize,
the torch recipe of shared/docs/llama4-vision.md §8 (bit-exact with transformers'
Llama4ImageProcessor), transformers' own canvas/size functions and convert_to_rgb, and Pillow."""

import ast
import base64
import collections
import functools
import importlib.util
import io
import json
import math
import pathlib
import types

import numpy as np
import pytest
import torch
from PIL import Image

from corral import ConfigError, InvalidInputError
from corral.image_processor import (
    ImageProcessorConfig,
    ProcessedImage,
    load_image,
    preprocess,
    resize_bilinear_antialias,
)

from tiny_vision import REF_LUT, ref_preprocess, torch_resize


def smooth(h, w, rng):
    """Gradients with a little noise (resampling differences show on smooth content)."""
    y, x = np.ogrid[0:h, 0:w]
    base = np.empty((h, w, 3), np.float32)
    base[:, :, 0] = 255 * x / max(w - 1, 1)
    base[:, :, 1] = 255 * y / max(h - 1, 1)
    base[:, :, 2] = 127 + 120 * np.sin(x / 7 + y / 11)
    return np.clip(base + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)


def noise(h, w, rng):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Resize

RESIZE_CASES = [
    # (H, W) -> (h, w): large and small downscales, upscales, 1-pixel sides, identity, non-square
    (4000, 3000, 336, 336),
    (3000, 4000, 252, 336),
    (2000, 90, 2016, 90),
    (1000, 800, 1008, 806),
    (1000, 800, 336, 336),
    (1700, 3264, 875, 1680),
    (337, 1000, 336, 997),
    (336, 336, 336, 336),
    (70, 120, 196, 336),
    (200, 300, 224, 336),
    (500, 100, 336, 336),
    (1, 1, 336, 336),
    (1, 1, 1, 1),
    (1, 500, 1, 7),
    (500, 1, 3, 1),
    (2, 3, 1, 1),
    (5, 5, 1, 1),
    (1, 100000, 1, 1),
    (3, 60000, 2, 7),
    (2, 1, 4000, 1),
    (1, 1, 1, 4000),
    (7, 9, 7, 9),
    (7, 9, 7, 20),
    (7, 9, 30, 9),
    (56, 56, 55, 57),
    (56, 56, 28, 112),
    (99, 144, 231, 336),
    (23, 23, 56, 56),
    (640, 480, 320, 240),
    (641, 479, 337, 1),
    (100, 100, 33, 67),
    (13, 1024, 13, 3),
    (1024, 13, 1000, 13),
    (1000, 7, 999, 8),
    (4096, 2, 1, 2),
]


@pytest.mark.parametrize("content", ["noise", "smooth"])
@pytest.mark.parametrize("H,W,h,w", RESIZE_CASES)
def test_resize_matches_torch(H, W, h, w, content, rng):
    img = (noise if content == "noise" else smooth)(H, W, rng)
    got = resize_bilinear_antialias(img, h, w)
    want = torch_resize(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), h, w).numpy()
    assert got.dtype == np.uint8 and got.shape == (h, w, 3)
    assert np.array_equal(got, want.transpose(1, 2, 0))


def test_resize_matches_torch_random_sizes():
    rng = np.random.default_rng(1234)
    for _ in range(60):
        H, W = (int(v) for v in rng.integers(1, 1200, 2))
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        img = noise(H, W, rng) if rng.random() < 0.5 else smooth(H, W, rng)
        want = torch_resize(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), h, w).numpy()
        assert np.array_equal(resize_bilinear_antialias(img, h, w), want.transpose(1, 2, 0)), (H, W, h, w)


def test_resize_other_channel_counts(rng):
    img = noise(40, 70, rng)[:, :, :1]
    want = torch_resize(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), 13, 101).numpy()
    assert np.array_equal(resize_bilinear_antialias(img, 13, 101), want.transpose(1, 2, 0))


def test_resize_rejects_bad_arguments():
    with pytest.raises(ValueError):
        resize_bilinear_antialias(np.zeros((4, 4), np.uint8), 2, 2)
    with pytest.raises(ValueError):
        resize_bilinear_antialias(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ValueError):
        resize_bilinear_antialias(np.zeros((4, 4, 3), np.uint8), 0, 2)


# ---------------------------------------------------------------------------------------------
# Full preprocessing

DOC_SIZES = [(70, 120), (200, 300), (336, 336), (500, 100), (337, 1000), (1000, 800), (2000, 90)]


def check_preprocess(img, tile, max_tiles, to_max=False):
    config = ImageProcessorConfig(tile_size=tile, max_patches=max_tiles, resize_to_max_canvas=to_max)
    got = preprocess(img, config)
    want, (r, c) = ref_preprocess(img, tile, max_tiles, to_max)
    assert (got.rows, got.cols) == (r, c)
    assert got.pixel_values.dtype == np.float32
    assert got.pixel_values.shape == want.shape == (got.num_tiles, 3, tile, tile)
    assert np.array_equal(got.pixel_values, want)
    return got


@pytest.mark.parametrize("size", DOC_SIZES + [(1700, 3264), (23, 23), (99, 144), (1, 1), (3000, 4)])
def test_preprocess_matches_reference_336(size, rng):
    check_preprocess(smooth(*size, rng), 336, 16)


def test_preprocess_matches_reference_336_random_sizes():
    rng = np.random.default_rng(99)
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(1, 2500, 2))
        check_preprocess(noise(h, w, rng), 336, 16)


@pytest.mark.parametrize("size", [(70, 120), (30, 40), (56, 56), (200, 60), (113, 300), (1000, 9), (23, 23), (23, 46)])
def test_preprocess_matches_reference_56(size, rng):
    check_preprocess(noise(*size, rng), 56, 4)


def test_preprocess_matches_reference_56_random_sizes():
    rng = np.random.default_rng(7)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        check_preprocess(smooth(h, w, rng), 56, 4)


@pytest.mark.parametrize("tile,max_tiles,size", [(336, 16, (70, 120)), (336, 16, (500, 100)), (336, 16, (1000, 800)),
                                                 (56, 4, (30, 40)), (56, 4, (200, 60)), (56, 4, (7, 300))])
def test_preprocess_resize_to_max_canvas(tile, max_tiles, size, rng):
    check_preprocess(noise(*size, rng), tile, max_tiles, to_max=True)


@pytest.mark.parametrize(
    "size,grid",
    [((70, 120), (1, 1)), ((200, 300), (1, 1)), ((336, 336), (1, 1)), ((500, 100), (2, 1)),
     ((337, 1000), (2, 3)), ((1000, 800), (3, 3)), ((2000, 90), (6, 1))],
)
def test_doc_examples(size, grid, rng):
    out = check_preprocess(noise(*size, rng), 336, 16)
    assert (out.rows, out.cols) == grid
    assert out.num_tiles == (grid[0] * grid[1] + 1 if grid[0] * grid[1] > 1 else 1)


def test_doc_example_details(rng):
    # 70x120 is upscaled to 196x336 and padded: rows 196.. are padding, exactly -1
    small = preprocess(noise(70, 120, rng), ImageProcessorConfig())
    assert small.pixel_values.shape == (1, 3, 336, 336)
    assert np.all(small.pixel_values[0, :, 196:, :] == -1.0)
    assert not np.all(small.pixel_values[0, :, 195, :] == -1.0)
    # 500x100 is not resized, only padded to 672x336: the first tile's left 100 columns are the image
    img = noise(500, 100, rng)
    tall = preprocess(img, ImageProcessorConfig())
    assert tall.pixel_values.shape == (3, 3, 336, 336)
    first_tile = REF_LUT[torch.from_numpy(img[:336]).long()].numpy().transpose(2, 0, 1)
    assert np.array_equal(tall.pixel_values[0, :, :, :100], first_tile)
    assert np.all(tall.pixel_values[0, :, :, 100:] == -1.0)


def test_lut_values():
    # through preprocess: a 336x336 image is one tile with no resize, so the values are LUT[pixel]
    img = np.arange(336 * 336 * 3).reshape(336, 336, 3).astype(np.uint8)
    values = preprocess(img, ImageProcessorConfig()).pixel_values[0].transpose(1, 2, 0)
    lut = {int(p): float(v) for p, v in zip(img.ravel(), values.ravel())}
    assert lut[0] == -1.0 and lut[255] == 1.0 and lut[127] == -0.00390625
    assert all(lut[p] == float(REF_LUT[p]) for p in range(256))
    # values are bf16 numbers: the low 16 bits of each float32 are zero
    assert not np.any(values.view(np.uint32) & 0xFFFF)


def test_num_tiles():
    assert ProcessedImage(np.zeros((1, 3, 2, 2), np.float32), 1, 1).num_tiles == 1
    assert ProcessedImage(np.zeros((3, 3, 2, 2), np.float32), 2, 1).num_tiles == 3
    assert ProcessedImage(np.zeros((17, 3, 2, 2), np.float32), 4, 4).num_tiles == 17


def load_transformers_llama4_functions():
    """transformers' own get_best_fit, find_supported_resolutions and get_max_res_without_distortion,
    taken from its source: the module itself imports torchvision, which does not import here."""
    spec = importlib.util.find_spec("transformers")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "models" / "llama4" / "image_processing_llama4.py"
    wanted = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions", "get_best_fit"}
    tree = ast.parse(path.read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    module = ast.Module(body=functions, type_ignores=[])
    from transformers.image_utils import SizeDict

    names = {"torch": torch, "math": math, "defaultdict": collections.defaultdict, "lru_cache": functools.lru_cache,
             "SizeDict": SizeDict}
    exec(compile(module, str(path), "exec"), names)
    assert wanted <= names.keys()
    return types.SimpleNamespace(**names)


def test_canvas_and_size_match_transformers():
    """The canvas and resize-size arithmetic against transformers' own functions (run as its
    _preprocess runs them), on every size up to 2 tiles at 56/4 and a grid at 336/16."""
    from corral.image_processor import _best_canvas, _size_in_canvas

    hf = load_transformers_llama4_functions()
    from transformers.image_utils import SizeDict

    cases = [(56, 4, h, w) for h in range(1, 113) for w in range(1, 113)]
    cases += [(336, 16, h, w) for h in range(1, 4000, 97) for w in range(1, 4000, 89)]
    cases += [(336, 16, h, w) for h in range(1, 400, 9) for w in range(1, 400, 7)]
    for to_max in (False, True):
        for tile, max_tiles, h, w in cases:
            size = SizeDict(height=tile, width=tile)
            sizes = torch.tensor(hf.find_supported_resolutions(max_num_chunks=max_tiles, patch_size=size))
            canvas = hf.get_best_fit((h, w), sizes, resize_to_max_canvas=to_max)
            target = canvas if to_max else (min(max(h, tile), canvas[0]), min(max(w, tile), canvas[1]))
            nh, nw = hf.get_max_res_without_distortion((h, w), target)
            config = ImageProcessorConfig(tile_size=tile, max_patches=max_tiles, resize_to_max_canvas=to_max)
            got_canvas = _best_canvas(h, w, config)
            assert got_canvas == (int(canvas[0]), int(canvas[1])), (tile, max_tiles, h, w, to_max)
            assert _size_in_canvas(h, w, got_canvas, config) == (max(int(nh), 1), max(int(nw), 1)), (tile, h, w, to_max)


# ---------------------------------------------------------------------------------------------
# load_image


def hf_convert_to_rgb(image):
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(image, return_numpy=True)


def encode(array, fmt, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_load_rgba_composited_onto_white(rng):
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent
    rgba[0, 1] = (10, 20, 30, 255)  # opaque
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black
    image = Image.fromarray(rgba, mode="RGBA")
    got = load_image(image)
    assert got.dtype == np.uint8 and got.shape == (9, 11, 3)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == [10, 20, 30]
    assert 126 <= got[0, 2, 0] <= 128
    assert np.array_equal(got, hf_convert_to_rgb(image))


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "PA", "1", "I", "YCbCr", "RGB"])
def test_load_pil_modes_like_transformers(mode, rng):
    image = Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), mode="RGBA").convert(mode)
    got = load_image(image)
    assert got.shape == (6, 5, 3) and got.dtype == np.uint8
    assert np.array_equal(got, hf_convert_to_rgb(image))
    if mode in ("L", "P", "CMYK"):
        assert np.array_equal(got, np.asarray(image.convert("RGB")))


def test_load_p_with_transparency(rng):
    image = Image.fromarray(noise(8, 8, rng)).convert("P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])
    got = load_image(image)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(got, hf_convert_to_rgb(image))


def test_load_16_bit_grayscale():
    image = Image.fromarray((np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4))
    assert image.mode.startswith("I;16")
    assert np.array_equal(load_image(image), hf_convert_to_rgb(image))


def test_load_png_is_exact(rng):
    img = noise(17, 23, rng)
    assert np.array_equal(load_image(encode(img, "PNG")), img)
    assert np.array_equal(load_image(bytearray(encode(img, "PNG"))), img)
    assert np.array_equal(load_image(encode(img, "BMP")), img)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF"])
def test_load_lossy_bytes_decode_like_pillow(fmt, rng):
    img = smooth(30, 40, rng)
    data = encode(img, fmt)
    got = load_image(data)
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    if fmt != "GIF":  # GIF is palettized: only the decode above is exact
        assert np.abs(got.astype(int) - img).mean() < 8


def test_load_data_url(rng):
    img = noise(5, 6, rng)
    url = "data:image/png;base64," + base64.b64encode(encode(img, "PNG")).decode()
    assert np.array_equal(load_image(url), img)


def test_load_file_path_and_url(tmp_path, rng):
    img = noise(7, 3, rng)
    path = tmp_path / "an image.png"
    path.write_bytes(encode(img, "PNG"))
    assert np.array_equal(load_image(path), img)
    assert np.array_equal(load_image(str(path)), img)
    assert np.array_equal(load_image(path.as_uri()), img)  # file:///.../an%20image.png


def test_load_numpy(rng):
    img = noise(4, 5, rng)
    assert np.array_equal(load_image(img), img)
    gray = img[:, :, 0]
    assert np.array_equal(load_image(gray), np.stack([gray] * 3, axis=2))
    # a non-contiguous view is accepted
    assert np.array_equal(load_image(img[:, ::2]), img[:, ::2])


def test_preprocess_accepts_every_input_kind(tmp_path, rng):
    img = noise(90, 130, rng)
    want, _ = ref_preprocess(img, 56, 4)
    png = encode(img, "PNG")
    (tmp_path / "x.png").write_bytes(png)
    config = ImageProcessorConfig(tile_size=56, max_patches=4)
    for source in (img, Image.fromarray(img), png, tmp_path / "x.png",
                   "data:image/png;base64," + base64.b64encode(png).decode()):
        assert np.array_equal(preprocess(source, config).pixel_values, want)


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(), "could not be decoded"),
        (b"", "empty"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((0, 5), np.uint8), "empty"),
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 4), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (42, "int"),
        (None, "NoneType"),
        ("https://example.com/cat.png", "not fetched"),
        ("data:image/png,notbase64", "base64"),
        ("data:text/plain;base64,aGVsbG8=", "media type"),
        ("data:image/png;base64,!!!!", "base64 payload is invalid"),
        ("data:image/png;base64,aGVsbG8=", "could not be decoded"),
        ("data:image/png;base64,", "empty"),
        ("data:image/png;base64", "form"),
        ("file://otherhost/tmp/x.png", "remote host"),
    ],
)
def test_load_errors(bad, message):
    with pytest.raises(InvalidInputError, match=message):
        load_image(bad)


def test_load_errors_for_files(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(InvalidInputError, match="missing.png"):
        load_image(missing)
    with pytest.raises(InvalidInputError, match="missing.png"):
        load_image(missing.as_uri())
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    with pytest.raises(InvalidInputError, match="notes.txt.*could not be decoded"):
        load_image(str(text))
    with pytest.raises(InvalidInputError, match=str(tmp_path.name)):
        load_image(tmp_path)  # a directory
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(encode(np.zeros((64, 64, 3), np.uint8) + 7, "PNG")[:60])
    with pytest.raises(InvalidInputError, match="cut.png"):
        load_image(truncated)


def test_load_empty_pil_image():
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


# ---------------------------------------------------------------------------------------------
# ImageProcessorConfig.from_model_dir

HF_V4_PREPROCESSOR = {  # the shape transformers writes for Llama4ImageProcessor
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Llama4ImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "max_patches": 9, "processor_class": "Llama4Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
    "resize_to_max_canvas": True, "size": {"height": 56, "width": 56},
}


def write_json(path, value):
    path.write_text(json.dumps(value))


def test_config_v4_layout(tmp_path):
    write_json(tmp_path / "preprocessor_config.json", HF_V4_PREPROCESSOR)
    # a v4 processor_config.json holds processor settings only
    write_json(tmp_path / "processor_config.json", {"patch_size": 14, "processor_class": "Llama4Processor"})
    assert ImageProcessorConfig.from_model_dir(tmp_path, 336) == ImageProcessorConfig(56, 9, True)


def test_config_v5_layout(tmp_path):
    write_json(tmp_path / "processor_config.json",
               {"image_processor": dict(HF_V4_PREPROCESSOR, max_patches=4), "patch_size": 14})
    assert ImageProcessorConfig.from_model_dir(str(tmp_path), 336) == ImageProcessorConfig(56, 4, True)
    # the nested one wins over a preprocessor_config.json, as in transformers
    write_json(tmp_path / "preprocessor_config.json", dict(HF_V4_PREPROCESSOR, max_patches=16))
    assert ImageProcessorConfig.from_model_dir(tmp_path, 336).max_patches == 4


def test_config_fallback(tmp_path):
    assert ImageProcessorConfig.from_model_dir(tmp_path, 56) == ImageProcessorConfig(56, 16, False)
    write_json(tmp_path / "preprocessor_config.json", {"max_patches": 2})  # no size: transformers' 336
    assert ImageProcessorConfig.from_model_dir(tmp_path, 56) == ImageProcessorConfig(336, 2, False)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("preprocessor_config.json", "{not json", "preprocessor_config.json"),
        ("preprocessor_config.json", "[1, 2]", "JSON object"),
        ("preprocessor_config.json", json.dumps({"size": {"height": 56, "width": 112}}), "'size'.*square"),
        ("preprocessor_config.json", json.dumps({"size": {"shortest_edge": 56}}), "'size'"),
        ("preprocessor_config.json", json.dumps({"size": 56}), "'size'"),
        ("preprocessor_config.json", json.dumps({"max_patches": "16"}), "'max_patches'"),
        ("preprocessor_config.json", json.dumps({"max_patches": 0}), "'max_patches'"),
        ("preprocessor_config.json", json.dumps({"resize_to_max_canvas": "yes"}), "'resize_to_max_canvas'"),
        ("preprocessor_config.json", json.dumps({"image_mean": [0.48, 0.45, 0.4]}), "'image_mean'"),
        ("preprocessor_config.json", json.dumps({"resample": 3}), "'resample'"),
        ("preprocessor_config.json", json.dumps({"do_normalize": False}), "'do_normalize'"),
        ("processor_config.json", json.dumps({"image_processor": [1]}), "processor_config.json.*'image_processor'"),
        ("processor_config.json", json.dumps({"image_processor": {"max_patches": None}}), "'max_patches'"),
    ],
)
def test_config_malformed(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        ImageProcessorConfig.from_model_dir(tmp_path, 336)
    assert isinstance(info.value, ConfigError)
    assert name in str(info.value)


def test_config_validates_fields():
    with pytest.raises(ValueError):
        ImageProcessorConfig(tile_size=0)
    with pytest.raises(ValueError):
        ImageProcessorConfig(max_patches=True)
