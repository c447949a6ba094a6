#!/usr/bin/env bash
# Coverage-guided fuzzing of optc with libFuzzer, on the stable toolchain.
#
#   scripts/fuzz.sh [SECONDS] [TARGET ...]
#
# Builds the targets of fuzz/ with SanitizerCoverage instrumentation (libFuzzer is built from
# source by libfuzzer-sys with the system C++ compiler) and runs each for SECONDS (default 60):
#   compile     any text through parse, check, lowering, passes, the renderer and the printers
#   source      any text through parse, check, lowering, passes, then the interpreter and
#               Cranelift (properties in fuzz/src/lib.rs)
#   rule        well-typed rules drawn from the fuzzer's bytes (stages, scalar state,
#               reductions of reductions, several params), through the same properties
#   checkpoint  arbitrary bytes as a checkpoint: loaded, or refused with nothing changed
# Corpora live in fuzz/corpus/TARGET (seeded from stdlib/rules, tests/good, tests/bad and the real
# checkpoints of fuzz/seeds); crashes are written to fuzz/artifacts/TARGET and fail the script.
# OPTC_FUZZ_TARGET_DIR sets the build folder (default fuzz/target/instrumented).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(compile source rule checkpoint)
TARGET_DIR="${OPTC_FUZZ_TARGET_DIR:-$PWD/target/instrumented}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
# --target keeps the instrumentation off build scripts and proc macros.
cargo build --release --locked --target "$TRIPLE" --target-dir "$TARGET_DIR" \
    --bin compile --bin source --bin rule --bin checkpoint
BIN="$TARGET_DIR/$TRIPLE/release"
unset RUSTFLAGS
mkdir -p corpus/compile corpus/source corpus/rule corpus/checkpoint
for c in compile source; do
    cp -n ../stdlib/rules/*.opt ../tests/good/*.opt ../tests/bad/*.opt "corpus/$c/" 2>/dev/null || true
done
# Real checkpoints (written by `cargo run --release --bin seeds -- seeds/checkpoint`).
cp -n seeds/checkpoint/* corpus/checkpoint/
total=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$(mktemp)"
    status=0
    "$BIN/$t" "corpus/$t" -max_total_time="$SECONDS_PER_TARGET" -max_len=8192 -timeout=20 \
        -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)"
    echo "fuzz $t: ${runs:-0} executions in ${SECONDS_PER_TARGET}s, ${cov:-cov: ?}, exit $status"
    total=$((total + ${runs:-0}))
    if [ "$status" -ne 0 ]; then
        grep -v '^#' "$log" | tail -60
        rm -f "$log"
        echo "fuzz $t failed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    rm -f "$log"
done
echo "fuzz: $total executions in all, no crash, no property violated"
