#!/usr/bin/env bash
# Trains the default model on whatever machine a session has, for as long as it allows, so that
# training adds up across sessions (docs/training.md):
#   - resumes the run in $RUN_DIR exactly (same machine, folder kept under /var/tmp);
#   - when that folder is gone (a new machine), starts a new run from the committed export in
#     assets/model/ with `--init-from` (fresh Adam, short warm-up), or from scratch when there is none;
#   - runs `nice -n 19` so that builds and tests keep their speed, and stops itself with a checkpoint
#     after $MINUTES (`--max-minutes`); stop it earlier with Ctrl-C / SIGINT (also a clean checkpoint).
# The same script continues the run on a GPU machine: DEVICE=cuda (PRECISION bf16 by default there).
#
# Usage: [MINUTES=120] [RUN_DIR=/var/tmp/srsde-run] [DATA=../shared/data/faces128] [BIN=...] \
#        bash scripts/train_cpu.sh            # in the foreground; add `&` or nohup for the background
# Settings of a fresh run (ignored on resume, where the checkpoint's are kept): PRESET, NF, CH_MULT,
# BATCH, LR, WARMUP, EMA, NOISE_DIST.
# LR_DECAY=STEPS [LR_FINAL=LR]: anneal the learning rate (`train --lr-decay`), also on resume, where
# it starts at the checkpoint's step; giving the same values again keeps the decay under way.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${MINUTES:-120}"
RUN_DIR="${RUN_DIR:-/var/tmp/srsde-run}"
DATA="${DATA:-../shared/data/faces128}"
DEVICE="${DEVICE:-cpu}"
BIN="${BIN:-target/release/srsde-fast}"
PRESET="${PRESET:-ve-res}"
NF="${NF:-16}"
CH_MULT="${CH_MULT:-1,2,4,4}"
BATCH="${BATCH:-4}"
LR="${LR:-5e-4}"
WARMUP="${WARMUP:-20}"
EMA="${EMA:-0.995}"
NOISE_DIST="${NOISE_DIST:-paper}"
INIT="${INIT:-assets/model}"

if [ ! -x "$BIN" ]; then
    echo "building $BIN" >&2
    cargo build --release --quiet
fi
# A copy of the binary runs, so a rebuild while training cannot replace the running file.
mkdir -p "$RUN_DIR"
cp "$BIN" "$RUN_DIR/srsde-fast.bin.tmp" && mv "$RUN_DIR/srsde-fast.bin.tmp" "$RUN_DIR/srsde-fast.bin"

common=(--data "$DATA" --out "$RUN_DIR" --steps 100000000 --max-minutes "$MINUTES"
        --ckpt-every 25 --val-every 100 --grid-every 0 --log-every 5 --device "$DEVICE")
# PRECISION: on a GPU bf16 by default; on the CPU f32 by default, bf16 runs the convolutions on
# AMX tiles (Intel Xeon Sapphire Rapids or later).
if [ "$DEVICE" = cuda ]; then
    common+=(--precision "${PRECISION:-bf16}")
elif [ -n "${PRECISION:-}" ]; then
    common+=(--precision "$PRECISION")
fi
if [ -n "${LR_DECAY:-}" ]; then
    common+=(--lr-decay "$LR_DECAY")
    [ -n "${LR_FINAL:-}" ] && common+=(--lr-final "$LR_FINAL")
fi

if [ -f "$RUN_DIR/checkpoint.safetensors" ]; then
    echo "resuming $RUN_DIR" >&2
    mode=(--resume)
elif [ -f "$INIT/model.index.json" ]; then
    echo "no run in $RUN_DIR: a new run from the committed export $INIT" >&2
    mode=(--init-from "$INIT" --batch "$BATCH" --lr "$LR" --warmup "${WARMUP_INIT:-50}" --ema-rate "$EMA"
          --noise-dist "$NOISE_DIST")
else
    echo "no run in $RUN_DIR and no export in $INIT: a fresh run ($PRESET nf $NF ch_mult $CH_MULT)" >&2
    mode=(--preset "$PRESET" --nf "$NF" --ch-mult "$CH_MULT" --batch "$BATCH" --lr "$LR"
          --warmup "$WARMUP" --ema-rate "$EMA" --noise-dist "$NOISE_DIST")
fi
exec nice -n 19 "$RUN_DIR/srsde-fast.bin" train "${common[@]}" "${mode[@]}"
