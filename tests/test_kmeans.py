"""partkit.kmeans, as its modules: the engine (batched, weighted), seeding, faiss, the public API."""
import zlib

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SkKMeans
from sklearn.metrics import adjusted_rand_score

from partkit.errors import PartkitError
from partkit.kmeans import KMeans, batched_kmeans, elbow_kmeans, nearest_center, normalize_rows, weighted_kmeans


def blobs(n=300, d=16, k=4, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(size=(n, d)) * spread).astype(np.float32), y


def stacked(problems):
    """One matrix and its row groups, as weighted_kmeans takes them."""
    sizes = np.cumsum([0, *(len(p) for p in problems)])
    return np.concatenate(problems), [np.arange(sizes[i], sizes[i + 1]) for i in range(len(problems))]


# ---------------------------------------------------------------------------------------------
# The engine: many problems batched


def test_estimator_equals_batched_and_batching_does_not_change_results():
    X, _ = blobs(seed=2)
    others = [blobs(n, 16, 3, seed=10 + n)[0] for n in (50, 120, 7, 300)]
    single = KMeans(4, random_state=5).fit(X)
    batched = batched_kmeans([X], 4, random_state=5)[0]
    np.testing.assert_array_equal(single.labels_, batched.labels)
    seeds = [[5, 0]] + [[9, i] for i in range(len(others))]
    together = batched_kmeans([X, *others], 4, random_state=seeds)
    np.testing.assert_array_equal(together[0].labels, batched.labels)
    # tiny chunks: every problem solved in a batch of its own
    alone = batched_kmeans([X, *others], 4, random_state=seeds, chunk_bytes=1)
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.inertia == pytest.approx(b.inertia, rel=1e-5)


def test_edge_cases_small_empty_constant():
    X, _ = blobs(5)
    r = batched_kmeans([X, X[:0], np.ones((20, 16), np.float32), X[:1]], 8)
    assert r[0].n_clusters == 5 and sorted(r[0].labels) == [0, 1, 2, 3, 4]  # k reduced to n cells
    assert r[1].n_clusters == 0 and r[1].labels.shape == (0,)
    assert len(np.unique(r[2].labels)) == 1 and r[2].inertia == pytest.approx(0, abs=1e-6)  # constant features
    assert r[3].n_clusters == 1 and r[3].labels.tolist() == [0]


def test_random_init_relocates_empty_clusters():
    X = np.concatenate([np.zeros((50, 2)), [[10, 0], [11, 0], [0, 12]]]).astype(np.float32)
    for seed in range(5):
        r = batched_kmeans([X], 4, init="random", random_state=seed)[0]
        assert len(np.unique(r.labels)) == 4, seed  # duplicate starts were moved to far points


def test_warm_start_keeps_ids():
    X, y = blobs(seed=4)
    centers = np.stack([X[y == j].mean(0) for j in range(4)])[::-1].copy()
    r = batched_kmeans([X, X[:40]], 1, init=centers)
    assert (r[0].labels == 3 - y).all()
    assert r[1].n_clusters == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_same_labels():
    problems = [blobs(200, 16, 4, seed=s)[0] for s in range(6)]
    cpu = batched_kmeans(problems, 4, device="cpu")
    gpu = batched_kmeans(problems, 4, device="cuda")
    for a, b in zip(cpu, gpu):
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.inertia == pytest.approx(b.inertia, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The engine with sample weights


def test_weighted_integer_weights_equal_repeated_points():
    X, _ = blobs(120, 8, 3, spread=1.0, seed=11)
    w = np.random.default_rng(0).integers(1, 4, len(X))
    weighted = weighted_kmeans(X, w, [np.arange(len(X))], 3, seeds=[[2, 0]])[0]
    repeated = weighted_kmeans(np.repeat(X, w, axis=0), np.ones(w.sum()), [np.arange(w.sum())], 3, seeds=[[2, 0]])[0]
    np.testing.assert_allclose(weighted.centers, repeated.centers, atol=1e-4)
    np.testing.assert_array_equal(np.repeat(weighted.labels, w), repeated.labels)
    assert weighted.inertia == pytest.approx(repeated.inertia, rel=1e-4)


def test_weighted_near_zero_weights_do_not_move_centers_and_zero_is_refused():
    X, _ = blobs(200, 4, 2, seed=12)
    far = np.full((5, 4), 50, np.float32)
    base = weighted_kmeans(X, np.ones(len(X)), [np.arange(len(X))], 2, seeds=[[0, 0]])[0]
    Xf, wf = np.concatenate([X, far]), np.concatenate([np.ones(len(X)), np.full(5, 1e-9)])
    with_far = weighted_kmeans(Xf, wf, [np.arange(len(Xf))], 2, seeds=[[0, 0]])[0]
    np.testing.assert_allclose(np.sort(with_far.centers, 0), np.sort(base.centers, 0), atol=1e-4)
    with pytest.raises(PartkitError, match="positive and finite"):
        weighted_kmeans(Xf, np.concatenate([np.ones(len(X)), np.zeros(5)]), [np.arange(len(Xf))], 2)


def test_weighted_unit_weights_find_the_same_clusters_as_unweighted():
    X, y = blobs(seed=13)
    unweighted = batched_kmeans([X], 4, random_state=0)[0]
    weighted = weighted_kmeans(X, np.ones(len(X)), [np.arange(len(X))], 4)[0]
    assert adjusted_rand_score(unweighted.labels, weighted.labels) == 1.0
    assert weighted.inertia == pytest.approx(unweighted.inertia, rel=1e-4)


def test_weighted_groups_do_not_depend_on_batching():
    problems = [blobs(n, 16, 3, seed=20 + n)[0] for n in (90, 40, 3, 1)]
    X, groups = stacked(problems)
    w = np.random.default_rng(1).uniform(0.1, 1, len(X))
    together = weighted_kmeans(X, w, groups, [3, 4, 5, 2], metric="cosine")
    alone = weighted_kmeans(X, w, groups, [3, 4, 5, 2], metric="cosine", chunk_bytes=1)
    assert [r.n_clusters for r in together] == [3, 4, 3, 1]
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.centers, b.centers, atol=1e-6)


def test_the_engine_serves_rank():
    from partkit.rank import PartRanker
    from partkit.rank import weighted_kmeans as rank_kmeans

    assert rank_kmeans is weighted_kmeans  # rank has no k-means of its own
    X, _ = blobs(200, 12, 4, seed=14)
    y = np.array(["cat", "dog"])[np.arange(len(X)) % 2]
    w = np.random.default_rng(2).uniform(0.3, 1, len(X))
    ranker = PartRanker(3, random_state=7).fit(X, y, w)
    groups = [np.flatnonzero(y == c) for c in ("cat", "dog")]
    direct = weighted_kmeans(X, w, groups, 3, metric="cosine", max_iter=300,
                             seeds=[[7, zlib.crc32(c.encode())] for c in ("cat", "dog")])
    for j, r in enumerate(direct):
        np.testing.assert_array_equal(ranker.cluster_centers_[j], r.centers)
        np.testing.assert_array_equal(ranker.labels_[groups[j]], r.labels)


# ---------------------------------------------------------------------------------------------
# Seeding


def test_mean_inertia_within_one_percent_of_sklearn_on_overlapping_data():
    problems = [blobs(200, 8, 6, spread=1.5, seed=s)[0] for s in range(12)]
    ours = batched_kmeans(problems, 6, random_state=0)
    ref = [SkKMeans(6, n_init=1, random_state=i).fit(x).inertia_ for i, x in enumerate(problems)]
    assert np.mean([r.inertia for r in ours]) / np.mean(ref) < 1.01


@pytest.mark.parametrize("init", ["k-means||", "random"])
def test_other_inits_find_the_blobs_and_do_not_depend_on_batching(init):
    X, y = blobs(seed=7)
    others = [blobs(n, 16, 3, seed=n)[0] for n in (30, 200)]
    alone = batched_kmeans([X], 4, init=init, random_state=[[1, 2]])[0]
    together = batched_kmeans([*others, X], 4, init=init, random_state=[[0, 0], [0, 1], [1, 2]])[2]
    np.testing.assert_array_equal(alone.labels, together.labels)
    if init == "k-means||":
        assert adjusted_rand_score(y, alone.labels) == 1.0


# ---------------------------------------------------------------------------------------------
# faiss


def test_faiss_backend_is_seeded_quiet_and_subsamples(capfd):
    X, y = blobs(3000, 8, 5, seed=6)
    km = KMeans(5, backend="faiss", random_state=3, max_points_per_centroid=64).fit(X)
    assert adjusted_rand_score(y, km.labels_) == 1.0
    s = km.faiss_settings_
    assert s["seed"] == 3 and s["max_points_per_centroid"] == 64 and s["trained_on"] == 5 * 64
    assert s["verbose"] is False and s["init"] == "k-means++"
    again = KMeans(5, backend="faiss", random_state=3, max_points_per_centroid=64).fit(X)
    np.testing.assert_array_equal(km.cluster_centers_, again.cluster_centers_)
    assert capfd.readouterr().out == ""  # nothing reached file descriptor 1


# ---------------------------------------------------------------------------------------------
# The public API


def test_matches_sklearn_on_blobs_and_has_estimator_api():
    X, y = blobs()
    km = KMeans(4, random_state=0)
    assert km.fit(X) is km
    ref = SkKMeans(4, n_init=1, random_state=0).fit(X)
    assert km.cluster_centers_.shape == (4, 16) and km.labels_.shape == (300,) and km.n_features_in_ == 16
    assert adjusted_rand_score(y, km.labels_) == 1.0
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-4)
    assert 1 <= km.n_iter_ <= 100
    assert (km.predict(X) == km.labels_).all()
    assert (KMeans(4, random_state=0).fit_predict(X) == km.labels_).all()


def test_cluster_and_package_root_re_export_the_same_names():
    import partkit
    import partkit.cluster
    import partkit.kmeans

    for name in ("KMeans", "KMeansResult", "batched_kmeans", "elbow_kmeans"):
        assert getattr(partkit.cluster, name) is getattr(partkit.kmeans, name)
    assert partkit.KMeans is KMeans and partkit.batched_kmeans is batched_kmeans


def test_bad_inputs_raise_clear_errors():
    X, _ = blobs(20)
    X[3, 2] = np.nan
    with pytest.raises(PartkitError, match="NaN or inf"):
        KMeans(2).fit(X)
    # batched: a problem is looked for when a row's squared norm is not finite; the error names it, whichever seeding its k uses
    ok = blobs(20)[0]
    for bad in (np.nan, np.inf, -np.inf):
        Y = ok.copy()
        Y[7, 1] = bad
        for metric in ("l2", "cosine"):
            with pytest.raises(PartkitError, match="problem 2 holds NaN or inf"):
                batched_kmeans([ok, ok, Y, ok], [2, 15, 15, 2], metric=metric)
            with pytest.raises(PartkitError, match="problem 1 holds NaN or inf"):
                batched_kmeans([ok, Y], 2, metric=metric, init=[ok[:2], ok[:2]])
    # finite values whose squared norm overflows float32 are not NaN or inf: not refused
    huge = ok.copy()
    huge[0] = 1e20
    for k in (2, 15):  # both seedings; the overflowing distances are NaN, the labels still valid ids
        assert all(r.labels.min() >= 0 and r.labels.max() < k for r in batched_kmeans([ok, huge], k))
    with pytest.raises(PartkitError, match="unknown metric"):
        KMeans(2, metric="manhattan").fit(blobs(20)[0])
    with pytest.raises(PartkitError, match="2-D"):
        KMeans(2).fit(np.zeros(5))
    with pytest.raises(PartkitError, match="not fitted"):
        KMeans(2).predict(blobs(20)[0])


def test_cosine_is_scale_invariant_and_l2_is_not():
    X, _ = blobs(seed=3)
    scale = np.random.default_rng(0).uniform(0.1, 10, (len(X), 1)).astype(np.float32)
    a = KMeans(4, metric="cosine", random_state=0).fit(X)
    b = KMeans(4, metric="cosine", random_state=0).fit(X * scale)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(np.linalg.norm(a.cluster_centers_, axis=1) <= 1 + 1e-5, True)
    assert np.allclose(np.linalg.norm(normalize_rows(X, "cosine"), axis=1), 1, atol=1e-6)


def test_nearest_center_matches_a_direct_computation():
    X, _ = blobs(500, 8, 3, seed=15)
    C = X[:3]
    labels, dist = nearest_center(X, C, rows=64)  # several row chunks
    full = ((X[:, None, :] - C[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-4, atol=1e-3)


def test_elbow_picks_the_number_of_blobs():
    problems = [blobs(300, 8, k, spread=0.2, seed=k)[0] for k in (2, 3, 5)]
    got = elbow_kmeans(problems, k_range=(2, 7), fraction=0.975)
    assert [r.n_clusters for r in got] == [2, 3, 5]
