"""Which devices Corral can run on here."""

from __future__ import annotations

from corral import _core


def devices() -> list[str]:
    """Usable devices, CPU first: e.g. ['cpu', 'cuda:0'] on a machine with one GPU and a build
    with the CUDA backend."""
    return ["cpu"] + [f"cuda:{i}" for i in range(_core.cuda_device_count())]
