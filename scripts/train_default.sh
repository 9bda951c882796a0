#!/usr/bin/env bash
# Trains the default model on the GPU machine in one time-boxed command, exports it and evaluates it.
# Runs from the repository root on a host with only the NVIDIA driver, given (carried):
#   target/release/srsde-fast   the release binary (kernels embedded; build it where NVRTC is)
#   .devcarry/faces/            training faces (scripts/pack_train_data.sh)
#   .devcarry/heldout.txt       the names of the faces the trainer holds out (5 %)
#   .devcarry/val128/           CelebA-HQ development faces (optional)
#
# What it does, each step under its own timeout, all output logged:
#   1. device info; a short training benchmark (ve-small vs ve-paper, images/s and memory);
#   2. train: --device cuda --precision bf16 --preset ve-small --val-fraction 0.05 --max-minutes M,
#      fresh, or continuing: --resume when $RUN_DIR holds a checkpoint (same machine), else
#      --init-from the committed export in assets/model/ (fresh optimiser, short warm-up);
#   3. export the EMA weights as f16 shards of ≤ 16 MiB into $OUT/model/ (copy them to assets/model/);
#   4. eval on the held-out faces and on val128: bicubic vs the model with a fast sampler, PSNR /
#      SSIM / consistency / CS, and a paired "beats bicubic" count per metric;
#   5. $OUT/report.md (summary, tables, a row for docs/training.md), $OUT/logs.tar.gz (every log,
#      train_log.jsonl, the eval reports), $OUT/sheets.tar.gz (contact sheets LR|SR|HR).
# $OUT ends with at most 8 files: model/ (index + shards), report.md, logs.tar.gz, sheets.tar.gz.
#
# The whole script keeps to $TOTAL_MINUTES (default 9.5, under the device's 10-minute command limit):
# training gets what is left after the benchmark, minus $RESERVE_S for export and evaluation.
# Settings (environment): TOTAL_MINUTES, MINUTES (training minutes; overrides the budget), BATCH,
# LR, WARMUP, SEED, INIT (auto | none | PATH), RUN_DIR, BENCH (1/0), EVAL_SAMPLER, EVAL_STEPS,
# EVAL_BATCH, EVAL_LIMIT, PRECISION, PRESET, DEVICE (cpu for a dry run of the script here).
# Dry run without a GPU (checks the plumbing in about two minutes):
#   DEVICE=cpu PRESET=ve-tiny BATCH=2 MINUTES=0.3 BENCH=0 EVAL_LIMIT=2 EVAL_STEPS=3 EVAL_BATCH=2 \
#     OUT=/tmp/dry bash scripts/train_default.sh
set -u
set -o pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/srsde-train-out}"
BIN="${BIN:-target/release/srsde-fast}"
DATA="${DATA:-.devcarry/faces}"
HELDOUT_LIST="${HELDOUT_LIST:-.devcarry/heldout.txt}"
VAL128="${VAL128:-.devcarry/val128}"
RUN_DIR="${RUN_DIR:-/tmp/srsde-run}"
WORK="${WORK:-/tmp/srsde-train-work}"
TOTAL_MINUTES="${TOTAL_MINUTES:-9.5}"
RESERVE_S="${RESERVE_S:-150}"
PRESET="${PRESET:-ve-small}"
PRECISION="${PRECISION:-bf16}"
BATCH="${BATCH:-32}"
LR="${LR:-2e-4}"
SEED="${SEED:-$(( $(date +%s) % 1000000 ))}"
INIT="${INIT:-auto}"
BENCH="${BENCH:-1}"
EVAL_BATCH="${EVAL_BATCH:-32}"
EVAL_LIMIT="${EVAL_LIMIT:-}"
DEVICE="${DEVICE:-cuda}" # cpu: a dry run of the whole script (tiny settings) on a machine without GPU

LOGS="$WORK/logs"
rm -rf "$WORK"
mkdir -p "$OUT" "$LOGS"
SUMMARY="$WORK/summary.md"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }
deadline_s() { awk -v t="$TOTAL_MINUTES" 'BEGIN { printf "%d", t * 60 }'; }

# Always leave the report and the logs in $OUT, whatever happened.
finish() {
    local rc=$?
    say ""
    say "script exit $rc after $(elapsed) s"
    {
        echo "# Default-model training run ($(date -u '+%Y-%m-%d %H:%M UTC'))"
        echo
        cat "$SUMMARY"
    } >"$OUT/report.md"
    [ -f "$RUN_DIR/train_log.jsonl" ] && cp "$RUN_DIR/train_log.jsonl" "$LOGS/"
    for d in "$WORK"/eval_*; do
        [ -d "$d" ] || continue
        mkdir -p "$LOGS/$(basename "$d")"
        cp "$d"/*.md "$d"/*.json "$d"/*.jsonl "$d"/*.csv "$LOGS/$(basename "$d")/" 2>/dev/null
    done
    tar czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
    local sheets=()
    for f in "$WORK"/eval_*/contact_sheet.png "$WORK"/example/*.png "$RUN_DIR"/samples/*.png; do
        [ -f "$f" ] && sheets+=("$f")
    done
    if [ ${#sheets[@]} -gt 0 ]; then
        mkdir -p "$WORK/sheets"
        for f in "${sheets[@]}"; do
            cp "$f" "$WORK/sheets/$(basename "$(dirname "$f")")_$(basename "$f")"
        done
        tar czf "$OUT/sheets.tar.gz" -C "$WORK" sheets
    fi
    ls -la "$OUT" "$OUT/model" 2>/dev/null
}
trap finish EXIT

# Run a step under a timeout, logging to $LOGS/$name.txt; returns the command's status.
step() {
    local name=$1 secs=$2
    shift 2
    echo "== $name (timeout ${secs}s, at $(elapsed) s): $*" | tee -a "$LOGS/$name.txt"
    timeout -s INT -k 30 "$secs" "$@" 2>&1 | tee -a "$LOGS/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name exit $rc" | tee -a "$LOGS/$name.txt"
    return "$rc"
}

say "## Setup"
say ""
nvidia-smi >"$LOGS/device.txt" 2>&1
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
say "- GPU: ${GPU:-unknown}"
if [ ! -x "$BIN" ]; then
    say "- ERROR: no binary at $BIN"
    exit 2
fi
if [ ! -d "$DATA" ]; then
    say "- ERROR: no training data at $DATA (run scripts/pack_train_data.sh and carry it)"
    exit 2
fi
say "- binary: $BIN ($("$BIN" --version 2>&1))"
say "- data: $DATA, $(find "$DATA" -type f | wc -l) files; held-out list: $(wc -l <"$HELDOUT_LIST" 2>/dev/null || echo none)"
has_flag() { "$BIN" "$1" --help 2>/dev/null | grep -q -- "$2"; }
PREC_ARGS=()
if [ "$DEVICE" != cuda ]; then
    say "- note: DEVICE=$DEVICE (a dry run, not the GPU training)"
elif has_flag train --precision; then
    PREC_ARGS=(--precision "$PRECISION")
else
    say "- note: this binary's train has no --precision; training in its default precision"
fi

# 1. Training benchmark: the measurement behind the model size (ve-small vs ve-paper).
if [ "$BENCH" = 1 ] && has_flag bench --train; then
    for p in ve-small ve-paper; do
        step "bench_$p" 45 "$BIN" bench --device "$DEVICE" --train --preset "$p" --batch "$BATCH" --iters 2 \
            "${PREC_ARGS[@]}"
        say "- bench --train $p batch $BATCH: $(grep -E 'train step|peak device' "$LOGS/bench_$p.txt" | tr '\n' ' ')"
    done
fi

# 2. Train.
MODE=fresh
TRAIN_ARGS=(--data "$DATA" --out "$RUN_DIR" --device "$DEVICE" "${PREC_ARGS[@]}" --quiet --workers 12
    --ckpt-every 1000 --val-every 250 --grid-every 0 --log-every 10)
if [ -f "$RUN_DIR/checkpoint.safetensors" ]; then
    MODE="resume $RUN_DIR"
    TRAIN_ARGS+=(--resume)
else
    rm -rf "$RUN_DIR"
    src=""
    case "$INIT" in
    none) ;;
    auto) [ -f assets/model/model.index.json ] && src=assets/model ;;
    *) src="$INIT" ;;
    esac
    if [ -n "$src" ]; then
        MODE="init-from $src"
        TRAIN_ARGS+=(--init-from "$src" --batch "$BATCH" --lr "$LR" --seed "$SEED" --val-fraction 0.05
            --warmup "${WARMUP:-200}")
    else
        TRAIN_ARGS+=(--preset "$PRESET" --batch "$BATCH" --lr "$LR" --seed "$SEED" --val-fraction 0.05
            --warmup "${WARMUP:-500}")
    fi
fi
if [ -n "${MINUTES:-}" ]; then
    TRAIN_MIN="$MINUTES"
else
    left=$(( $(deadline_s) - $(elapsed) - RESERVE_S ))
    [ "$left" -lt 60 ] && left=60
    TRAIN_MIN=$(awk -v s="$left" 'BEGIN { printf "%.2f", s / 60 }')
fi
TRAIN_TIMEOUT=$(awk -v m="$TRAIN_MIN" 'BEGIN { printf "%d", m * 60 + 90 }')
say ""
say "## Training"
say ""
say "- mode: $MODE; preset $PRESET, batch $BATCH, lr $LR, seed $SEED, ${PREC_ARGS[*]:-default precision}, ${TRAIN_MIN} min"
step train "$TRAIN_TIMEOUT" "$BIN" train "${TRAIN_ARGS[@]}" --max-minutes "$TRAIN_MIN"
TRAIN_RC=$?
say "- train exit $TRAIN_RC"
if [ "$TRAIN_RC" != 0 ]; then
    say "- last lines of the training output:"
    tail -8 "$LOGS/train.txt" | sed 's/^/    /' >>"$SUMMARY"
fi
grep -E '^(finished|stopped)' "$LOGS/train.txt" | tail -1 | sed 's/^/- /' >>"$SUMMARY"
LOG="$RUN_DIR/train_log.jsonl"
if [ -f "$LOG" ]; then
    last=$(tail -1 "$LOG")
    VAL_LOSS=$(grep -o '"val_loss":[-0-9.eE+]*' "$LOG" | tail -1 | cut -d: -f2)
    FIRST_VAL=$(grep -o '"val_loss":[-0-9.eE+]*' "$LOG" | head -1 | cut -d: -f2)
    say "- last log line: $last"
    say "- val_loss (EMA, held-out batch): first ${FIRST_VAL:-none}, last ${VAL_LOSS:-none}"
    say "- images/s (last logged step): $(echo "$last" | grep -o '"images_per_s":[0-9.]*' | cut -d: -f2)"
fi

# 3. Export f16 shards.
if [ ! -f "$RUN_DIR/checkpoint.safetensors" ]; then
    say "- ERROR: no checkpoint in $RUN_DIR: nothing to export"
    exit 3
fi
rm -rf "$OUT/model"
step export 120 "$BIN" export "$RUN_DIR" -o "$OUT/model" --dtype f16 --shard-mib 16 --force || exit 4
EXPORT_LINE=$(grep '^wrote' "$LOGS/export.txt" | tail -1)
say "- export: $EXPORT_LINE"
TOTAL_STEPS=$(echo "$EXPORT_LINE" | grep -o 'steps [0-9]*' | cut -d' ' -f2)
TOTAL_IMAGES=$(echo "$EXPORT_LINE" | grep -o 'images [0-9]*' | cut -d' ' -f2)
step info 60 "$BIN" info "$OUT/model" >/dev/null

# 4. Evaluate: bicubic vs the model on held-out faces, with a fast sampler when the binary has one.
if [ -n "${EVAL_SAMPLER:-}" ]; then
    SAMPLER_ARGS=(--sampler "$EVAL_SAMPLER")
elif "$BIN" upscale --help 2>/dev/null | grep -q dpm2; then
    SAMPLER_ARGS=(--sampler dpm2)
else
    SAMPLER_ARGS=(--sampler sde-ve --steps 100)
fi
[ -n "${EVAL_STEPS:-}" ] && SAMPLER_ARGS+=(--steps "$EVAL_STEPS")
EVAL_ARGS=(--device "$DEVICE" --model "$OUT/model" --seed 0 --batch "$EVAL_BATCH" --sheet 8 "${SAMPLER_ARGS[@]}")
[ -n "$EVAL_LIMIT" ] && EVAL_ARGS+=(--limit "$EVAL_LIMIT")

# Mean PSNR / CS per method and how often the model beats bicubic on the same face (per_image.csv).
compare() {
    local csv=$1
    awk -F, 'NR > 1 && $3 != "HR vs HR" {
            k = $3; n[k]++; p[k] += $6; s[k] += $7; c[k] += $9
            if ($3 == "bicubic") { bp[$1] = $6; bc[$1] = $9 } else { mp[$1] = $6; mc[$1] = $9; m = $3 }
        }
        END {
            for (k in n) printf "  - %s: %d faces, PSNR %.2f dB, SSIM %.4f, CS %.4f\n", k, n[k], p[k] / n[k], s[k] / n[k], c[k] / n[k]
            for (i in mp) if (i in bp) { t++; wp += (mp[i] > bp[i]); wc += (mc[i] > bc[i]) }
            if (t) printf "  - %s beats bicubic on the same face: PSNR %d/%d, CS %d/%d\n", m, wp, t, wc, t
            if (("bicubic" in n) && m != "") printf "  - VERDICT: mean PSNR %s bicubic, mean CS %s bicubic\n",
                (p[m] / n[m] > p["bicubic"] / n["bicubic"]) ? "beats" : "does NOT beat",
                (c[m] / n[m] > c["bicubic"] / n["bicubic"]) ? "beats" : "does NOT beat"
        }' "$csv"
}

say ""
say "## Evaluation (sampler: ${SAMPLER_ARGS[*]})"
if [ -s "$HELDOUT_LIST" ]; then
    mkdir -p "$WORK/heldout"
    while IFS= read -r n; do
        [ -n "$n" ] && cp "$DATA/$n" "$WORK/heldout/" 2>/dev/null
    done <"$HELDOUT_LIST"
    say ""
    say "### faces128 held-out 5 % ($(find "$WORK/heldout" -type f | wc -l) faces)"
    step eval_heldout 180 "$BIN" eval "${EVAL_ARGS[@]}" --hr "$WORK/heldout" -o "$WORK/eval_heldout"
    [ -f "$WORK/eval_heldout/per_image.csv" ] && compare "$WORK/eval_heldout/per_image.csv" >>"$SUMMARY"
    echo >>"$SUMMARY"
    grep '^|' "$WORK/eval_heldout/report.md" >>"$SUMMARY" 2>/dev/null
fi
if [ -d "$VAL128" ] && [ "$(elapsed)" -lt $(( $(deadline_s) - 60 )) ]; then
    say ""
    say "### val128 (CelebA-HQ, $(find "$VAL128" -type f | wc -l) faces)"
    left=$(( $(deadline_s) - $(elapsed) - 15 ))
    step eval_val128 "$left" "$BIN" eval "${EVAL_ARGS[@]}" --hr "$VAL128" -o "$WORK/eval_val128"
    [ -f "$WORK/eval_val128/per_image.csv" ] && compare "$WORK/eval_val128/per_image.csv" >>"$SUMMARY"
    echo >>"$SUMMARY"
    grep '^|' "$WORK/eval_val128/report.md" >>"$SUMMARY" 2>/dev/null
fi

# The bundled example, when the repository has one: SR on the GPU, and the time on this CPU.
if [ -f examples/face_lr16.png ] && [ "$(elapsed)" -lt $(( $(deadline_s) - 40 )) ]; then
    mkdir -p "$WORK/example"
    step example_cpu 30 "$BIN" upscale examples/face_lr16.png -o "$WORK/example" --model "$OUT/model" \
        --device cpu --seed 1 --force
    say "- example on this host's CPU: $(grep -E '^done in' "$LOGS/example_cpu.txt" | tail -1)"
fi

say ""
say "## Row for docs/training.md"
say ""
say "| $(date -u +%Y-%m-%d) | ${GPU%%,*} | $MODE | ${TRAIN_MIN} | ${TOTAL_STEPS:-?} | ${TOTAL_IMAGES:-?} | ${VAL_LOSS:-?} | see tables above |"
exit 0
