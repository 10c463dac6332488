"""Helpers for comparing Corral's kernels with float64 numpy references."""

import numpy as np

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to `dtype` (round to nearest even) as Corral takes it: float32 data, or uint16 bits."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16)
    if dtype == "bfloat16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype(np.uint16)
    raise ValueError(dtype)


def from_bits(b: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 values of data produced by to_bits."""
    if dtype == "float32":
        return np.asarray(b, dtype=np.float64)
    if dtype == "float16":
        return b.view(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    raise ValueError(dtype)


def rounded(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(bits for Corral, float64 values of those bits for the reference)."""
    bits = to_bits(x, dtype)
    return bits, from_bits(bits, dtype)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (shapes must match exactly: no broadcasting)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
