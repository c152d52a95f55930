"""Part proposals by grouping dense features: k-means per image, per object, per dataset, or per group.

The k-means itself lives in :mod:`partkit.kmeans`; its public names are re-exported here.

>>> import numpy as np
>>> from partkit.cluster import KMeans, batched_kmeans
>>> X = np.random.default_rng(0).normal(size=(784, 64)).astype(np.float32)
>>> km = KMeans(4, metric="cosine", random_state=0).fit(X)  # scikit-learn style
>>> km.cluster_centers_.shape, km.labels_.shape
((4, 64), (784,))
>>> results = batched_kmeans([X, X[:100], X[:7]], 4)  # many small problems in one batched solve
>>> [r.n_clusters for r in results]
[4, 4, 4]

The ``partkit cluster`` stage is :func:`cluster`: it reads ``feat.npy`` + ``feat.json`` and writes
``parts.png`` (0 = background, parts 1..k) and ``parts.json``. Its options are :class:`ClusterConfig`
fields (``_config``); one module per scope: ``local`` (image, object), ``dataset``, ``cosegment``;
``_items`` reads samples into items and writes them back.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from ..errors import Handler, stop
from ..io import Output
from ..kmeans import KMeans, KMeansResult, batched_kmeans, elbow_kmeans
from . import cosegment, dataset, local
from ._config import DEFAULT_K, FG_SOURCES, SCOPES, ClusterConfig, start

__all__ = [
    "KMeans", "KMeansResult", "batched_kmeans", "elbow_kmeans", "cluster", "ClusterConfig", "SCOPES", "FG_SOURCES",
    "DEFAULT_K",
]

_SCOPE_RUNS = {"image": local.run, "object": local.run, "dataset": dataset.run, "cosegment": cosegment.run}


def cluster(inputs: Sequence[str], config: Optional[ClusterConfig] = None, *, output: Output = Output(),
            handler: Handler = stop, **options) -> dict:
    """Group feature cells into parts and write ``parts.png`` + ``parts.json`` per sample.

    Options are :class:`ClusterConfig` fields, given as ``config`` or as keywords (which override
    ``config``'s). ``scope``: ``image`` (k-means over one image's cells), ``object`` (inside each
    object mask, part ids numbered on across objects), ``dataset`` (one faiss k-means over all
    samples: global part ids) or ``cosegment`` (parts shared within groups of images, e.g. one
    category). ``k`` defaults per scope (:data:`DEFAULT_K`); ``"auto"`` picks it with the elbow rule.
    ``handler`` decides what a bad sample does (:mod:`partkit.errors`: ``stop`` or ``SkipBad()``).
    Returns the summary of :func:`partkit.io.run_stage`.

    >>> cluster(["feats.tar"], output=Output("parts/"), scope="object", k=4)  # doctest: +SKIP
    >>> cluster(["feats.tar"], ClusterConfig(scope="dataset", k=25), output=Output("parts/"))  # doctest: +SKIP
    """
    config = replace(config, **options) if config is not None else ClusterConfig(**options)
    job = start(config)
    return _SCOPE_RUNS[job.cfg.scope](inputs, job, output=output, handler=handler)
