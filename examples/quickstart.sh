#!/usr/bin/env bash
# The main job on the bundled examples, offline: pack -> extract -> cluster -> eval -> show.
# Usage: bash examples/quickstart.sh [OUT_DIR]   (default: partkit-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-partkit-demo}"
mkdir -p "$out"

# images + named part labels -> EfficientNet-Lite0 hypercolumns (weights ship with pip) -> 10 parts shared by
# all images: k-means over the person pixels of the whole dataset, so cluster 3 is the same part in every image
partkit pack "$here/data/cihp/images" --labels "$here/data/cihp/labels" \
    --label-names "$here/data/cihp/label_names.json" --provenance "CIHP samples" \
  | partkit extract --model efficientnet_lite0 --size 320 \
  | partkit cluster - --scope dataset --fg-from gt_parts -k 10 \
  > "$out/parts.tar"

# metrics: JSON on stdout (here a file), the tables on stderr (here a file too); parts are named (hair, face, ...)
partkit eval nmi ari miou "$out/parts.tar" --json "$out/metrics.json" 2> "$out/metrics.txt"
cat "$out/metrics.txt" >&2

# pictures: image | predicted parts | ground truth with a legend of part names, the purity grid
# (each cluster's best images, titled by the part most of its pixels fall on), the cluster-vs-part confusion map
partkit show overlays "$out/parts.tar" -o "$out/overlays"
partkit show purity "$out/parts.tar" -o "$out/purity.png"
partkit show confusion "$out/parts.tar" -o "$out/confusion.png"

echo "partkit quick start: parts in $out/parts.tar, metrics in $out/metrics.json ($out/metrics.txt)," \
     "pictures in $out/overlays/, $out/purity.png and $out/confusion.png" >&2
