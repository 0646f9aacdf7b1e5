"""The two-stage training run that ``train.py`` calls (Ahmadi & Dianat, JSDP 2024).

In the order of the method: open the run folder, build the datamodule, fit stage 1
(a backbone with one margin head over all identities), cluster the identities on
their class-mean embeddings (the ClusteringCallback, at the end of stage 1), fit
stage 2 (one sub-net per cluster, each warm-started from the stage-1 backbone), and
write the held-out results. One ``Trainer.fit`` per stage (see docs/ARCHITECTURE.md
for why). The run folder's layout and resume rules are :mod:`facecluster.run`'s; the
Trainer assembly is :mod:`facecluster.builders`'.

Every process of a DDP run executes this code (Lightning starts the other ranks by
re-running the script); only global rank 0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from facecluster.builders import (
    backbone_parameters,
    build_datamodule,
    build_trainer,
    check_cluster_count,
    module_args,
)
from facecluster.callbacks import ClusteringCallback
from facecluster.clustering import ClusterAssignment
from facecluster.config import Config
from facecluster.data import FaceDataModule
from facecluster.loggers import build_logger, finish_logger
from facecluster.models.backbone_module import BackboneSystem
from facecluster.models.subnets_module import SubnetSystem
from facecluster.results import summarise, training_table
from facecluster.run import RUN_DIR_ENV, RunFolder


@dataclass
class RunResult:
    """What a finished run returns (so tests and notebooks can call ``train`` in-process)."""

    run_dir: Path
    results: dict[str, Any]
    table: str
    backbone: BackboneSystem | None = None
    subnets: SubnetSystem | None = None
    assignment: ClusterAssignment | None = None


@dataclass
class _Run:
    """What both stages share: the config, data, folder, logger and extra callbacks."""

    cfg: Config
    dm: FaceDataModule
    folder: RunFolder
    logger: Any
    callbacks: Sequence[L.Callback]


def train(cfg: Config, callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Run (or resume) the whole two-stage method and return its held-out results.

    Args:
        cfg: a validated config (``load_config``; ``RunFolder.config_for_resume`` to
            continue a run).
        callbacks: extra Lightning callbacks added to both stages' Trainers.
    """
    with _run_dir_for_this_run_only():
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        backbone_params = backbone_parameters(cfg)
        dm = build_datamodule(cfg)
        check_cluster_count(cfg, dm)
        folder = RunFolder.for_training(cfg)
        run_id = folder.create(cfg)
        folder.check_free_space(cfg, backbone_params, dm.num_classes)
        folder.save_class_names(dm.class_names)
        folder.save_unseen_identities({s: dm.unseen_identities(s) for s in ("val", "test")})
        rank_zero_info(f"facecluster run folder: {folder.path}")
        logger = build_logger(cfg, folder.path, run_id)
        with finish_logger(logger):
            return _two_stages(_Run(cfg, dm, folder, logger, callbacks))


def _two_stages(run: _Run) -> RunResult:
    resume1, resume2 = run.folder.resume_points(run.cfg.resume)
    clustering = _clustering_unit(run) if run.cfg.two_stage else None
    backbone = subnets = stage2 = None
    if resume2 is None:
        backbone, stage1 = fit_stage1(run, resume1, clustering)
    else:  # stage 2 had started: stage 1 and the clustering are on disk
        stage1 = run.folder.stage_summary(1)
        assert clustering is not None
        clustering.restore()
    assignment = clustering.assignment if clustering is not None else None
    if assignment is not None:
        subnets, stage2 = fit_stage2(run, resume2, assignment, backbone, stage1["global_step"])
    results = summarise(run.cfg.method, run.dm, assignment, stage1, stage2)
    table = training_table(results)
    run.folder.save_training_report(results, table)
    rank_zero_info(f"\n{table}\n\nfacecluster run folder: {run.folder.path}")
    return RunResult(run.folder.path, results, table, backbone, subnets, assignment)


def _clustering_unit(run: _Run) -> ClusteringCallback:
    c = run.cfg.clustering
    return ClusteringCallback(
        run.dm,
        c.num_clusters,
        run.cfg.partition_method(),
        run.cfg.seed,
        run.folder.clusters_path,
        niter=c.niter,
        nredo=c.nredo,
    )


def fit_stage1(
    run: _Run, resume: Path | None, clustering: ClusteringCallback | None
) -> tuple[BackboneSystem, dict[str, Any]]:
    """Stage 1, then the clustering unit (method=single: stage 1 alone, no clustering)."""
    # Seeded here, not only at start: a resumed run builds the same initial weights.
    torch.manual_seed(run.cfg.seed + 1)
    model = BackboneSystem(run.dm.num_classes, **module_args(run.cfg, 1))
    extra = [clustering] if clustering is not None else []
    trainer = build_trainer(run.cfg, 1, run.folder, run.logger, [*extra, *run.callbacks])
    trainer.fit(
        model, datamodule=run.dm, ckpt_path=str(resume) if resume else None, weights_only=True
    )
    if clustering is not None and clustering.assignment is None:
        # A resumed stage 1 that was already finished skips on_train_end: same method.
        clustering.cluster(trainer, model)
    test = trainer.test(model, datamodule=run.dm, verbose=False)[0]
    summary = {
        "global_step": trainer.global_step,
        "test_acc": test["test/acc"],
        "epochs": trainer.current_epoch,
    }
    run.folder.save_stage_summary(1, summary)
    return model, summary


def fit_stage2(
    run: _Run,
    resume: Path | None,
    assignment: ClusterAssignment,
    backbone: BackboneSystem | None,
    step_offset: int,
) -> tuple[SubnetSystem, dict[str, Any]]:
    """Stage 2: one sub-net per cluster, warm-started from the stage-1 backbone."""
    torch.manual_seed(run.cfg.seed + 2)
    sizes = assignment.cluster_sizes().tolist()
    model = SubnetSystem(run.dm.num_classes, sizes, **module_args(run.cfg, 2))
    model.set_assignment(assignment)
    if resume is None:
        assert backbone is not None, "a fresh stage 2 follows a stage-1 fit"
        model.warm_start(backbone.backbone.state_dict(), run.cfg.head.init_from_class_means)
    if run.logger is not None:
        run.logger.step_offset = step_offset  # one continuous step axis over both stages
    trainer = build_trainer(run.cfg, 2, run.folder, run.logger, run.callbacks)
    trainer.fit(
        model, datamodule=run.dm, ckpt_path=str(resume) if resume else None, weights_only=True
    )
    test = trainer.test(model, datamodule=run.dm, verbose=False)[0]
    return model, {
        "global_step": trainer.global_step,
        "test": test,
        "epochs": trainer.current_epoch,
    }


@contextlib.contextmanager
def _run_dir_for_this_run_only() -> Iterator[None]:
    # The run folder is passed to the DDP ranks of this run in an environment
    # variable: never leak it into the next run of the same process.
    inherited = os.environ.get(RUN_DIR_ENV)
    try:
        yield
    finally:
        if inherited is None:
            os.environ.pop(RUN_DIR_ENV, None)
