"""Lightning callbacks of facecluster (installed as ``facecluster.callbacks``)."""

from facecluster.callbacks.clustering import ClusteringCallback
from facecluster.callbacks.seeding import EpochSeedCallback

__all__ = ["ClusteringCallback", "EpochSeedCallback"]
