"""k-means, owned here for every stage: one padded batched engine (k-means++ or k-means|| seeding,
exact Lloyd, sample weights optional) for many small problems, and faiss for one big one.

``cluster`` (per image / object / group, and the dataset scope through faiss), ``rank`` (weighted,
per class), ``part-contrast`` (per image, warm-started) and ``distill-3d`` (one fit over rendered
views) all call the names below.

>>> import numpy as np
>>> from partkit.kmeans import KMeans, batched_kmeans
>>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
>>> KMeans(3, random_state=0).fit(X).cluster_centers_.shape
(3, 8)
>>> [r.n_clusters for r in batched_kmeans([X, X[:2]], 3)]
[3, 2]
"""
from ._api import FAISS_MIN_ROWS, KMeans, batched_kmeans, elbow_kmeans, elbow_pick, partition_centers, weighted_kmeans
from ._engine import INITS, METRICS, KMeansResult, nearest_center, normalize_rows
from ._faiss import faiss_assign, faiss_kmeans

__all__ = [
    "KMeans", "KMeansResult", "batched_kmeans", "elbow_kmeans", "weighted_kmeans", "elbow_pick", "nearest_center",
    "partition_centers",
    "normalize_rows", "faiss_kmeans", "faiss_assign", "METRICS", "INITS", "FAISS_MIN_ROWS",
]
