import zlib

import numpy as np
import pytest

from corral import _core


def pytest_collection_modifyitems(config, items):
    # CUDA tests skip (and are reported as skipped, not passed) without a usable GPU.
    if _core.cuda_device_count() == 0:
        skip = pytest.mark.skip(reason=f"no usable CUDA device ({_core.cuda_status()})")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=_core.ops.cpu_isas())
def cpu_isa(request):
    """Runs a test once per CPU ISA level this machine supports (avx512, avx2, generic)."""
    previous = _core.ops.cpu_isa()
    _core.ops.set_cpu_isa(request.param)
    yield request.param
    _core.ops.set_cpu_isa(previous)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh inputs per test, reproducible per run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
