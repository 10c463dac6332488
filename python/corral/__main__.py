"""`python -m corral`: the corral command; `python -m corral --cmake-dir` prints the folder of
Corral's CMake package in this installation (for CMAKE_PREFIX_PATH or corral_DIR)."""

import sys
from pathlib import Path

if sys.argv[1:] == ["--cmake-dir"]:
    # A path beside this file: the CLI (and its imports) need not run.
    cmake_dir = Path(__file__).resolve().parent / "lib" / "cmake" / "corral"
    if not (cmake_dir / "corralConfig.cmake").is_file():  # e.g. an editable install: sources, no package
        sys.exit(f"corral: no CMake package in this installation ({cmake_dir} has no corralConfig.cmake)")
    print(cmake_dir)
    sys.exit(0)

from corral.cli import main  # noqa: E402

sys.exit(main())
