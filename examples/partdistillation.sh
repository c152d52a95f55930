#!/usr/bin/env bash
# PartDistillation (Cho et al., CVPR 2023) at toy scale on the bundled CIHP images:
# pack -> extract -> cluster per object (k=4) -> train-decoder -> self-train -> predict
# -> rank fit/apply (--as-targets) -> class-specific self-train (--recipe partdistillation) -> predict
# -> eval (nmi, ari, miou, ar; pooled on the class ids of pred_parts.png) -> show (overlays, purity grids).
# Usage: bash examples/partdistillation.sh [OUT_DIR]   (default: partdistillation-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-partdistillation-demo}"
mkdir -p "$out"
steps="${STEPS:-60}"   # tiny so CI stays within minutes; use thousands for real runs
dec=(--queries 20 --hidden 64 --dec-layers 2)

partkit pack "$here/data/cihp/images" --labels "$here/data/cihp/labels" \
  | partkit extract --model efficientnet_lite0 --size 160 \
  | partkit cluster --scope object --fg-from gt_parts -k 4 -o "$out/clusters"

partkit train-decoder "$out/clusters" --out "$out/decoder" "${dec[@]}" --max-steps "$steps" --lr 1e-3 \
  --batch-size 2 --crop-grid 20 --warmup 5 --checkpoint-every "$steps"
partkit self-train "$out/clusters" --teacher "$out/decoder" --out "$out/selftrain" --max-steps "$((steps / 2))" \
  --batch-size 2 --crop-grid 20 --warmup 2 --recipe partdistillation --checkpoint-every "$((steps / 2))"
partkit predict "$out/clusters" --checkpoint "$out/selftrain" --topk 20 --label-map -o "$out/proposals"

partkit rank fit "$out/proposals" --model-out "$out/rank.npz" -k 4 --objects-from gt_parts --default-class person
partkit rank apply "$out/proposals" --model "$out/rank.npz" --objects-from gt_parts --default-class person \
  --as-targets -o "$out/ranked"

# final stage (Sec. 4.3): the ranked clusters as classes -> a class-aware decoder -> class ids in pred_parts.png
partkit self-train "$out/ranked" --teacher "$out/selftrain" --labeled "$out/ranked" --labeled-field targets.png \
  --recipe partdistillation --out "$out/final" --max-steps "$((steps / 4))" --batch-size 2 --crop-grid 20 \
  --warmup 2 --checkpoint-every "$((steps / 4))"
partkit predict "$out/clusters" --checkpoint "$out/final" --topk 20 --label-map -o "$out/final_parts"
partkit eval nmi ari miou "$out/final_parts" --pred pred_parts.png --json "$out/metrics_final.json"

partkit eval nmi ari miou "$out/ranked" --pred ranked_parts.png --json "$out/metrics_ranked.json"
partkit eval ar "$out/ranked" --json "$out/metrics_ar.json"
partkit show overlays "$out/ranked" --pred ranked_parts.png -o "$out/overlays"
partkit show purity "$out/ranked" --per-class -o "$out/purity"
echo "partdistillation example: metrics in $out/metrics_*.json, pictures in $out/overlays and $out/purity" >&2
