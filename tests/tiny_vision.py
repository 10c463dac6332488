"""Tiny random multimodal Llama 4 checkpoints (Llama4ForConditionalGeneration, seeded) and an
independent reference of the image preprocessing and prompt layout, after the recipe in
shared/docs/llama4-vision.md section 8: torch's antialiased bilinear resize (bit-exact with
transformers' Llama4ImageProcessor), the bf16 normalization table, tiles and the global tile, and
the <|image_start|> ... <|image_end|> token layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tiny_tokenizer
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, text_config
from transformers import Llama4Config, Llama4ForConditionalGeneration

# Vision configs that differ where implementations go wrong: head_dim (16, 12), grid (4, 6, 8),
# the pixel shuffle's factor (2, 4), layers, widths.
VISION_VARIANTS = {
    "tile56": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                   image_size=56, patch_size=14, projector_input_dim=48, projector_output_dim=48,
                   vision_output_dim=48),
    "tile42": dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=192,
                   image_size=42, patch_size=7, projector_input_dim=40, projector_output_dim=40,
                   vision_output_dim=40),
    "quarter": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                    image_size=32, patch_size=4, pixel_shuffle_ratio=0.25, projector_input_dim=24,
                    projector_output_dim=24, vision_output_dim=24),
}

# The image special tokens, appended to the tiny tokenizer's vocabulary (it has <|image|>).
IMAGE_TOKENS = ["<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|patch|>"]
IMAGE_START, IMAGE_END, TILE_X, TILE_Y, PATCH = range(VOCAB, VOCAB + 5)
IMAGE = tiny_tokenizer.SPECIAL_TOKENS.index("<|image|>")
MM_VOCAB = VOCAB + 8


def build(variant: str, path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **text) -> Path:
    """A seeded random multimodal model with the tiny tokenizer (plus the image tokens) beside it.
    Weights are scaled up so that every nonlinearity of the tower matters."""
    torch.manual_seed(seed)
    tc = text_config("scout", vocab_size=MM_VOCAB, **text).to_dict()
    cfg = Llama4Config(text_config=tc, vision_config=VISION_VARIANTS[variant], image_token_index=PATCH,
                       boi_token_index=IMAGE_START, eoi_token_index=IMAGE_END)
    model = Llama4ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.vision_model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer.save(path)
    tok = json.loads((path / "tokenizer.json").read_text())
    for i, t in enumerate(IMAGE_TOKENS):
        tok["added_tokens"].append(dict(id=VOCAB + i, content=t, single_word=False, lstrip=False, rstrip=False,
                                        normalized=False, special=True))
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return path


def load_reference(path: Path) -> Llama4ForConditionalGeneration:
    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# --- preprocessing, as transformers' Llama4ImageProcessor (torchvision backend) computes it ---
# The reference: the doc's §8 recipe, in torch, parameterized by tile size, max tiles and
# resize_to_max_canvas. Its new-size step is transformers' get_max_res_without_distortion and
# upscale limit written as transformers runs them (the canvas side a torch tensor, the other
# operands Python ints): the recipe's all-float32 shortcut is off by one pixel on some images with
# a side below the tile size (e.g. 23x23 at tile 56).


def torch_resize(chw: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torch's uint8 antialiased bilinear resize of a [C, H, W] tensor."""
    if (h, w) == (1, 1) and chw.shape[0] <= 4:
        # torch's AVX uint8 kernel fails an internal assert on 1x1 outputs with <= 4 channels; with
        # 5 channels it takes its generic uint8 kernel, which computes the same integer sums.
        padded = torch.cat([chw, chw[:5 - chw.shape[0]].expand(5 - chw.shape[0], -1, -1)])
        return torch_resize(padded.contiguous(), h, w)[: chw.shape[0]]
    return F.interpolate(chw[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


REF_LUT = 2 * (torch.arange(256).to(torch.bfloat16) * (1 / 255) - torch.tensor(0.5, dtype=torch.bfloat16)).float()


def ref_canvases(max_tiles, tile):
    d = {}
    for n in range(max_tiles, 0, -1):
        for a in sorted(k for k in range(1, n + 1) if n % k == 0):
            d.setdefault(a / (n // a), []).append((a * tile, n // a * tile))
    return [c for v in d.values() for c in v]


def ref_best_canvas(h, w, tile, max_tiles, to_max):
    canvases = torch.tensor(ref_canvases(max_tiles, tile))
    scales = torch.minimum(canvases[:, 0] / h, canvases[:, 1] / w)  # int64 tensor / int: float32
    up = scales[scales >= 1]
    sel = (up.max() if to_max else up.min()) if len(up) else scales.max()
    chosen = canvases[scales == sel]
    return chosen[torch.argmin(chosen[:, 0] * chosen[:, 1])]  # a tensor, as in transformers


def ref_new_size(h, w, canvas, tile, to_max):
    th, tw = (canvas[0], canvas[1]) if to_max else (min(max(h, tile), canvas[0]), min(max(w, tile), canvas[1]))
    sw, sh = tw / w, th / h
    if sw < sh:
        nh, nw = min(math.floor(h * sw), th), tw
    else:
        nh, nw = th, min(math.floor(w * sh), tw)
    return max(int(nh), 1), max(int(nw), 1)


def ref_preprocess(hwc: np.ndarray, tile: int, max_tiles: int, to_max: bool = False):
    img = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    _, h, w = img.shape
    canvas_hw = ref_best_canvas(h, w, tile, max_tiles, to_max)
    nh, nw = ref_new_size(h, w, canvas_hw, tile, to_max)
    ch, cw = int(canvas_hw[0]), int(canvas_hw[1])
    canvas = torch.zeros(3, ch, cw, dtype=torch.uint8)
    canvas[:, :nh, :nw] = torch_resize(img, nh, nw)
    r, c = ch // tile, cw // tile
    t = REF_LUT[canvas.long()].reshape(3, r, tile, c, tile).permute(1, 3, 0, 2, 4).reshape(r * c, 3, tile, tile)
    if r * c > 1:
        t = torch.cat([t, REF_LUT[torch_resize(img, tile, tile).long()][None]])
    return t.numpy(), (r, c)


def preprocess(image: np.ndarray, tile: int, max_tiles: int) -> tuple[np.ndarray, int, int]:
    """uint8 HWC RGB -> (pixel_values float32 [tiles, 3, T, T], rows, cols)."""
    pv, (r, c) = ref_preprocess(image, tile, max_tiles)
    return pv, r, c


def image_token_ids(rows: int, cols: int, per_tile: int) -> list[int]:
    """The token layout of one image (transformers' Llama4Processor._prompt_split_image)."""
    s = [IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                s += [PATCH] * per_tile + ([TILE_X] if x < cols - 1 else [])
            s += [TILE_Y]
    return s + [IMAGE] + [PATCH] * per_tile + [IMAGE_END]


def tokens_per_tile(variant: str) -> int:
    v = VISION_VARIANTS[variant]
    grid = v["image_size"] // v["patch_size"]
    return int(grid * grid * v.get("pixel_shuffle_ratio", 0.5) ** 2)


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random image (gradients plus noise): resizing it is not averaging noise away."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


@torch.no_grad()
def reference(model, input_ids: list[int], pixel_values: np.ndarray | None):
    """transformers' logits [T, vocab] (float64) for one prompt with its images' tiles."""
    pv = None if pixel_values is None else torch.from_numpy(pixel_values)
    return model(input_ids=torch.tensor([input_ids]), pixel_values=pv).logits[0].double().numpy()
