"""partkit: unsupervised object-part discovery as composable, shard-in/shard-out stages."""
from ._version import __version__
from .errors import BadSample, PartkitError

__all__ = ["__version__", "PartkitError", "BadSample"]
