#!/usr/bin/env bash
# optc's CPU step against its peers (torch fused Adam/AdamW/SGD, DeepSpeedCPUAdam, pytorch-optimizer
# Adan/DiffGrad/Lion, clip_grad_norm_ + fused AdamW), from one run: scripts/peers.py.
#
#   scripts/peers.sh [--elems N] [--threads T] [--steps S] [--engine native|cranelift] [--no-deepspeed]
#
# Sets up a virtual environment under ~/.cache (torch, pytorch-optimizer, deepspeed, ninja; about
# 5 GB, a few minutes the first time), builds optc in release, and runs the comparison. The first
# use of DeepSpeedCPUAdam builds its cpu_adam op with the system g++ through ninja (about 90 s,
# cached under ~/.cache/torch_extensions). Needs about 3 GB of memory per 64M elements.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${OPTC_PEERS_VENV:-$HOME/.cache/optc-peers-venv}"
STAMP="$VENV/.optc-peers-1"
if [ ! -f "$STAMP" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        torch==2.15.0 pytorch-optimizer==4.1.0 numpy==2.4.6 ninja deepspeed==0.19.8
    touch "$STAMP"
fi
cargo build --release --bin optc
# DeepSpeed builds its op with ninja from the environment's bin folder.
PATH="$VENV/bin:$PATH" "$VENV/bin/python" scripts/peers.py --optc target/release/optc "$@"
