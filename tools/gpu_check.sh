#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no internet: build Corral with the CUDA backend, run the
# CUDA tests (pytest -m cuda) and the GPU benchmarks in bench/ (files named *_gpu.py), keep logs
# under $OUT (or ./gpu-check-logs), and print a short summary last. Budget: under 8 minutes.
# The host's CPU usually has AVX-512 (VNNI), which the development machine lacks: the quantized
# CPU kernel tests and bench/dot_ceiling.c run on it too.
#
# The machine's python3 must have numpy, pytest, pybind11, scikit-build-core, torch, transformers.
# nlohmann/json headers come from the nlohmann-json package if installed, else from
# build/gpu-deps/include, and a newer transformers (the image has 5.17, the tests want >= 5.24)
# from build/gpu-deps/wheels, both of which tools/stage_gpu_deps.sh fills on a machine with
# internet (carry build/gpu-deps along).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check-logs}"
mkdir -p "$out"
start=$(date +%s)
summary=()
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: runs with a timeout, logs to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-26s rc=%-3s %4ss  %s' "$name" "$rc" "$(($(date +%s) - t0))" "$(tail -n 1 "$out/$name.log" | cut -c1-160)")")
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# The bundled demo model, greedy, on the CPU and then on the GPU: both texts go to the log, and
# they should be the same (tests/test_model_cuda.py checks the tokens). $1: the log folder.
read -r -d '' demo_check <<'EOF'
args=(generate -q --max-tokens 32 --temperature 0 --seed 0)
for d in cpu cuda; do
  python3 -m corral "${args[@]}" --device "$d" "The file object" >"$1/demo-$d.txt" 2>&1
  rc=$?
  echo "$d (rc=$rc): $(tr '\n' ' ' <"$1/demo-$d.txt")"
  [ "$rc" -eq 0 ] || { echo "demo: the $d run failed"; exit "$rc"; }
done
if cmp -s "$1/demo-cpu.txt" "$1/demo-cuda.txt"; then
  echo "demo: cuda text == cpu text: $(head -c 60 "$1/demo-cuda.txt" | tr '\n' ' ')"
else
  echo "demo: cuda text != cpu text"
  exit 1
fi
EOF

nvidia-smi >"$out/nvidia-smi.log" 2>&1 || true
if compgen -G "build/gpu-deps/wheels/*.whl" >/dev/null; then  # ahead of the image's own packages
  step wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/corral-gpu-site build/gpu-deps/wheels/*.whl && export PYTHONPATH=/tmp/corral-gpu-site
fi
json_flag=()
if [ -f build/gpu-deps/include/nlohmann/json.hpp ]; then
  json_flag=(-C "cmake.define.CORRAL_JSON_INCLUDE=$PWD/build/gpu-deps/include")
fi
arch="${CORRAL_GPU_ARCH:-90}"  # the H200 is sm_90; CI compiles 80 and 90

if step build 420 python3 -m pip install --no-build-isolation --no-deps -v . \
    -C cmake.define.CORRAL_CUDA=ON -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch" "${json_flag[@]}"; then
  # The tests' references come from this image's torch and transformers (the project pins
  # transformers >= 5.24; an older one here is a lead if the model tests fail).
  step info 30 python3 -c "import corral, corral._core as c, torch, transformers; print('backend', c.cuda_backend_built(), '|', c.cuda_status(), '|', c.cuda_blas_status(), '| fp8 prefill on tensor cores', c.cuda_fp8_tensor_products(512, 5120, 16384), '| torch', torch.__version__, '| transformers', transformers.__version__)"
  # The cuda tests, one pytest per file: a kernel fault (a sticky CUDA error, a crash) spoils its
  # own file only. Each log's last line is the counts; the slowest tests are listed above it.
  for t in $(grep -l "pytest.mark.cuda" tests/test_*.py); do
    step "$(basename "$t" .py)" 200 python3 -m pytest -m cuda "$t" -q -rs --durations=5 -p no:cacheprovider
  done
  step demo 90 bash -c "$demo_check" demo "$out"
  step cpu-isa 10 python3 -c "import corral._core as c; print('cpu', c.ops.cpu_isas())"
  step quant-cpu 60 python3 -m pytest tests/test_quantized_kernels.py -q -p no:cacheprovider
  step dot-ceiling 30 bash -c "cc -O2 -march=native bench/dot_ceiling.c -o /tmp/dot_ceiling && /tmp/dot_ceiling"
  for b in bench/*_gpu.py; do
    [ -e "$b" ] || continue
    case "$b" in
      # writes and loads a 13 GB Scout-shaped checkpoint (twice: CUDA graphs and eager side by
      # side) before it measures: 2 layers, more time
      bench/decode_gpu.py) step decode_gpu 150 python3 "$b" --layers 2 --budget-s 100 ;;
      *) step "$(basename "$b" .py)" 120 python3 "$b" ;;
    esac
  done
  # The experts in fp8 (fbgemm_fp8's layout, CUDA graphs only), while the 8 minutes allow.
  left=$((470 - ($(date +%s) - start)))
  if [ "$left" -ge 90 ]; then
    step decode_gpu_fp8 "$left" python3 bench/decode_gpu.py --layers 2 --weights fp8 --eager off \
        --budget-s "$((left - 20))"
  else
    summary+=("decode_gpu_fp8             not run: ${left} s of the 8 minutes left")
  fi
fi

echo "== gpu_check summary ($(($(date +%s) - start)) s, logs in $out) =="
printf '%s\n' "${summary[@]}"
exit "$status"
