"""partkit: unsupervised object-part discovery as composable, shard-in/shard-out stages.

The stages are library functions first (``partkit.extract.extract``, ``partkit.cluster.cluster``,
``partkit.evaluate.evaluate``, ...); the names below are re-exported lazily, so ``import partkit``
stays light (no torch until a model is needed).
"""
from ._version import __version__
from .errors import BadSample, PartkitError

_LAZY = {
    "Output": "partkit.io", "iter_samples": "partkit.io", "run_stage": "partkit.io",
    "create_backbone": "partkit.models", "list_backbones": "partkit.models", "register_backbone": "partkit.models",
    "create_detector": "partkit.models", "list_detectors": "partkit.models",
    "FeatureExtractor": "partkit.extract", "KMeans": "partkit.kmeans", "batched_kmeans": "partkit.kmeans",
    "PartDecoder": "partkit.decoder", "train_decoder": "partkit.decoder", "predict": "partkit.decoder",
    "PartRanker": "partkit.rank",
    "list_metrics": "partkit.evaluate", "register_metric": "partkit.evaluate",
}

__all__ = ["__version__", "PartkitError", "BadSample", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'partkit' has no attribute {name!r}")
