#!/usr/bin/env bash
# Fuzzes the checkpoint loader (tools/fuzz_loader.py, atheris) for SECONDS (default 600) on the
# sanitized build of tools/sanitize_env.sh, so memory errors are caught where they happen. The
# seed corpus (tiny real checkpoints) is made once into $CORRAL_SANITIZE_DIR/fuzz/seeds; the
# corpus grows in fuzz/corpus across runs. Each finding (a crash, a sanitizer report, an exception
# other than corral.CorralError, a timeout or running out of memory) is saved in fuzz/findings and
# fuzzing goes on; the exit status is non-zero when there was any.
#
#   tools/fuzz_loader.sh 120
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"

source tools/sanitize_env.sh
python -m pip install -q "atheris>=3.0"

fuzz="$CORRAL_SANITIZE_DIR/fuzz"
mkdir -p "$fuzz/corpus" "$fuzz/findings"
if [ ! -s "$fuzz/seeds.dict" ]; then
  rm -rf "$fuzz/seeds"
  corral_sanitized python tools/fuzz_loader.py --make-seeds "$fuzz/seeds"
fi
export CORRAL_FUZZ_FOLDER="$fuzz/folder"
before=$(ls "$fuzz/findings" | wc -l)

# libFuzzer stops at a finding: start it again (the corpus kept) until the time is up. With gcc's
# ASan runtime preloaded, atheris gets no coverage feedback (that runtime, not its libFuzzer, owns
# the coverage symbols), so no input looks "new": -keep_seed keeps mutating the real checkpoints,
# at full length from the start (-len_control=0).
log="$fuzz/log"
: >"$log"
end=$((SECONDS + seconds))
runs=0
while ((SECONDS < end && runs < 50)); do
  runs=$((runs + 1))
  corral_sanitized python tools/fuzz_loader.py "$fuzz/corpus" "$fuzz/seeds" -dict="$fuzz/seeds.dict" \
    -max_total_time=$((end - SECONDS)) -keep_seed=1 -len_control=0 -timeout=60 -rss_limit_mb=6144 -malloc_limit_mb=4096 \
    -artifact_prefix="$fuzz/findings/" -print_final_stats=1 >>"$log" 2>&1 && break
  tail -n 30 "$log"
done
rm -rf "$CORRAL_FUZZ_FOLDER"

execs=$(awk '/stat::number_of_executed_units/ {n += $2} END {print n + 0}' "$log")
found=$(($(ls "$fuzz/findings" | wc -l) - before))
echo "fuzz_loader: ${SECONDS}s, $runs run(s), $execs executions, $found new finding(s) in $fuzz/findings"
((found == 0))
