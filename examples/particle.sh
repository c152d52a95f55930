#!/usr/bin/env bash
# PARTICLE (Saha & Maji, 2023) at toy scale: per-image k-means of hypercolumns gives parts, a
# part-contrastive loss on the last feature map fine-tunes the backbone (a first stage and one
# shorter round, each with its own learning rate; the round's k-means continues the first partition),
# then the fine-tuned weights are used to extract and cluster again.
# pack -> extract -> cluster --scope image -> self-train --objective part-contrast -> extract -> eval.
# Usage: bash examples/particle.sh [OUT_DIR]   (default: particle-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-particle-demo}"
mkdir -p "$out"

partkit pack "$here/data/cihp/images" --labels "$here/data/cihp/labels" -o "$out/packed"
partkit extract "$out/packed" --model efficientnet_lite0 --size 128 \
  | partkit cluster --scope image -k 8 > "$out/parts_before.tar"

partkit self-train "$out/packed" --objective part-contrast --out "$out/run" --model efficientnet_lite0 \
  --size 128 -k 25 --rounds 2 --epochs "${EPOCHS:-2}" --round-epochs 1 --warmup 1 --batch-size 4 --proj-hidden 256 \
  --checkpoint-every 100

partkit extract "$out/packed" --model efficientnet_lite0 --weights "$out/run" --size 128 \
  | partkit cluster --scope image -k 8 > "$out/parts_after.tar"

partkit eval nmi ari probe "$out/parts_before.tar" --probe-train 3 --json "$out/metrics_before.json"
partkit eval nmi ari probe "$out/parts_after.tar" --probe-train 3 --json "$out/metrics_after.json"
echo "particle example: backbone in $out/run/backbone.pt, metrics in $out/metrics_{before,after}.json" >&2
