#!/usr/bin/env bash
# Builds Corral with AddressSanitizer and UndefinedBehaviorSanitizer (CORRAL_SANITIZE=ON, CPU
# backend) into a virtual environment of its own, then runs the C++ unit tests (ctest) and the
# pytest files that drive the C++ core under them. Exits non-zero on a test failure or on any
# sanitizer report (a report ends the process).
#
#   tools/sanitize.sh            # build (incrementally, in $CORRAL_SANITIZE_DIR) and test
#   tools/sanitize.sh -k shard   # extra arguments go to pytest
#
# CORRAL_SANITIZE_DIR (default build/sanitize) holds the venv and the CMake build
# (tools/sanitize_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/sanitize_env.sh

status=0
ctest --test-dir "$CORRAL_SANITIZE_DIR/build" --output-on-failure || status=1

# --capture=sys: a report written to stderr by the C++ code is shown, not swallowed with the
# process that it ends.
corral_sanitized python -m pytest -q -p no:cacheprovider --capture=sys \
  tests/test_checkpoint.py tests/test_block_manager.py tests/test_kv_cache.py \
  tests/test_kernels.py tests/test_engine.py tests/test_async_engine.py tests/test_async_llm.py tests/test_model.py \
  tests/test_vision.py tests/test_vision_kernels.py "$@" || status=1

exit $status
