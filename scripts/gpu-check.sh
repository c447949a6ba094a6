#!/usr/bin/env bash
# GPU check for the CUDA backend: release build, the GPU test suite (tests/cuda_runtime.rs, every
# standard-library rule against the reference interpreter on the GPU, bit-identical reruns,
# parameter groups, checkpoints GPU -> CPU) with OPTC_REQUIRE_GPU=1, then the benchmark
# (examples/gpu_bench.rs: adam, adamw, adan over 1e9 f32 params in 100 and 10,000 tensors).
#
# Without a GPU (no nvidia-smi that lists one, or no libcuda the loader can find) it says why and
# exits 0: the CUDA kernels are still proven to compile by `cargo test` (tests/cuda_compile.rs).
# NVRTC: used from the system if the loader finds libnvrtc.so.13, else installed from PyPI
# (nvidia-cuda-nvrtc 13.0.88) into a private virtual environment, as .ci/run does.
# Budget: about 8 minutes on a 16-core machine with an H200 (build ~3-5, tests ~1, bench ~1-2).
set -uo pipefail
cd "$(dirname "$0")/.."

no_gpu() {
    echo "gpu-check: no GPU: $1"
    echo "gpu-check: skipped (nothing to run without a GPU; CUDA compilation is covered by cargo test)"
    exit 0
}

command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not installed"
GPUS="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1)" \
    || no_gpu "nvidia-smi failed: $GPUS"
[ -n "$GPUS" ] || no_gpu "nvidia-smi lists no GPU"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so' \
    && ! find ${LD_LIBRARY_PATH//:/ } -maxdepth 1 -name 'libcuda.so*' 2>/dev/null | grep -q .; then
    no_gpu "libcuda.so (the CUDA driver library) is not on the loader's path"
fi
echo "gpu-check: GPU(s): $GPUS"

# NVRTC.
NVRTC_VERSION="13.0.88"
if [ -z "${OPTC_NVRTC_LIB:-}" ]; then
    SYS_NVRTC="$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.13 /{print $NF; exit}')"
    if [ -n "$SYS_NVRTC" ]; then
        export OPTC_NVRTC_LIB="$SYS_NVRTC"
    else
        VENV="${OPTC_CI_VENV:-$HOME/.cache/optc-ci-venv}"
        STAMP="$VENV/.optc-nvidia-cuda-nvrtc-$NVRTC_VERSION"
        if [ ! -f "$STAMP" ]; then
            echo "gpu-check: installing nvidia-cuda-nvrtc==$NVRTC_VERSION into $VENV"
            rm -rf "$VENV"
            python3 -m venv "$VENV" \
                && "$VENV/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==$NVRTC_VERSION" \
                && touch "$STAMP" \
                || { echo "gpu-check: FAILED: cannot install NVRTC from PyPI"; exit 1; }
        fi
        OPTC_NVRTC_LIB="$(find "$VENV" -path '*/nvidia/cu13/lib/libnvrtc.so.13' -print -quit)"
        [ -n "$OPTC_NVRTC_LIB" ] || { echo "gpu-check: FAILED: no libnvrtc.so.13 under $VENV"; exit 1; }
        export OPTC_NVRTC_LIB
    fi
fi
export LD_LIBRARY_PATH="$(dirname "$OPTC_NVRTC_LIB")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: NVRTC: $OPTC_NVRTC_LIB"

# Build once in release: the GPU tests, the compile tests and the benchmark.
echo "gpu-check: building (release)"
cargo build --release --test cuda_runtime --test cuda_compile --example gpu_bench || exit 1

failed=0
echo "gpu-check: GPU tests (OPTC_REQUIRE_GPU=1)"
OPTC_REQUIRE_GPU=1 OPTC_REQUIRE_NVRTC=1 timeout 300 \
    cargo test --release --test cuda_runtime -- --test-threads=1 || failed=1
OPTC_REQUIRE_NVRTC=1 timeout 120 cargo test --release --test cuda_compile || failed=1

echo "gpu-check: benchmark"
timeout 300 cargo run --release --example gpu_bench || failed=1

if [ "$failed" = 0 ]; then
    echo "gpu-check: OK"
else
    echo "gpu-check: FAILED"
fi
exit "$failed"
