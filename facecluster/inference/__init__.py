"""Routed inference: router, final decision unit, the TwoStageIdentifier and the
stage-1 model, each offering named predictors to evaluation."""

from facecluster.inference.decision import fuse, keep_top
from facecluster.inference.identifier import UNKNOWN, Identification, TwoStageIdentifier
from facecluster.inference.predictors import Predictor, StageOneModel, count_parameters
from facecluster.inference.router import Router, build_index

__all__ = [
    "UNKNOWN",
    "Identification",
    "Predictor",
    "Router",
    "StageOneModel",
    "TwoStageIdentifier",
    "build_index",
    "count_parameters",
    "fuse",
    "keep_top",
]
