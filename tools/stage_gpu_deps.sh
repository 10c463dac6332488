#!/usr/bin/env bash
# Stages, on a machine with internet, what the offline GPU machine lacks for tools/gpu_check.sh,
# into build/gpu-deps (carry that folder along; gpu_check.sh uses what it finds there):
#   include/nlohmann  the nlohmann/json headers (the nlohmann-json package);
#   wheels/           transformers as this environment has it (the project pins >= 5.24; the GPU
#                     image has 5.17) with the packages it needs newer than the image holds, for
#                     CPython 3.12 on x86-64 (the image's python3), about 26 MB.
# Run it from an environment where `pip install ".[test]"` was done: the versions are that one's.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q nlohmann-json==3.12.0
src="$(python3 -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('nlohmann_json').origin), 'include'))")"
mkdir -p build/gpu-deps/include
cp -r "$src/nlohmann" build/gpu-deps/include/
echo "staged $src/nlohmann -> build/gpu-deps/include/nlohmann"

# transformers and its requirements that the image lacks or holds too old (huggingface_hub 2,
# its httpx2 stack, kernels); the rest (numpy, safetensors, pyyaml, tqdm, ...) the image has.
pins="$(python3 - <<'PY'
from importlib.metadata import PackageNotFoundError, version
names = ["transformers", "huggingface_hub", "tokenizers", "kernels", "httpx2", "httpcore2", "truststore",
         "tomlkit", "click", "regex", "hf-xet", "idna", "anyio", "h11", "typer"]
pins = []
for n in names:
    try:
        pins.append(f"{n}=={version(n)}")
    except PackageNotFoundError:
        pass
print(" ".join(pins))
PY
)"
case "$pins" in transformers==*) ;; *) echo "transformers is not installed here: run pip install \".[test]\" first"; exit 1;; esac
rm -rf build/gpu-deps/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d build/gpu-deps/wheels $pins
echo "staged $(ls build/gpu-deps/wheels | wc -l) wheels ($(du -sh build/gpu-deps/wheels | cut -f1)) -> build/gpu-deps/wheels: $pins"
