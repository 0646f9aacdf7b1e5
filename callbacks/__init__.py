"""Lightning callbacks of facecluster (installed as ``facecluster.callbacks``)."""

from facecluster.callbacks.bad_images import BadImageReport
from facecluster.callbacks.clustering import ClusteringCallback
from facecluster.callbacks.divergence import DivergenceCallback, DivergenceError
from facecluster.callbacks.interrupt import ResumeHint, StopTogether
from facecluster.callbacks.progress import StderrProgressBar
from facecluster.callbacks.seeding import EpochSeedCallback
from facecluster.callbacks.verification import VerificationCallback

__all__ = [
    "BadImageReport",
    "ClusteringCallback",
    "DivergenceCallback",
    "DivergenceError",
    "EpochSeedCallback",
    "ResumeHint",
    "StderrProgressBar",
    "StopTogether",
    "VerificationCallback",
]
