#!/usr/bin/env bash
# GPU check for the CUDA backend: the GPU test suite (tests/cuda_runtime.rs: every standard-library
# rule against the reference interpreter on the GPU, bit-identical reruns, parameter groups,
# checkpoints GPU -> CPU) with OPTC_REQUIRE_GPU=1, then the benchmark (examples/gpu_bench.rs: adam,
# adamw, adan over 1e9 f32 params in 100 and 10,000 tensors; OPTC_BENCH_PARAMS=2.5e8 for a shorter run).
#
#   scripts/gpu-check.sh            on a GPU machine with a Rust toolchain: build in release, then run.
#   scripts/gpu-check.sh --prepare  on a build machine: build the test binary and the benchmark into
#                                   .gpubin/ (git-ignored); carry .gpubin to a GPU machine without a
#                                   toolchain and run scripts/gpu-check.sh there: it uses .gpubin/.
#
# Without a GPU it says why and exits 0 (exit 1 when OPTC_REQUIRE_GPU=1). CUDA compilation itself is
# covered by `cargo test` (tests/cuda_compile.rs) on any machine with NVRTC.
# NVRTC: $OPTC_NVRTC_LIB, else the loader's libnvrtc.so.13, a CUDA toolkit under /usr/local/cuda*,
# an installed nvidia-cuda-nvrtc wheel, or (last) pip into a private virtual environment.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.gpubin

if [ "${1:-}" = "--prepare" ]; then
    set -e
    rm -rf "$BIN" && mkdir -p "$BIN"
    cargo build --release --example gpu_bench
    exe="$(cargo test --release --no-run --test cuda_runtime --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*cuda_runtime[^"]*"' | tail -1 | cut -d'"' -f4)"
    [ -n "$exe" ] || { echo "gpu-check: cannot find the cuda_runtime test binary"; exit 1; }
    cp "$exe" "$BIN/cuda_runtime"
    cp "${CARGO_TARGET_DIR:-target}/release/examples/gpu_bench" "$BIN/gpu_bench"
    echo "gpu-check: prepared $(du -sh "$BIN" | cut -f1) in $BIN (carry it to the GPU machine)"
    exit 0
fi

no_gpu() {
    echo "gpu-check: no GPU: $1"
    if [ "${OPTC_REQUIRE_GPU:-}" = 1 ]; then
        echo "gpu-check: FAILED (OPTC_REQUIRE_GPU=1)"
        exit 1
    fi
    echo "gpu-check: skipped (nothing to run without a GPU; CUDA compilation is covered by cargo test)"
    exit 0
}

command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not installed"
GPUS="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1)" \
    || no_gpu "nvidia-smi failed: $GPUS"
[ -n "$GPUS" ] || no_gpu "nvidia-smi lists no GPU"
LDCACHE="$(ldconfig -p 2>/dev/null || true)"
found_cuda=""
if grep -q 'libcuda\.so' <<<"$LDCACHE"; then
    found_cuda=yes
else
    for d in ${LD_LIBRARY_PATH:-} /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64; do
        for dir in ${d//:/ }; do
            if ls "$dir"/libcuda.so* >/dev/null 2>&1; then
                found_cuda=yes
                export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            fi
        done
    done
fi
[ -n "$found_cuda" ] || no_gpu "libcuda.so (the CUDA driver library) was not found"
echo "gpu-check: GPU(s): $GPUS"

# NVRTC.
NVRTC_VERSION="13.0.88"
if [ -z "${OPTC_NVRTC_LIB:-}" ]; then
    cand="$(awk '/libnvrtc\.so\.13 /{print $NF; exit}' <<<"$LDCACHE")"
    [ -n "$cand" ] || cand="$(ls /usr/local/cuda*/lib64/libnvrtc.so.13 /usr/local/cuda*/targets/*/lib/libnvrtc.so.13 2>/dev/null | head -1)"
    [ -n "$cand" ] || cand="$(find /usr/lib/python3* /usr/local/lib/python3* /opt "$HOME/.local/lib" "$HOME/.cache/optc-ci-venv" \
        -path '*nvidia/cu13/lib/libnvrtc.so.13' -print -quit 2>/dev/null)"
    if [ -z "$cand" ]; then
        VENV="${OPTC_CI_VENV:-$HOME/.cache/optc-ci-venv}"
        echo "gpu-check: installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $VENV"
        rm -rf "$VENV"
        python3 -m venv "$VENV" \
            && "$VENV/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==$NVRTC_VERSION" \
            || { echo "gpu-check: FAILED: no NVRTC found and none could be installed"; exit 1; }
        cand="$(find "$VENV" -path '*/nvidia/cu13/lib/libnvrtc.so.13' -print -quit)"
    fi
    [ -n "$cand" ] || { echo "gpu-check: FAILED: no libnvrtc.so.13"; exit 1; }
    export OPTC_NVRTC_LIB="$cand"
fi
export LD_LIBRARY_PATH="$(dirname "$OPTC_NVRTC_LIB")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: NVRTC: $OPTC_NVRTC_LIB"

if [ -x "$BIN/cuda_runtime" ] && [ -x "$BIN/gpu_bench" ]; then
    echo "gpu-check: using the binaries prepared in $BIN"
    TESTS=("$BIN/cuda_runtime")
    BENCH=("$BIN/gpu_bench")
else
    echo "gpu-check: building (release)"
    cargo build --release --example gpu_bench || exit 1
    exe="$(cargo test --release --no-run --test cuda_runtime --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*cuda_runtime[^"]*"' | tail -1 | cut -d'"' -f4)"
    [ -n "$exe" ] || { echo "gpu-check: FAILED: cannot build the GPU tests"; exit 1; }
    TESTS=("$exe")
    BENCH=("${CARGO_TARGET_DIR:-target}/release/examples/gpu_bench")
fi

failed=0
echo "gpu-check: GPU tests (OPTC_REQUIRE_GPU=1)"
OPTC_REQUIRE_GPU=1 timeout 300 "${TESTS[@]}" --test-threads=1 || failed=1
echo "gpu-check: benchmark"
timeout 300 "${BENCH[@]}" || failed=1

if [ "$failed" = 0 ]; then
    echo "gpu-check: OK"
else
    echo "gpu-check: FAILED"
fi
exit "$failed"
