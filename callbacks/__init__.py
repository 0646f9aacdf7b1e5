"""Lightning callbacks of facecluster (installed as ``facecluster.callbacks``)."""

from facecluster.callbacks.clustering import ClusteringCallback
from facecluster.callbacks.divergence import DivergenceCallback, DivergenceError
from facecluster.callbacks.seeding import EpochSeedCallback

__all__ = ["ClusteringCallback", "DivergenceCallback", "DivergenceError", "EpochSeedCallback"]
