#!/usr/bin/env bash
# PartDistill (Umam et al., CVPR 2024) at toy scale: a 2D teacher (partkit's own unsupervised
# parts on EfficientNet-Lite0 features, offline) labels rendered views of ShapeNetPart caps, the
# labels are back-projected to the points, and a 3D student learns from all shapes at once; the
# saved student then segments shapes it never saw (no teacher, no training).
# pack -> distill-3d --teacher parts --save-views -> distill-3d --student -> eval miou-3d -> show points --ply
# Usage: bash examples/distill3d.sh [OUT_DIR]   (default: distill3d-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-distill3d-demo}"
mkdir -p "$out"

# 5 caps in two shards: learn on the first 3, then label the 2 the student never saw
partkit pack "$here/data/shapenetpart/cap_val.npz" -o "$out/caps" --shard-size 3
cp "$out/caps/000000.tar" "$out/train.tar"
cp "$out/caps/000001.tar" "$out/new.tar"
partkit distill-3d "$out/train.tar" --teacher parts --size 112 --epochs "${EPOCHS:-12}" --width 32 \
  --out "$out/run" --save-views "$out/diagnostics" > "$out/train_pred.tar"
partkit distill-3d "$out/new.tar" --student "$out/run" > "$out/new_pred.tar"
partkit eval miou-3d "$out/new_pred.tar" --match-on "$out/train_pred.tar" --json "$out/metrics.json"
partkit show points "$out/new_pred.tar" -o "$out/views" --ply "$out/ply"
echo "distill3d example: student in $out/run, its labels on unseen shapes in $out/new_pred.tar," \
     "metrics in $out/metrics.json, teacher views and coverage in $out/diagnostics," \
     "pictures in $out/views, coloured .ply files in $out/ply" >&2
