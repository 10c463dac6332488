"""Where the CUDA libraries that Corral loads at run time are.

The C++ core dlopens cuBLASLt on its first GPU product (csrc/cuda/cublaslt.h says why it is not
linked) from the file named by CORRAL_CUBLASLT_LIBRARY, else from the loader's search path. The
`nvidia-cublas` pip package (`pip install corral[cuda]`) installs it into site-packages, where no
search path looks: `import corral` points the variable there.
"""

from __future__ import annotations

import importlib.util
import os

CUBLASLT_VARIABLE = "CORRAL_CUBLASLT_LIBRARY"


def pip_cublaslt() -> str | None:
    """The nvidia-cublas package's nvidia/cu13/lib/libcublasLt.so.13, or None without it. Finds the
    `nvidia` namespace package's folders without importing anything."""
    spec = importlib.util.find_spec("nvidia")
    folders = spec.submodule_search_locations if spec else None
    for folder in folders or []:
        path = os.path.join(folder, "cu13", "lib", "libcublasLt.so.13")
        if os.path.isfile(path):
            return path
    return None


def point_to_pip_cublaslt() -> None:
    """Sets CORRAL_CUBLASLT_LIBRARY to the pip package's library unless the variable is set already.
    Cheap: nothing is loaded here."""
    if not os.environ.get(CUBLASLT_VARIABLE):
        path = pip_cublaslt()
        if path:
            os.environ[CUBLASLT_VARIABLE] = path
