#!/usr/bin/env bash
# Issue 16, quality step 3 (class-specific part): on ../shared/data/carparts, split by key (sorted,
# fixed: first N_TRAIN train, last N_TEST test), learn on train without part labels, score on test:
#   object clusters -> decoder -> rank (per-class clusters, --as-targets)
#   -> class-specific self-training (--recipe partdistillation: the ranked clusters as classes)
#   -> predict on the unseen test images -> pooled NMI / ARI / mIoU of pred_parts.png (class ids),
# against rank alone on the same test images (the decoder's proposals ranked by the fitted model).
# gt_parts.png (from the COCO part instances) gives the object mask (--fg-from / --objects-from
# gt_parts) and the scores only; no part label is learnt from.
# Usage: bash benchmarks/quality_carparts_selftrain.sh [OUT] ; tiny: N_TRAIN=24 N_TEST=8 STEPS=40 SIZE=160
set -euo pipefail
out="${1:-quality-carparts-selftrain}"
data="${PARTKIT_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}/data/carparts"
n_train="${N_TRAIN:-300}"; n_test="${N_TEST:-100}"; steps="${STEPS:-300}"; size="${SIZE:-224}"; k="${K:-8}"
dec=(--queries "${QUERIES:-50}" --hidden 128 --dec-layers 3)
common=(--batch-size 4 --crop-grid 20 --warmup 10 --log-every 20)
mkdir -p "$out/train_imgs" "$out/test_imgs"
ls "$data/images" | sort -V > "$out/keys.txt"
head -n "$n_train" "$out/keys.txt" | while read -r f; do ln -sf "$data/images/$f" "$out/train_imgs/$f"; done
tail -n "$n_test" "$out/keys.txt" | while read -r f; do ln -sf "$data/images/$f" "$out/test_imgs/$f"; done

for split in train test; do
  [ -e "$out/$split/000000.tar" ] || partkit pack "$out/${split}_imgs" --coco "$data/annotations.json" --coco-as parts \
    --category car | partkit extract --model efficientnet_lite0 --size "$size" -o "$out/$split"
done
partkit cluster "$out/train" --scope object --fg-from gt_parts -k 4 -o "$out/clusters"
partkit train-decoder "$out/clusters" --out "$out/decoder" "${dec[@]}" "${common[@]}" --max-steps "$steps" \
  --lr 1e-3 --checkpoint-every "$steps"
partkit predict "$out/train" --checkpoint "$out/decoder" --topk 50 -o "$out/train_props"
partkit rank fit "$out/train_props" --model-out "$out/rank.npz" -k "$k" --objects-from gt_parts
partkit rank apply "$out/train_props" --model "$out/rank.npz" --objects-from gt_parts --as-targets \
  -o "$out/train_targets"
partkit self-train "$out/train_targets" --teacher "$out/decoder" --labeled "$out/train_targets" \
  --labeled-field targets.png --recipe partdistillation --out "$out/final" "${common[@]}" \
  --max-steps "$steps" --lr 1e-3 --checkpoint-every "$steps"

# unseen images: rank alone vs the class-specific decoder
partkit predict "$out/test" --checkpoint "$out/decoder" --topk 50 \
  | partkit rank apply - --model "$out/rank.npz" --objects-from gt_parts -o "$out/test_ranked"
partkit predict "$out/test" --checkpoint "$out/final" --topk 50 --label-map -o "$out/test_final"
partkit eval nmi ari miou "$out/test_ranked" --pred ranked_parts.png --json "$out/rank.json"
partkit eval nmi ari miou "$out/test_final" --pred pred_parts.png --json "$out/final.json"
python - "$out" <<'PY'
import json, sys
print(f"{'method (unseen images)':42s} {'NMI':>6s} {'ARI':>6s} {'mIoU':>6s}")
for name, f in (("rank alone (ranked_parts.png)", "rank"), ("class-specific self-train (pred_parts.png)", "final")):
    m = json.load(open(f"{sys.argv[1]}/{f}.json"))["metrics"]
    print(f"{name:42s} {m['nmi']['value']:6.2f} {m['ari']['value']:6.2f} {m['miou']['value']:6.2f}")
PY
