#!/usr/bin/env bash
# Part-awareness of backbones (Zhu et al.-style comparison): the same extract -> cluster -> eval
# pipeline over every backbone usable offline here (weights shipped with pip, the colour baseline,
# and a tiny randomly initialised ViT), printed as one table.
# Usage: bash examples/compare_backbones.sh [OUT_DIR]   (default: compare-demo/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-compare-demo}"
mkdir -p "$out"

partkit pack "$here/data/cihp/images" --labels "$here/data/cihp/labels" -o "$out/packed"
backbones=("efficientnet_lite0" "efficientnet_lite0:none" "rgb" "timm:vit_tiny_patch16_224:none")
for entry in "${backbones[@]}"; do
  model="${entry%:none}"; weights=()
  [[ "$entry" == *:none ]] && weights=(--weights none)
  name="$(echo "$entry" | tr ':/' '__')"
  partkit -q extract "$out/packed" --model "$model" "${weights[@]}" --size 128 \
    | partkit -q cluster --scope dataset --fg-from gt_parts -k 8 \
    | partkit -q eval nmi ari > "$out/$name.json"
done
python - "$out" "${backbones[@]}" <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print(f"{'backbone':36s} {'NMI':>6s} {'ARI':>6s}   (CIHP, dataset-scope k=8 on fg cells, pooled fg pixels, x100)")
for n in names:
    m = json.load(open(f"{out}/{n.replace(':', '_').replace('/', '_')}.json"))["metrics"]
    print(f"{n:36s} {m['nmi']['value']:6.2f} {m['ari']['value']:6.2f}")
PY
echo "compare_backbones example: per-backbone JSON in $out/" >&2
