"""Routed inference: router, final decision unit and the TwoStageIdentifier."""

from facecluster.inference.decision import fuse, keep_best
from facecluster.inference.identifier import Identification, TwoStageIdentifier
from facecluster.inference.router import Router, build_index

__all__ = ["Identification", "Router", "TwoStageIdentifier", "build_index", "fuse", "keep_best"]
