#!/usr/bin/env bash
# PartDistill (Umam et al., CVPR 2024) at toy scale: a 2D teacher (partkit's own unsupervised
# parts on EfficientNet-Lite0 features, offline) labels rendered views of ShapeNetPart caps, the
# labels are back-projected to the points, and a 3D student learns from all shapes at once.
# pack -> distill-3d --teacher parts -> eval miou-3d -> show points.
# Usage: bash examples/distill3d.sh [OUT_DIR]   (default: distill3d-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-distill3d-demo}"
mkdir -p "$out"

partkit pack "$here/data/shapenetpart/cap_val.npz" \
  | partkit distill-3d --teacher parts --size 160 --epochs "${EPOCHS:-20}" --width 32 --out "$out/run" \
  > "$out/shapes.tar"
partkit eval miou-3d "$out/shapes.tar" --json "$out/metrics.json"
partkit show points "$out/shapes.tar" -o "$out/views"
echo "distill3d example: predictions in $out/shapes.tar, metrics in $out/metrics.json, views in $out/views," \
     "student in $out/run" >&2
