#!/usr/bin/env bash
# Copies build-time headers that the offline GPU machine lacks (nlohmann/json, from the
# nlohmann-json package) into build/gpu-deps/include, to be carried there for tools/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q nlohmann-json==3.12.0
src="$(python3 -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('nlohmann_json').origin), 'include'))")"
mkdir -p build/gpu-deps/include
cp -r "$src/nlohmann" build/gpu-deps/include/
echo "staged $src/nlohmann -> build/gpu-deps/include/nlohmann"
