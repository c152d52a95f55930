"""Real data (CIHP): the decoder's proposals recall ground-truth parts at least as well as the raw
clusters it was trained on (PartDistillation Fig. 3); (CCP, 30 people, below) self-training raises
the recall of the teacher it starts from.

Protocol: pack the 5 shared CIHP images with their part labels, extract efficientnet_lite0
hypercolumns (size 160), cluster each person (--scope object --fg-from gt_parts, k=4), train the
decoder on those clusters (400 steps, lr 1e-3, 30 queries), and compare AR@10 (COCO-style AR over
IoU 0.5:0.95, pooled, x100) of the decoder's top proposals with that of the raw clusters, each
against one mask per ground-truth part id (47 masks: one IoU crossing moves AR@10 by 0.21). Train
and evaluation use all 5 images (all-on-all): the per-object clusters of a held-out image are fit
on that image itself, which no decoder trained on 4 other people can match at CI-sized training.

Measured here (seed 0, 2 cores, training views made by the loader's workers): raw clusters AR@10 =
4.26 (AR@1 0.64); decoder AR@10 = 4.26 (AR@1 1.70) -- the decoder reproduces the clusters' recall
and ranks them better. This check is at the level of one IoU crossing: decoders trained with seeds
0-4 scored 4.26 / 4.47 / 4.04 / 4.04 / 4.04 (with the views made in the training process, before:
4.68 / 4.04 / 4.47 / 3.83 / 4.26), and on the 30 CCP people below (raw clusters 2.94) 3.27 / 2.62 /
2.24 for seeds 0-2. The held-out evidence that the decoder beats the clusters is the car-parts run
(scripts/quality_carparts.py: AR@10 7.75 vs 7.12, AR@1 4.44 vs 1.64, on 100 held-out cars).

Self-training is not checked on CIHP: on 5 people it moves AR@10 by one or two IoU crossings either
way with the seed, so a check there tests the seed. Measured (60 / 300 steps, EMA 0.99, threshold
0.7, student seeds 0 / 1 / 2): teacher 4.26, students 4.04 / 4.26 / 4.04 and 4.26 / 4.26 / 4.04;
with the views made in the training process (teacher 4.68): 4.68 / 4.47 / 4.04 and 4.26 / 4.68 /
4.26. The CCP check below measures it on 6x the people.
"""
import pytest

from partkit.cluster import cluster
from partkit.decoder import TrainConfig, predict, train_decoder
from partkit.decoder.predict import proposals_from_labels
from partkit.evaluate import evaluate
from partkit.extract import extract
from partkit.io import Output, encode_json
from partkit.pack import pack
from partkit.selftrain import self_train_masks
from conftest import read_shard, write_shard


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cihp_dir):
    tmp = tmp_path_factory.mktemp("dq")
    pack([str(cihp_dir / "images")], labels=str(cihp_dir / "labels"), output=Output(str(tmp / "packed")))
    return _teacher_from_clusters(tmp, k=4)


def _teacher_from_clusters(tmp, k):
    """The protocol after packing (``tmp/packed``): hypercolumns at 160 px, k clusters per person, a 400-step
    decoder trained on them (``tmp/parts``, ``tmp/run``)."""
    extract([str(tmp / "packed")], model="efficientnet_lite0", size=160, output=Output(str(tmp / "feats")))
    cluster([str(tmp / "feats")], scope="object", fg_from="gt_parts", k=k, seed=0, output=Output(str(tmp / "parts")))
    tc = TrainConfig(max_steps=400, batch_size=2, warmup=10, lr=1e-3, crop_grid=20, num_points=256,
                     checkpoint_every=400, log_every=50)
    train_decoder([str(tmp / "parts")], str(tmp / "run"), train=tc, seed=0,
                  decoder={"num_queries": 30, "hidden_dim": 64, "num_heads": 4, "ffn_dim": 256, "num_layers": 2})
    return tmp


def _self_train(tmp, steps):
    """Self-training from the teacher in ``tmp/run`` (student initialised from it, no burn-in, EMA 0.99,
    pseudo-labels above 0.7) into ``tmp/st``."""
    tc = TrainConfig(max_steps=steps, batch_size=2, warmup=5, lr=1e-4, crop_grid=20, num_points=256,
                     checkpoint_every=steps, log_every=10)
    self_train_masks([str(tmp / "parts")], str(tmp / "st"), str(tmp / "run"), student_init="teacher", burn_in=0,
                     ema_decay=0.99, score_threshold=0.7, train=tc, seed=0)


def _ar(path):
    return evaluate([str(path)], ["ar"])["metrics"]["ar"]  # x100, as the papers report


def _predicted_ar(parts, checkpoint, out, teacher=False):
    predict([str(parts)], str(checkpoint), topk=30, use_teacher=teacher, output=Output(str(out)))
    return _ar(out / "000000.tar")


def test_decoder_recalls_parts_at_least_as_well_as_raw_clusters(trained):
    tmp = trained
    raw = [{**{k: v for k, v in s.items() if k != "__url__"},
            "proposals.json": encode_json(proposals_from_labels(s, "parts.png"))}
           for s in read_shard(tmp / "parts" / "000000.tar")]
    raw_ar = _ar(write_shard(tmp / "raw.tar", raw))
    dec_ar = _predicted_ar(tmp / "parts", tmp / "run", tmp / "pred")
    assert dec_ar["ar@10"] >= raw_ar["ar@10"] > 0


# CCP: the first 30 people of Clothing Co-Parsing (58 clothing / hair / skin names as ground-truth parts), the
# same protocol at k = 6. With 6x the people (about 200 ground-truth parts against CIHP's 47), one IoU
# crossing moves AR@10 by ~0.05 instead of 0.21, and self-training has an effect to measure. Measured here
# (seed 0 teacher, AR@10 3.27): students 3.55 / 3.64 / 3.41 after 300 steps (student seeds 0 / 1 / 2). With
# the views made in the training process (before): teacher 2.80, students 2.94 / 2.94 / 2.90; 2.71 / 2.94 /
# 2.90 after 60 steps (a coin flip); a teacher trained with seed 1 (2.38): 2.71 / 3.04 / 3.08.
CCP_IMAGES, CCP_K = 30, 6


@pytest.fixture(scope="module")
def ccp_trained(tmp_path_factory):
    from conftest import SHARED

    ccp = SHARED / "ccp"
    if not (ccp / "images").is_dir():
        pytest.fail(f"shared data missing at {ccp}; set PARTKIT_SHARED to the shared/ folder")
    tmp = tmp_path_factory.mktemp("ccp")
    files = sorted((ccp / "images").glob("*.jpg"))[:CCP_IMAGES]
    pack([str(f) for f in files], labels=str(ccp / "labels"), label_names=str(ccp / "label_names.json"),
         output=Output(str(tmp / "packed")))
    return _teacher_from_clusters(tmp, k=CCP_K)


def test_self_training_raises_the_teachers_recall_on_ccp(ccp_trained):
    """PartDistillation's self-training (student from the teacher, EMA teacher, pseudo-labels above 0.7)
    improves recall over the teacher it starts from: strictly higher AR@10 after 300 steps."""
    tmp = ccp_trained
    _self_train(tmp, 300)
    teacher = _predicted_ar(tmp / "parts", tmp / "run", tmp / "pred_t")
    student = _predicted_ar(tmp / "parts", tmp / "st", tmp / "pred_s")
    assert student["ar@10"] > teacher["ar@10"] > 0


def test_carparts_quality_script_runs_tiny(tmp_path):
    """scripts/quality_carparts.py (PartDistillation's stages on the car-parts split) at toy size."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, SHARED

    env = {**os.environ, "PARTKIT_SHARED": str(SHARED.parent)}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "quality_carparts.py"), "--tiny", "--work",
                          str(tmp_path / "q")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.splitlines()[-1])["rows"]
    assert list(rows) == ["baseline: dataset k-means", "object clusters", "decoder", "rank",
                          "class-specific self-train"]
    assert all(0 <= v <= 100 for r in rows.values() for v in r.values())
    assert all("ar@10" in rows[r] for r in ("object clusters", "decoder", "rank", "class-specific self-train"))
    assert "class-specific self-train" in res.stderr  # the table
