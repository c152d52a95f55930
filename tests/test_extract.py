"""partkit extract: real weights on real images, ViT facets, geometry, determinism, bad images."""
import io

import numpy as np
import pytest
from PIL import Image

from partkit.errors import BadSample, SkipBad
from partkit.extract import extract
from partkit.grid import grid_to_image, mask_to_grid
from partkit.io import Output, decode_json, decode_npy
from partkit.pack import pack
from conftest import read_shard, write_shard


@pytest.fixture(scope="module")
def cihp_shard(tmp_path_factory, cihp_dir):
    out = tmp_path_factory.mktemp("cihp")
    pack([str(cihp_dir / "images")], labels=str(cihp_dir / "labels"), output=Output(str(out)))
    return str(out / "000000.tar")


def test_efficientnet_hypercolumns_on_cihp(tmp_path, cihp_shard):
    out = tmp_path / "f"
    extract([cihp_shard], model="efficientnet_lite0", size=128, batch_size=2, output=Output(str(out)))
    samples = read_shard(out / "000000.tar")
    assert len(samples) == 5
    for s in samples:
        feat, meta = decode_npy(s, "feat.npy"), decode_json(s, "feat.json")
        assert feat.dtype == np.float16 and feat.shape == (40 + 112 + 320, *meta["grid"])
        h, w = meta["image_size"]
        assert max(meta["resized"]) == 128 and meta["stride"] == 8 and meta["kind"] == "hypercolumn"
        assert meta["grid"] == [-(-meta["resized"][0] // 8), -(-meta["resized"][1] // 8)]
        # each of the three stages is L2-normalised per cell: squared norm of the cell is 3
        norms = (feat.astype(np.float32) ** 2).sum(0)
        assert np.allclose(norms, 3.0, atol=0.02)
        assert "gt_parts.png" in s and "jpg" in s  # other stages' fields pass through
        # grid geometry maps back to the image size
        assert grid_to_image(np.zeros(meta["grid"]), meta).shape == (h, w)
        assert mask_to_grid(np.ones((h, w), bool), meta).min() == 1.0


def test_same_input_gives_byte_identical_tars(tmp_path, cihp_shard):
    for name in ("a", "b"):
        extract([cihp_shard], model="timm:vit_tiny_patch16_224", weights="none", size=64, seed=3,
                output=Output(str(tmp_path / name)))
    assert (tmp_path / "a" / "000000.tar").read_bytes() == (tmp_path / "b" / "000000.tar").read_bytes()


def test_vit_key_facet_with_overlapping_stride_and_saliency(tmp_path, cihp_shard):
    out = tmp_path / "v"
    extract([cihp_shard], model="timm:vit_tiny_patch16_224", weights="none", facet="key", stride=8, size=64,
            saliency=True, layers=[-1], output=Output(str(out)))
    s = read_shard(out / "000000.tar")[0]
    meta, feat, sal = decode_json(s, "feat.json"), decode_npy(s, "feat.npy"), decode_npy(s, "saliency.npy")
    assert meta["kind"] == "key" and meta["stride"] == 8 and meta["offset"] == 4.0
    assert feat.shape[1:] == sal.shape == tuple(meta["grid"]) and feat.shape[0] == 192
    assert 0 < sal.max() <= 1.0


def test_rgb_colour_baseline(tmp_path, cihp_shard):
    extract([cihp_shard], model="rgb", size=64, output=Output(str(tmp_path / "r")))
    s = read_shard(tmp_path / "r" / "000000.tar")[0]
    assert decode_npy(s, "feat.npy").shape[0] == 3


def _png(im):
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def test_odd_images_and_bad_images(tmp_path):
    good = [{"__key__": f"g{i}", "png": _png(im)} for i, im in enumerate([
        Image.new("L", (50, 20), 128), Image.new("RGBA", (20, 50), (1, 2, 3, 4)),
        Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))])]
    src = write_shard(tmp_path / "in.tar", good)
    extract([src], model="timm:vit_tiny_patch16_224", weights="none", size=32, output=Output(str(tmp_path / "o")))
    assert len(read_shard(tmp_path / "o" / "000000.tar")) == 3

    bad = good + [{"__key__": "tiny", "png": _png(Image.new("RGB", (12, 12)))},
                  {"__key__": "notimg", "jpg": b"GIF89a nonsense"}]
    src = write_shard(tmp_path / "bad.tar", bad)
    with pytest.raises(BadSample, match="smaller than the model's 16-pixel patch"):
        extract([src], model="timm:vit_tiny_patch16_224", weights="none", size=32,
                output=Output(str(tmp_path / "o2")))
    assert not list((tmp_path / "o2").glob("*.tar"))  # nothing half-written
    summary = extract([src], model="timm:vit_tiny_patch16_224", weights="none", size=32, handler=SkipBad(),
                      output=Output(str(tmp_path / "o3")))
    assert summary["skipped"] == 2 and summary["written"] == 3


def test_rgb_grid_stride_matches_its_recorded_grid(tmp_path, cihp_shard):
    extract([cihp_shard], model="rgb", size=64, grid_stride=8, output=Output(str(tmp_path / "r8")))
    s = read_shard(tmp_path / "r8" / "000000.tar")[0]
    meta, feat = decode_json(s, "feat.json"), decode_npy(s, "feat.npy")
    assert meta["stride"] == 8 and list(feat.shape[1:]) == meta["grid"] == [-(-r // 8) for r in meta["resized"]]
