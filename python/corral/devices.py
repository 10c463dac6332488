"""Which devices Corral can run on here, and their memory: CUDA is asked through cuda-python
(cuda.bindings.runtime), the same runtime the C++ core uses."""

from __future__ import annotations

from corral import _core


def cuda_index(device: str) -> int | None:
    """N of a CUDA device's name ('cuda' is 0, 'cuda:N' is N); None for any other name."""
    kind, colon, index = device.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        return None
    return int(index or 0)


def _runtime():
    try:
        from cuda.bindings import runtime
    except ImportError as e:  # cuda-python is a dependency; a broken install still gets a clean error
        raise _core.DeviceError(f"cuda-python is not importable ({e}); pip install cuda-python") from e
    return runtime


def _call(runtime, result, what: str):
    """The values of a cuda.bindings call, or DeviceError with the driver's message."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != runtime.cudaError_t.cudaSuccess:
        _, message = runtime.cudaGetErrorString(err)
        raise _core.DeviceError(f"{what}: {message.decode() if isinstance(message, bytes) else message}")
    return values


def _cuda_count(runtime) -> int:
    if not _core.cuda_backend_built():
        return 0
    result = runtime.cudaGetDeviceCount()
    return result[1] if result[0] == runtime.cudaError_t.cudaSuccess else 0


def devices() -> list[str]:
    """Usable devices, CPU first: e.g. ['cpu', 'cuda:0'] on a machine with one GPU and a build
    with the CUDA backend."""
    try:
        count = _cuda_count(_runtime())
    except _core.DeviceError:  # no cuda-python: the C++ core's own count
        count = _core.cuda_device_count()
    return ["cpu"] + [f"cuda:{i}" for i in range(count)]


def memory_info(device: str = "cuda") -> tuple[int, int]:
    """(free, total) bytes of a GPU's memory now. DeviceError naming the reason when there is no
    such device (no CUDA backend in this build, the driver's message, no GPU); InvalidInputError
    for a name that is not 'cuda' or 'cuda:N'."""
    index = cuda_index(device)
    if index is None:
        raise _core.InvalidInputError(f"device={device!r} is not 'cuda' or 'cuda:N'")
    if not _core.cuda_backend_built():
        raise _core.DeviceError(f"device={device!r}: this build of Corral has no CUDA backend")
    runtime = _runtime()
    (count,) = _call(runtime, runtime.cudaGetDeviceCount(), f"device={device!r}: no CUDA device")
    if index >= count:
        raise _core.DeviceError(f"device={device!r}: no such CUDA device ({count} here)")
    _call(runtime, runtime.cudaSetDevice(index), f"device={device!r}")
    free, total = _call(runtime, runtime.cudaMemGetInfo(), f"device={device!r}: memory information")
    return int(free), int(total)
