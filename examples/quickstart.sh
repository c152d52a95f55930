#!/usr/bin/env bash
# The main job on the bundled examples: pack -> extract -> cluster -> eval, offline, in about a minute.
# Usage: bash examples/quickstart.sh [OUT_DIR]   (default: partkit-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-partkit-demo}"
mkdir -p "$out"

# 1. images + part labels -> shards;  2. EfficientNet-Lite0 hypercolumns (weights ship with pip)
partkit pack "$here/data/cihp/images" --labels "$here/data/cihp/labels" --provenance "CIHP samples" \
  | partkit extract --model efficientnet_lite0 --size 224 \
  > "$out/features.tar"
echo "features: $out/features.tar" >&2
