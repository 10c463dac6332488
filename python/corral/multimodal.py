"""Image prompts: Llama 4's image token layout, and images taken from vLLM-style
`multi_modal_data` and OpenAI chat content parts.

A prompt's text holds one `<|image|>` placeholder per image; each is replaced by the image's
tokens (transformers' Llama4Processor layout):

    1 tile:   <|image_start|> <|image|> <|patch|> x K <|image_end|>
    R x C:    <|image_start|> (rows of (<|patch|> x K, <|tile_x_separator|> between tiles),
              each row ended by <|tile_y_separator|>) <|image|> <|patch|> x K <|image_end|>

with K features per tile; the engine puts the image's features at the <|patch|> tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from corral import _core
from corral.image_processor import ImageProcessorConfig, ProcessedImage, preprocess

PLACEHOLDER = "<|image|>"
_SPECIALS = ("<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>", PLACEHOLDER, "<|patch|>")


@dataclass(frozen=True)
class ImageTokenIds:
    start: int
    end: int
    tile_x: int
    tile_y: int
    image: int
    patch: int


def image_token_ids(rows: int, cols: int, per_tile: int, ids: ImageTokenIds) -> list[int]:
    """The tokens of one image of rows x cols tiles (a global tile follows when there are several)."""
    out = [ids.start]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                out += [ids.patch] * per_tile
                if c < cols - 1:
                    out.append(ids.tile_x)
            out.append(ids.tile_y)
    return out + [ids.image] + [ids.patch] * per_tile + [ids.end]


def images_of(prompt: Mapping[str, Any], what: str) -> list[Any]:
    """The images of a prompt dict's multi_modal_data ({"image": image or list}); [] if none."""
    data = prompt.get("multi_modal_data")
    if data is None:
        return []
    if not isinstance(data, Mapping):
        raise _core.InvalidInputError(f"{what}['multi_modal_data'] must be a dict like {{'image': ...}}")
    unknown = sorted(set(data) - {"image"})
    if unknown:
        raise _core.InvalidInputError(f"{what}['multi_modal_data'] has {unknown}: only 'image' is supported")
    images = data.get("image")
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def chat_images(conversation: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """The conversation with every image content part as {"type": "image"} (the chat template
    renders it as <|image|>), and the images in order: OpenAI's {"type": "image_url", "image_url":
    {"url": "data:..." | "file://..."}} (or a plain URL string) and {"type": "image", "image": img}."""
    images: list[Any] = []
    out = []
    for i, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                if not isinstance(url, str):
                    raise _core.InvalidInputError(f"messages[{i}].content[{j}].image_url must hold a url string")
                images.append(url)
            elif kind == "image" and ("image" in part or "url" in part):
                images.append(part.get("image", part.get("url")))
            else:
                parts.append(part)
                continue
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, images


class ImagePrompts:
    """Expands a model's image prompts: preprocessing as its image processor, tokens as its
    tokenizer and config name them."""

    def __init__(self, model_path: str | os.PathLike, vision: Mapping[str, int], tokenizer) -> None:
        self.vision = dict(vision)
        self.enabled = self.vision["hidden_size"] > 0
        self.tokenizer = tokenizer
        self._ids: ImageTokenIds | None = None
        self._config: ImageProcessorConfig | None = None
        self._model_path = model_path

    @property
    def ids(self) -> ImageTokenIds:
        if self._ids is None:
            if self.tokenizer is None:
                raise _core.InvalidInputError("image prompts need the model's tokenizer (its image tokens)")
            found = {t: self.tokenizer.token_to_id(t) for t in _SPECIALS}
            missing = [t for t, i in found.items() if i is None]
            if missing:
                raise _core.InvalidInputError(f"the tokenizer has no {', '.join(missing)}: it cannot lay out images")
            ids = ImageTokenIds(*found.values())
            if ids.patch != self.vision["image_token_id"]:
                raise _core.ConfigError(
                    f"the tokenizer's <|patch|> is {ids.patch}, the config's image_token_index "
                    f"{self.vision['image_token_id']}: they must agree"
                )
            self._ids = ids
        return self._ids

    @property
    def processor(self) -> ImageProcessorConfig:
        if self._config is None:
            self._config = ImageProcessorConfig.from_model_dir(self._model_path, self.vision["image_size"])
            if self._config.tile_size != self.vision["image_size"]:
                raise _core.ConfigError(
                    f"the image processor's tile size {self._config.tile_size} differs from vision_config.image_size "
                    f"{self.vision['image_size']}"
                )
        return self._config

    def check_count(self, count: int, what: str) -> None:
        """InvalidInputError if the model takes no images and there are some."""
        if count and not self.enabled:
            raise _core.InvalidInputError(
                f"{what} has {count} images, and this model takes none (no vision encoder, or "
                "max_images_per_prompt=0)"
            )

    def process(self, images: Sequence[Any], what: str) -> list[ProcessedImage]:
        self.check_count(len(images), what)
        out = []
        for k, image in enumerate(images):
            try:
                out.append(preprocess(image, self.processor))
            except _core.CorralError as e:
                raise type(e)(f"{what} image {k}: {e}") from None
        return out

    def expand_text(self, text: str, images: Sequence[ProcessedImage], what: str) -> str:
        """The text with its i-th <|image|> replaced by image i's tokens (as text)."""
        pieces = text.split(PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise _core.InvalidInputError(
                f"{what} has {len(pieces) - 1} {PLACEHOLDER} placeholders for {len(images)} images"
            )
        out = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            out += [self._image_text(image), piece]
        return "".join(out)

    def expand_ids(self, ids: list[int], images: Sequence[ProcessedImage], what: str) -> list[int]:
        """Token ids with one <|image|> id per image, each expanded; ids already holding the images'
        <|patch|> tokens are left as they are (the engine checks their count)."""
        if not images or self.vision["image_token_id"] in ids:  # no tokenizer needed for these
            return ids
        places = [i for i, t in enumerate(ids) if t == self.ids.image]
        if len(places) != len(images):
            raise _core.InvalidInputError(f"{what} has {len(places)} {PLACEHOLDER} tokens for {len(images)} images")
        out: list[int] = []
        last = 0
        for place, image in zip(places, images):
            out += ids[last:place] + self._image_ids(image)
            last = place + 1
        return out + ids[last:]

    def _image_ids(self, image: ProcessedImage) -> list[int]:
        return image_token_ids(image.rows, image.cols, self.vision["tokens_per_tile"], self.ids)

    def _image_text(self, image: ProcessedImage) -> str:
        return self.tokenizer.decode(self._image_ids(image), skip_special_tokens=False)


def pixel_arrays(images: Sequence[ProcessedImage]) -> list[np.ndarray]:
    return [np.ascontiguousarray(i.pixel_values, dtype=np.float32) for i in images]
