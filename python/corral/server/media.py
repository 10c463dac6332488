"""What image URLs a client of the server may send: data: URLs; http(s) URLs, downloaded with a
time and size limit; file:// URLs only below --allowed-local-media-path (vLLM's rule: a client
must not read the server's files by default)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from corral.server.errors import bad_request

FETCH_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 20 << 20


def open_image_url(url: object, allowed_local_dir: str | None) -> object:
    """What corral.image_processor.load_image should read for an image part's url; 400 otherwise."""
    if not isinstance(url, str):
        return url  # an image object given through the Python API, not from JSON
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        return url
    if scheme in ("http", "https"):
        return _download(url)
    if scheme == "file":
        if allowed_local_dir is None:
            raise bad_request("file:// image URLs are refused: the server was not started with "
                              "--allowed-local-media-path", "messages")
        path = Path(os.path.realpath(unquote(urlparse(url).path)))
        root = Path(os.path.realpath(allowed_local_dir))
        if root != path and root not in path.parents:
            raise bad_request(f"file:// image URLs must lie under {root}", "messages")
        return str(path)
    raise bad_request(f"image URL scheme {scheme or '(none)'!r} is not supported (data:, http(s):, file:)", "messages")


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
            data = response.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad_request(f"cannot fetch image {url}: {e}", "messages") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise bad_request(f"image {url} is over {MAX_IMAGE_BYTES >> 20} MiB", "messages")
    return data
