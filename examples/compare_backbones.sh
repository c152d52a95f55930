#!/usr/bin/env bash
# Part-awareness of backbones, with Zhu et al.'s protocols (part retrieval, linear part
# classification, linear part segmentation) plus partkit's fast sklearn probe, over every backbone
# usable offline here (weights shipped with pip, the colour baseline, a tiny randomly initialised
# ViT), printed as one table. CIHP has no keypoints: the "keypoints" are the centroids of six
# labelled parts per image (hair, face, upper clothes, pants, left/right arm), so retrieval and
# part classification ask "which part is this patch from?". 5 images: a demo, not a benchmark
# (the first 3 images train the probes, the other 2 score them).
# Usage: bash examples/compare_backbones.sh [OUT_DIR]   (default: compare-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-compare-demo}"
mkdir -p "$out"

# one COCO object per image (the labelled pixels' box) whose keypoints are part centroids
python - "$here/data/cihp" "$out/centroids.json" <<'PY'
import json, os, sys
import numpy as np
from PIL import Image
src, dst = sys.argv[1:]
names = json.load(open(f"{src}/label_names.json"))
parts = [2, 13, 5, 9, 14, 15]  # hair, face, upper-clothes, pants, left-arm, right-arm
images, anns = [], []
for i, f in enumerate(sorted(os.listdir(f"{src}/labels"))):
    lab = np.asarray(Image.open(f"{src}/labels/{f}"))
    ys, xs = np.nonzero(lab)
    x0, y0, x1, y1 = map(float, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    kpts = []
    for p in parts:
        py, px = np.nonzero(lab == p)
        kpts += [float(px.mean()), float(py.mean()), 2] if px.size else [0.0, 0.0, 0]
    images.append({"id": i, "file_name": f.replace(".png", ".jpg"), "height": lab.shape[0], "width": lab.shape[1]})
    anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "area": (x1 - x0) * (y1 - y0), "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "keypoints": kpts})
cats = [{"id": 1, "name": "person", "keypoints": [names[str(p)] for p in parts]}]
json.dump({"images": images, "annotations": anns, "categories": cats}, open(dst, "w"))
PY
partkit pack "$here/data/cihp/images" --labels "$here/data/cihp/labels" \
  --label-names "$here/data/cihp/label_names.json" --coco "$out/centroids.json" -o "$out/packed"
backbones=("efficientnet_lite0" "efficientnet_lite0:none" "timm:vit_tiny_patch16_224:none")
for entry in "${backbones[@]}"; do
  model="${entry%:none}"; weights=()
  [[ "$entry" == *:none ]] && weights=(--weights none)
  name="$(echo "$entry" | tr ':/' '__')"
  # eval on one thread: the probes are many tiny torch ops, which two contending threads slow ~5x
  partkit -q extract "$out/packed" --model "$model" "${weights[@]}" --size 128 --patches-at keypoints \
    | partkit -q --threads 1 eval retrieval part-cls linear-seg probe --retrieval-features patches --probe-train 3 \
        --probe-iters 300 --region full > "$out/$name.json"
done
python - "$out" "${backbones[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print(f"{'backbone':34s} {'retr mAP':>8s} {'part-cls':>8s} {'lin-seg':>8s} {'sk-probe':>8s}"
      "   (CIHP, 5 images; x100; part-cls/lin-seg: Zhu et al.'s probes; sk-probe: sklearn, feature cells)")
for n in names:
    m = json.load(open(f"{out}/{n.replace(':', '_').replace('/', '_')}.json"))["metrics"]
    row = [m["retrieval"]["value"], m["part-cls"]["value"], m["linear-seg"]["value"], m["probe"]["value"]]
    print(f"{n:34s} " + " ".join(f"{v:8.2f}" for v in row))
PY
echo "compare_backbones example: per-backbone JSON in $out/" >&2
