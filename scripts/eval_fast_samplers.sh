#!/usr/bin/env bash
# Issue 7's table: the paper's sampler at its full step count against every fast sampler at 10, 20,
# 50 and 100 network evaluations, on the same held-out faces, with wall-clock per face on this machine.
# Usage: MODEL=model/ HR=heldout_faces/ [OUT=/tmp/fast-eval] [LIMIT=64] [BATCH=32] [DEVICE=cuda]
#        [PAPER=sde-ve-cs|none] [PAPER_STEPS=] [FAST="ode-heun dpm1 dpm2 dpm3"] [NFES="10 20 50 100"]
#        (PAPER=none skips the paper's sampler: on a CPU it runs for hours; run it on its own,
#        resumably, with `srsde-fast eval --sampler sde-ve-cs --steps N` and add its row)
#        bash scripts/eval_fast_samplers.sh
# Writes $OUT/table.md (Markdown, ready for docs/benchmarks.md) and every eval's report in $OUT/<run>/.
set -u
BIN="${BIN:-target/release/srsde-fast}"
MODEL="${MODEL:?set MODEL to a model (export folder, .safetensors or .pth)}"
HR="${HR:?set HR to a folder of held-out 128×128 faces}"
OUT="${OUT:-/tmp/fast-eval}"
LIMIT="${LIMIT:-64}"
BATCH="${BATCH:-32}"
DEVICE="${DEVICE:-cuda}"
PAPER="${PAPER:-sde-ve-cs}"
FAST="${FAST:-ode-heun dpm1 dpm2 dpm3}"
NFES="${NFES:-10 20 50 100}"
mkdir -p "$OUT"

run() { # name, args...
    local name=$1
    shift
    local t0 t1
    t0=$(date +%s.%N)
    "$BIN" eval --model "$MODEL" --hr "$HR" -o "$OUT/$name" --limit "$LIMIT" --batch "$BATCH" \
        --device "$DEVICE" --seed 0 --force "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    t1=$(date +%s.%N)
    echo "$name $rc $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" >>"$OUT/times.txt"
}

: >"$OUT/times.txt"
if [ "$PAPER" = none ]; then
    :
elif [ -n "${PAPER_STEPS:-}" ]; then
    run paper --sampler "$PAPER" --steps "$PAPER_STEPS" # a dry run; the table wants the full count
else
    run paper --sampler "$PAPER"
fi
for s in $FAST; do
    for n in $NFES; do
        run "${s}_$n" --sampler "$s" --steps "$n"
    done
done

python3 - "$OUT" "$LIMIT" <<'PY'
import json, os, sys
out, limit = sys.argv[1], int(sys.argv[2])
times = {l.split()[0]: (int(l.split()[1]), float(l.split()[2])) for l in open(os.path.join(out, "times.txt"))}
rows, ref = [], None
for name, (rc, secs) in times.items():
    path = os.path.join(out, name, "report.json")
    if rc != 0 or not os.path.exists(path):
        rows.append(f"| {name} | failed (exit {rc}, see {name}.log) | | | | | |")
        continue
    rep = json.load(open(path))
    faces = None
    for m in rep["methods"]:
        if m["method"] == "bicubic" and not any(r.startswith("| bicubic") for r in rows):
            rows.insert(0, f"| bicubic (the guide) | {m['psnr']['mean']:.2f} | {m['ssim']['mean']:.4f} | {m['consistency']['mean']:.2f} | {m['cs']['mean']:.4f} | | |")
        if m["method"] in ("HR vs HR", "bicubic"):
            continue
        faces = m["faces"]
        vals = {k: m[k]["mean"] for k in ("psnr", "ssim", "consistency", "cs")}
        if name == "paper":
            ref = vals
        rel = "" if ref is None else f"{100 * (vals['psnr'] - ref['psnr']) / ref['psnr']:+.1f} % / {100 * (vals['cs'] - ref['cs']) / ref['cs']:+.1f} %"
        rows.append(f"| {name} ({rep['config']['steps']} steps) | {vals['psnr']:.2f} | {vals['ssim']:.4f} | {vals['consistency']:.2f} | {vals['cs']:.4f} | {secs / max(faces, 1):.3f} s | {rel} |")
with open(os.path.join(out, "table.md"), "w") as f:
    f.write(f"Held-out faces: {limit} (or fewer); wall-clock per face includes loading and metrics.\n\n")
    f.write("| sampler (network evaluations) | PSNR | SSIM | consistency | CS | s / face | PSNR / CS vs the paper's sampler |\n|---|---|---|---|---|---|---|\n")
    f.write("\n".join(rows) + "\n")
print(open(os.path.join(out, "table.md")).read())
PY
