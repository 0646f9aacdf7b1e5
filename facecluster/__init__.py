"""facecluster: face identification among very many identities, the two-stage
clustering way (Ahmadi and Dianat, JSDP 21(1), 2024), on PyTorch Lightning.

From Python (docs/ARCHITECTURE.md has every module and why):

- a whole run, as ``train.py`` does it: ``facecluster.pipeline.train(cfg)`` with
  ``cfg = facecluster.config.load_config("configs/smoke.yaml", ["key=value", ...])``;
  ``facecluster.evaluation.evaluate_runs`` evaluates runs as ``evaluate.py`` does;
- the parts: ``facecluster.data`` (``FaceDataModule``, ``scan``, ``load_faces``,
  ``normalize_images``), ``facecluster.models`` (``BackboneSystem``, ``SubnetSystem``),
  ``facecluster.models.components`` (``create_backbone``, ``register_backbone``,
  ``create_head``, ``register_head``), ``facecluster.clustering``;
- a trained run or export: ``facecluster.inference.TwoStageIdentifier`` (``from_run``,
  ``load``, ``embed``, ``identify``; docs/DEPLOYMENT.md).

Nothing is imported here: ``import facecluster`` costs no torch or Lightning import.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("facecluster")
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "unknown"
