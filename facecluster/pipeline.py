"""The two-stage training run that ``train.py`` calls: one run folder, two fits.

Stage 1 trains a backbone with one margin head over all identities; at its end
the ClusteringCallback groups the identities; stage 2 trains one sub-net per
group, each warm-started from the stage-1 backbone. One ``Trainer.fit`` per
stage (see docs/ARCHITECTURE.md for why): each LightningModule holds exactly what
it trains, so plain DDP works, and each stage has its own optimizer, schedule,
checkpoint folder and monitor.

Run folder::

    <output_dir>/<run_name>/
      config.yaml  run.json           resolved config, W&B run id
      stage1/checkpoints/             best and last.ckpt of stage 1
      stage1.json                     stage-1 steps and test accuracy
      clusters.pt                     the ClusterAssignment
      stage2/checkpoints/             best and last.ckpt of stage 2
      results.json  results.md        held-out accuracies
      wandb/ or csv/                  logs

Every process of a DDP run executes this code (Lightning starts the other ranks
by re-running the script), so the run folder is chosen once by rank 0 and passed
to the others through ``FACECLUSTER_RUN_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from facecluster.callbacks import ClusteringCallback, DivergenceCallback, EpochSeedCallback
from facecluster.checkpoint_io import AtomicCheckpointIO
from facecluster.clustering import ClusterAssignment
from facecluster.config import (
    ConfigError,
    load_config,
    partition_method,
    resolve_data_root,
    stage_epochs,
    to_container,
)
from facecluster.data import BadImageReport, FaceDataModule
from facecluster.loggers import build_logger
from facecluster.models.backbone_module import BackboneSystem
from facecluster.models.base import CHECKPOINT_KEY
from facecluster.models.subnets_module import SubnetSystem

RUN_DIR_ENV = "FACECLUSTER_RUN_DIR"
LAST = "last.ckpt"


@dataclass
class RunResult:
    """What a finished run returns (so tests and notebooks can call ``train`` in-process)."""

    run_dir: Path
    results: dict[str, Any]
    table: str
    backbone: BackboneSystem | None = None
    subnets: SubnetSystem | None = None
    assignment: ClusterAssignment | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- run folder


def is_rank_zero() -> bool:
    """True in the process that writes the run folder (global rank 0)."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The facecluster metadata of a checkpoint; a clear error for anything else."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ConfigError(f"resume={path}: cannot be read as a checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise ConfigError(
            f"resume={path}: not a facecluster checkpoint (no '{CHECKPOINT_KEY}' entry); "
            "pass a run folder or a .ckpt written by facecluster"
        )
    return ckpt[CHECKPOINT_KEY]


def _run_folder_of(resume: Path) -> Path:
    """The run folder of a ``resume=`` path: itself, or <run>/stageN/checkpoints/x.ckpt."""
    return resume if resume.is_dir() else resume.resolve().parents[2]


def config_for_resume(resume: str, overrides: list[str] | tuple = ()) -> DictConfig:
    """The saved config of the run to resume, with command-line overrides applied."""
    path = Path(resume).expanduser()
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such run folder or checkpoint")
    run_dir = _run_folder_of(path)
    saved = run_dir / "config.yaml"
    if path.is_file():
        meta = read_checkpoint_meta(path)
        if not saved.is_file():  # a checkpoint moved out of its run folder
            saved = run_dir / "config.from-checkpoint.yaml"
            OmegaConf.save(OmegaConf.create(meta["config"]), saved)
    elif not saved.is_file():
        raise ConfigError(
            f"resume={resume}: not a facecluster run folder (no config.yaml); "
            "pass the folder printed at the start of the run, or a checkpoint"
        )
    overrides = [o for o in overrides if not o.startswith("resume=")]
    cfg = load_config(
        saved,
        [*overrides, f"resume={path}", f"output_dir={run_dir.parent}", f"run_name={run_dir.name}"],
    )
    _refuse_contradictions(load_config(saved), cfg, resume)
    return cfg


# What the checkpoints were trained on: changing any of these on resume would load
# weights into a model of another shape, or a head over other identities.
RESUME_FIXED_KEYS = (
    "method",
    "data.root",
    "data.max_classes",
    "data.min_images_per_class",
    "model",
    "clustering.num_clusters",
    "clustering.method",
)


def _refuse_contradictions(saved: DictConfig, cfg: DictConfig, resume: str) -> None:
    """Refuse a resume whose overrides change what the run's checkpoints were trained on.

    Epochs, logger, trainer settings and the like may change; the identities,
    backbone and clusters may not.
    """
    problems = []
    for key in RESUME_FIXED_KEYS:
        old, new = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        if key == "data.root":  # the same folder, written differently, is no change
            same = resolve_data_root(old).resolve() == resolve_data_root(new).resolve()
        else:
            same = old == new
        if not same:
            if isinstance(old, DictConfig):  # model.*: show plain dicts
                old, new = OmegaConf.to_container(old), OmegaConf.to_container(new)
            problems.append(f"{key}: the run has {old!r}, the command line {new!r}")
    if problems:
        raise ConfigError(
            f"resume={resume}: the overrides contradict the run's checkpoints:\n  - "
            + "\n  - ".join(problems)
            + "\nStart a new run for these settings (epochs, logger and trainer.* may change)."
        )


def _run_dir(cfg: DictConfig) -> Path:
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if cfg.resume:
        path = Path(cfg.resume)
        return _run_folder_of(path)
    name = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method}"
    run_dir = Path(cfg.output_dir).expanduser() / name
    if (run_dir / "config.yaml").exists():
        raise ConfigError(
            f"run folder {run_dir} already exists; pass resume={run_dir} to continue it"
        )
    return run_dir


def prepare_run_dir(cfg: DictConfig) -> tuple[Path, str]:
    """Create (or reopen) the run folder; returns it and the W&B run id."""
    run_dir = _run_dir(cfg).resolve()
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the DDP ranks Lightning starts
    meta_path = run_dir / "run.json"
    if is_rank_zero() and not meta_path.exists():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write the run folder {run_dir} ({e})") from None
        meta_path.write_text(
            json.dumps(
                {"run_id": uuid.uuid4().hex[:12], "created": datetime.now().isoformat()}, indent=2
            )
        )
    if is_rank_zero():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir, json.loads(meta_path.read_text())["run_id"]


def _last_checkpoint(run_dir: Path, stage: int) -> Path | None:
    path = run_dir / f"stage{stage}" / "checkpoints" / LAST
    return path if path.is_file() else None


def _resume_points(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, Path | None]:
    """Checkpoints to resume stage 1 and stage 2 from (None: start that stage fresh)."""
    if not cfg.resume:
        return None, None
    path = Path(cfg.resume)
    if path.is_file():
        stage = read_checkpoint_meta(path)["stage"]
        return (path, None) if stage == 1 else (None, path)
    stage2 = _last_checkpoint(run_dir, 2)
    if stage2 is not None:
        return None, stage2
    return _last_checkpoint(run_dir, 1), None


# --------------------------------------------------------------------------- building blocks


def build_datamodule(cfg: DictConfig) -> FaceDataModule:
    d = cfg.data
    dm = FaceDataModule(
        root=str(resolve_data_root(d.root)),
        image_size=d.image_size,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        min_images_per_class=d.min_images_per_class,
        max_classes=d.max_classes,
        seed=cfg.seed,
        on_bad_image=d.on_bad_image,
        max_bad_fraction=d.max_bad_fraction,
    )
    try:
        dm.setup()
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if dm.num_classes < cfg.clustering.num_clusters:
        raise ConfigError(
            f"clustering.num_clusters={cfg.clustering.num_clusters} but {d.root} has only "
            f"{dm.num_classes} identities with at least {d.min_images_per_class} images"
        )
    return dm


def make_trainer(
    cfg: DictConfig, stage: int, run_dir: Path, logger: Any, callbacks: list[L.Callback]
) -> L.Trainer:
    """A Trainer for one stage: the user's ``trainer.*`` plus this stage's callbacks."""
    folder = run_dir / f"stage{stage}" / "checkpoints"
    # Both are saved after the epoch's validation, at a clean epoch boundary: a resume
    # never starts mid-epoch (ordinary DataLoaders cannot fast-forward). last.ckpt has
    # its own callback: with a monitor, Lightning 2.6 rewrites "last" only in epochs
    # that improve the monitor, so resume and evaluation would miss the final epochs.
    checkpoints = [
        ModelCheckpoint(
            dirpath=folder,
            filename=LAST.removesuffix(".ckpt"),
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
        )
    ]
    if cfg.data.val_fraction > 0:
        checkpoints.append(
            ModelCheckpoint(
                dirpath=folder,
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
                monitor="val/acc",
                mode="max",
                save_top_k=1,
                save_on_train_epoch_end=True,
            )
        )
    callbacks = [
        *checkpoints,
        EpochSeedCallback(cfg.seed, stage),
        # Stops a NaN/Inf loss before the epoch-end save could overwrite last.ckpt.
        DivergenceCallback(stage),
        BadImageReport(),
        *callbacks,
    ]
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs = dict(cfg.trainer)
    kwargs["max_epochs"] = stage_epochs(cfg, f"stage{stage}")
    if cfg.data.val_fraction == 0:
        kwargs["limit_val_batches"] = 0
    # Atomic, fsynced checkpoint writes (a kill never leaves a half-written
    # last.ckpt) that refuse NaN weights; a user's own CheckpointIO plugin wins.
    plugins = kwargs.pop("plugins", None) or []
    many = isinstance(plugins, Sequence) and not isinstance(plugins, str)
    plugins = list(plugins) if many else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return L.Trainer(
        **kwargs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        plugins=plugins,
        default_root_dir=str(run_dir / f"stage{stage}"),
        enable_checkpointing=True,
    )


def _module_args(cfg: DictConfig, stage: int) -> dict[str, Any]:
    return {
        "image_size": cfg.data.image_size,
        "model": to_container(cfg.model),
        "head": to_container(cfg.head),
        "optim": to_container(cfg[f"stage{stage}"].optim),
        "config": to_container(cfg),
    }


def _check_backbone(cfg: DictConfig) -> int:
    """Build the backbone once before any work: a bad name fails with close names.

    Returns:
        Its parameter count (for the disk-space check).
    """
    from facecluster.models.backbone_module import build_backbone

    try:
        backbone = build_backbone(to_container(cfg.model), cfg.data.image_size)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.backbone={cfg.model.backbone!r}: {e}") from None
    return sum(p.numel() for p in backbone.parameters())


def checkpoint_bytes_needed(cfg: DictConfig, backbone_params: int, num_classes: int) -> int:
    """Disk the run's checkpoints need: a generous estimate, checked before any work.

    Each stage keeps a best and a last checkpoint, and an atomic write briefly holds
    one more copy; a checkpoint holds fp32 weights plus optimizer state (SGD momentum:
    one more copy, AdamW: two).
    """
    state_copies = 3 if "adamw" in (cfg.stage1.optim.name, cfg.stage2.optim.name) else 2
    heads = num_classes * cfg.model.embedding_dim
    stage1 = backbone_params + heads
    stage2 = 0 if cfg.method == "single" else cfg.clustering.num_clusters * backbone_params + heads
    return 3 * 4 * state_copies * (stage1 + stage2)


def check_free_space(run_dir: Path, needed: int) -> None:
    """Fail at start, naming output_dir, when the disk cannot hold the checkpoints."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ConfigError(
            f"output_dir: {run_dir} has {free / 2**20:.0f} MiB free, the run's checkpoints "
            f"need about {needed / 2**20:.0f} MiB; free some space or choose another output_dir"
        )


# --------------------------------------------------------------------------- the run


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> RunResult:
    """Run (or resume) the whole two-stage method and return its held-out results.

    Args:
        cfg: a validated config (``load_config``; ``config_for_resume`` to continue a run).
        callbacks: extra Lightning callbacks added to both stages' Trainers.
    """
    inherited_run_dir = os.environ.get(RUN_DIR_ENV)
    try:
        return _train(cfg, callbacks)
    finally:
        # The variable is for the DDP ranks of this run only: never leak it into the
        # next run of the same process.
        if inherited_run_dir is None:
            os.environ.pop(RUN_DIR_ENV, None)


def _train(cfg: DictConfig, callbacks: Sequence[L.Callback]) -> RunResult:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone_params = _check_backbone(cfg)
    dm = build_datamodule(cfg)
    run_dir, run_id = prepare_run_dir(cfg)
    check_free_space(run_dir, checkpoint_bytes_needed(cfg, backbone_params, dm.num_classes))
    if is_rank_zero():
        (run_dir / "class_names.json").write_text(json.dumps(dm.class_names))
    stage1_ckpt, stage2_ckpt = _resume_points(cfg, run_dir)
    rank_zero_info(f"facecluster run folder: {run_dir}")
    logger = build_logger(cfg, run_dir, run_id)
    clusters_path = run_dir / "clusters.pt"
    stage1_path = run_dir / "stage1.json"
    single = cfg.method == "single"
    try:
        backbone = subnets = assignment = stage2 = None
        if stage2_ckpt is None:
            backbone, stage1 = _train_stage1(
                cfg, dm, run_dir, logger, stage1_ckpt, None if single else clusters_path, callbacks
            )
            if is_rank_zero():
                stage1_path.write_text(json.dumps(stage1, indent=2))
        else:
            stage1 = json.loads(stage1_path.read_text())
        if not single:
            assignment = ClusterAssignment.load(clusters_path)
            dm.connect_clusters(assignment.class_to_cluster, assignment.local_index)
            subnets, stage2 = _train_stage2(
                cfg,
                dm,
                run_dir,
                logger,
                stage2_ckpt,
                assignment,
                backbone,
                stage1["global_step"],
                callbacks,
            )
        results = _results(cfg, dm, assignment, stage1, stage2)
        table = format_results(results)
        if is_rank_zero():
            (run_dir / "results.json").write_text(json.dumps(results, indent=2))
            (run_dir / "results.md").write_text(table + "\n")
        rank_zero_info(f"\n{table}\n\nfacecluster run folder: {run_dir}")
        return RunResult(run_dir, results, table, backbone, subnets, assignment)
    finally:
        if hasattr(logger, "experiment") and cfg.logger == "wandb" and is_rank_zero():
            import wandb

            if wandb.run is not None:
                wandb.finish()


def _train_stage1(
    cfg: DictConfig,
    dm: FaceDataModule,
    run_dir: Path,
    logger: Any,
    ckpt: Path | None,
    clusters_path: Path | None,
    callbacks: Sequence[L.Callback],
) -> tuple[BackboneSystem, dict]:
    # Seeded here, not only at start: a resumed run builds the same initial weights.
    torch.manual_seed(cfg.seed + 1)
    model = BackboneSystem(dm.num_classes, **_module_args(cfg, 1))
    extra: list[L.Callback] = list(callbacks)
    clustering = None
    if clusters_path is not None:  # method=single has no clustering unit
        clustering = ClusteringCallback(
            dm,
            cfg.clustering.num_clusters,
            partition_method(cfg),
            cfg.seed,
            clusters_path,
            niter=cfg.clustering.niter,
            nredo=cfg.clustering.nredo,
        )
        extra.insert(0, clustering)
    trainer = make_trainer(cfg, 1, run_dir, logger, extra)
    trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    if clustering is not None and clustering.assignment is None:
        # A resumed, already finished stage 1 skips on_train_end: cluster here.
        clustering.run(trainer, model)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    return model, {
        "global_step": trainer.global_step,
        "test_acc": test["test/acc"],
        "epochs": trainer.current_epoch,
    }


def _train_stage2(
    cfg: DictConfig,
    dm: FaceDataModule,
    run_dir: Path,
    logger: Any,
    ckpt: Path | None,
    assignment: ClusterAssignment,
    backbone: BackboneSystem | None,
    step_offset: int,
    callbacks: Sequence[L.Callback],
) -> tuple[SubnetSystem, dict]:
    torch.manual_seed(cfg.seed + 2)
    model = SubnetSystem(
        dm.num_classes, assignment.cluster_sizes().tolist(), **_module_args(cfg, 2)
    )
    model.set_assignment(assignment)
    if ckpt is None:
        if backbone is None:
            raise ConfigError(f"{run_dir}: stage 2 has no checkpoint and no stage-1 backbone")
        model.warm_start(backbone.backbone.state_dict(), cfg.head.init_from_class_means)
    if logger is not None:
        logger.step_offset = step_offset
    trainer = make_trainer(cfg, 2, run_dir, logger, list(callbacks))
    trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    return model, {
        "global_step": trainer.global_step,
        "test": test,
        "epochs": trainer.current_epoch,
    }


# --------------------------------------------------------------------------- results


def _results(
    cfg: DictConfig,
    dm: FaceDataModule,
    assignment: ClusterAssignment | None,
    stage1: dict,
    stage2: dict | None,
) -> dict[str, Any]:
    test_labels = dm.split_labels("test")

    def majority(labels: torch.Tensor) -> float:
        # Always answering the most frequent identity: the bar an unbalanced set sets.
        return float(torch.bincount(labels).max()) / max(1, len(labels))

    results: dict[str, Any] = {
        "method": cfg.method,
        "identities": dm.num_classes,
        "test_images": len(test_labels),
        "stage1": {
            "accuracy": float(stage1["test_acc"]),
            "chance": 1.0 / dm.num_classes,
            "majority": majority(test_labels),
            "steps": stage1["global_step"],
        },
    }
    if assignment is None:  # method=single
        return results
    clusters = assignment.class_to_cluster[test_labels]
    results["clustering"] = assignment.method
    results["num_clusters"] = assignment.num_clusters
    results["subnets"] = [
        {
            "cluster": k,
            "identities": n,
            "test_images": int((clusters == k).sum()),
            "accuracy": float(stage2["test"][f"test/acc_subnet{k}"]),
            "chance": 1.0 / n,
            "majority": majority(test_labels[clusters == k]),
        }
        for k, n in enumerate(assignment.cluster_sizes().tolist())
    ]
    results["subnets_oracle_accuracy"] = float(stage2["test"]["test/acc"])
    results["stage2_steps"] = stage2["global_step"]
    return results


def format_results(results: dict[str, Any]) -> str:
    """The held-out results of training as a markdown table."""
    s1 = results["stage1"]
    name = "single model" if results["method"] == "single" else "stage-1 single model"
    rows = [
        (
            f"{name}, all identities",
            results["identities"],
            results["test_images"],
            s1["accuracy"],
            s1["chance"],
            s1["majority"],
        )
    ]
    for s in results.get("subnets", []):
        rows.append(
            (
                f"sub-net {s['cluster']}, on its own cluster",
                s["identities"],
                s["test_images"],
                s["accuracy"],
                s["chance"],
                s["majority"],
            )
        )
    title = (
        f"{results['clustering']} clustering, K={results['num_clusters']}"
        if "subnets" in results
        else "method=single"
    )
    lines = [
        f"Held-out test accuracy ({title})",
        "",
        "| model | identities | test images | top-1 accuracy | chance | most frequent |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {m} | {c} | {n} | {a:.2%} | {ch:.2%} | {mj:.2%} |" for m, c, n, a, ch, mj in rows]
    lines += [
        "",
        "chance: 1 / identities; most frequent: always answering the identity "
        "with the most test images. Each sub-net is scored on the test images of "
        "its own cluster's identities.",
    ]
    return "\n".join(lines)
