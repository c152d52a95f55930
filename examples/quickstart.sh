#!/usr/bin/env bash
# The main job on the bundled examples, offline: pack -> extract -> cluster -> eval -> show.
# Usage: bash examples/quickstart.sh [OUT_DIR]   (default: partkit-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-partkit-demo}"
mkdir -p "$out"

# images + part labels -> EfficientNet-Lite0 hypercolumns (weights ship with pip) -> k=4 parts per person
partkit pack "$here/data/cihp/images" --labels "$here/data/cihp/labels" --provenance "CIHP samples" \
  | partkit extract --model efficientnet_lite0 --size 224 \
  | partkit cluster - --scope object --fg-from gt_parts -k 4 \
  > "$out/parts.tar"

# metrics: JSON on stdout (here a file), the table on stderr (here a file too)
partkit eval nmi ari miou "$out/parts.tar" --json "$out/metrics.json" 2> "$out/metrics.txt"
cat "$out/metrics.txt" >&2

# pictures: image | predicted parts | ground truth, and the cluster-vs-part confusion map
partkit show overlays "$out/parts.tar" -o "$out/overlays"
partkit show confusion "$out/parts.tar" -o "$out/confusion"

echo "partkit quick start: parts in $out/parts.tar, metrics in $out/metrics.json ($out/metrics.txt)," \
     "pictures in $out/overlays/ and $out/confusion/" >&2
