# Sourced by tools/sanitize.sh and tools/fuzz_loader.sh, from the repository root: installs Corral
# built with CORRAL_SANITIZE=ON (and its C++ unit tests, CPU backend only) with the test extras
# into the virtual environment $CORRAL_SANITIZE_DIR/venv (incrementally: the CMake build stays in
# $CORRAL_SANITIZE_DIR/build) and activates it. Then `corral_sanitized CMD...` runs CMD (a Python
# process) with the sanitizer runtime preloaded.

CORRAL_SANITIZE_DIR="$(realpath -m "${CORRAL_SANITIZE_DIR:-build/sanitize}")"
export CORRAL_SANITIZE_DIR
mkdir -p "$CORRAL_SANITIZE_DIR"
[ -x "$CORRAL_SANITIZE_DIR/venv/bin/python" ] || python3 -m venv "$CORRAL_SANITIZE_DIR/venv"
source "$CORRAL_SANITIZE_DIR/venv/bin/activate"

# The build requirements installed once: rebuilds need no isolated environment, whose changing
# pybind11 path would make CMake rebuild everything. RelWithDebInfo: reports with line numbers.
python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "nlohmann-json==3.12.0"
CORRAL_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  python -m pip install -q --no-build-isolation ".[test]" \
  -Cbuild-dir="$CORRAL_SANITIZE_DIR/build" -Ccmake.build-type=RelWithDebInfo \
  -Ccmake.define.CORRAL_SANITIZE=ON -Ccmake.define.CORRAL_TESTS=ON

# The first error ends the process (exit status 1) after its report on stderr.
export ASAN_OPTIONS="halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

corral_sanitized() {
  # The interpreter is not instrumented: the ASan runtime must be loaded before anything else,
  # and libstdc++ with it, or its __cxa_throw interceptor finds no real __cxa_throw to call and
  # the first C++ exception aborts. Python leaks by design, so no leak checking there.
  ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" \
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" "$@"
}
