#!/usr/bin/env bash
# Packs the training faces for the GPU machine, whose carried files are limited (64 MiB with the
# binary and the working tree). Writes into .devcarry/ (git-ignored; these images are never
# committed — see ../shared/data/README.md for their terms):
#
#   .devcarry/faces/         ../shared/data/faces128: the training faces re-encoded as JPEG at the
#                            highest quality that keeps the folder within $MAX_MIB (default: what
#                            the 64 MiB transfer leaves beside the tracked files, the binary and
#                            val128, less a 2 MiB margin, at most 36 MiB);
#                            the 5 % the trainer holds out (--val-fraction 0.05) copied verbatim
#   .devcarry/heldout.txt    the names of those held-out faces (the trainer's own split)
#   .devcarry/val128/        ../shared/data/val128's images as they are
#
# It uses the binary's maintenance command `srsde-fast pack-faces` (the crate's own JPEG codec; no
# Python needed) and prints the quality chosen, the sizes and the mean PSNR of the re-encoding.
# Then, for the GPU run, carry: target/release/srsde-fast .devcarry/faces .devcarry/heldout.txt
# .devcarry/val128 (see scripts/train_default.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

SRC="${SRC:-../shared/data/faces128}"
VAL="${VAL:-../shared/data/val128}"
DEST="${DEST:-.devcarry}"
MAX_MIB="${MAX_MIB:-}"
VAL_FRACTION="${VAL_FRACTION:-0.05}"
BIN="${BIN:-target/release/srsde-fast}"

if [ ! -d "$SRC" ]; then
    echo "error: no training faces at $SRC" >&2
    exit 2
fi
if [ ! -x "$BIN" ]; then
    echo "building $BIN" >&2
    cargo build --release --quiet
fi
# The destination must stay out of git.
case "$DEST" in
.devcarry | .devcarry/*) ;;
*) git check-ignore -q "$DEST" || { echo "error: $DEST is not git-ignored" >&2; exit 2; } ;;
esac

mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
tracked_mib() { git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {printf "%.1f", s / 1048576}'; }
if [ -z "$MAX_MIB" ]; then
    val_mib=0
    [ -d "$VAL" ] && val_mib=$(find "$VAL" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) \
        -print0 | xargs -0 du -cb | awk '$2 == "total" {s += $1} END {printf "%.1f", s / 1048576}')
    MAX_MIB=$(awk -v t="$(tracked_mib)" -v b="$(mib "$BIN")" -v v="$val_mib" \
        'BEGIN { m = 64 - t - b - v - 2; if (m > 36) m = 36; printf "%.1f", m }')
    echo "budget: 64 MiB - tracked $(tracked_mib) - binary $(mib "$BIN") - val128 $val_mib - margin 2 → faces ≤ $MAX_MIB MiB"
fi

rm -rf "$DEST/faces" "$DEST/val128" "$DEST/heldout.txt"
mkdir -p "$DEST"
"$BIN" pack-faces "$SRC" -o "$DEST/faces" --val-fraction "$VAL_FRACTION" --max-mib "$MAX_MIB" \
    --heldout-list "$DEST/heldout.txt"

if [ -d "$VAL" ]; then
    mkdir -p "$DEST/val128"
    find "$VAL" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) \
        -exec cp {} "$DEST/val128/" \;
else
    echo "note: no $VAL; skipping the val128 copy" >&2
fi

echo "faces:   $(find "$DEST/faces" -type f | wc -l) files, $(mib "$DEST/faces") MiB"
echo "heldout: $(wc -l <"$DEST/heldout.txt") names"
[ -d "$DEST/val128" ] && echo "val128:  $(find "$DEST/val128" -type f | wc -l) files, $(mib "$DEST/val128") MiB"
echo "binary:  $(mib "$BIN") MiB ($BIN)"
echo "tracked: $(tracked_mib) MiB (the working tree travels too; so do untracked, not ignored files)"
carry=("$BIN" "$DEST/faces" "$DEST/heldout.txt")
[ -d "$DEST/val128" ] && carry+=("$DEST/val128")
echo "carry:   $(mib "${carry[@]}") MiB (+ the tracked files) of the device's 64 MiB limit"
