"""The run folder: the one place that knows its layout, its file names and its rules.

::

    <output_dir>/<run_name>/
      config.yaml  run.json           resolved config; W&B run id and creation time
      class_names.json                identity names, index = global label
      split.json                      digests of what the val and test splits hold and of
                                      each identity's image count
      unseen_identities.json          open set: identities never trained on ({val, test})
      stage1/checkpoints/             last.ckpt of stage 1 (its last finished epoch)
      stage1/running.json             the lock of the command fitting stage 1 or the clustering
      stage1.json                     stage-1 steps, epochs, test accuracy, batch, processes
      clusters.pt                     the ClusterAssignment (written once, atomically)
      stage2/jobs/<group>/            one stage-2 fit (a job) over a group of sub-nets, named
                                      by them (subnets-0-2_5): checkpoints/last.ckpt, log.txt,
                                      running.json (the lock of the process training it)
      stage2/subnets/subnet<k>.pt     sub-net k's final backbone and head rows (atomic), then
      stage2/subnets/subnet<k>.json   its record (job, steps, test counts): k is finished
      stage2.json                     the assembled stage 2 (all K sub-nets finished)
      slurm/                          launcher=slurm: submitit's job files and logs, submitted.json
      results.json  results.md        held-out accuracies of training (the run is finished)
      eval/                           evaluate.py's tables and plots
      wandb/ or csv/                  logs

Everything else asks :class:`RunFolder`: the pipeline (create or reopen, resume
points, free space), evaluation and inference (a finished run's config, weights
and assignment), the callbacks (where checkpoints go). It holds the resume rules
too: which checkpoint continues which stage, and which settings a resume may not
change.

Every process of a DDP run executes the pipeline (Lightning starts the other ranks
by re-running the script), so the folder is chosen once by rank 0 and passed to
the others through ``FACECLUSTER_RUN_DIR``. Only global rank 0 writes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from facecluster.clustering import ClusterAssignment
from facecluster.config import (
    FITTED_ROUTE,
    RUN_CONFIG,
    RUN_FORMAT,
    RUN_META,
    ClusteringConfig,
    Config,
    ConfigError,
    HeadConfig,
    config_from_dict,
    load_config,
    missing_path,
    not_a_run,
    resume_command,
    resume_path,
    route_problems,
    same_name,
    text_override,
)
from facecluster.data.folder import SPLIT_VERSION
from facecluster.data.recordio import rec_paths
from facecluster.io import (
    UnsafeFileError,
    atomic_torch_save,
    check_archive,
    check_can_write,
    disk_full,
    file_stamp,
    load_plain,
    pid_alive,
    replacing,
    write_error,
)
from facecluster.models.base import CHECKPOINT_KEY

if TYPE_CHECKING:
    from facecluster.data import FaceDataModule

RUN_DIR_ENV = "FACECLUSTER_RUN_DIR"
JOB_SUBNETS = "subnets.json"
RUNNING = "running.json"
REFUSED = "refused.json"
EMPTY_LOCK_AGE = 10.0
"""Seconds after which an empty lock (an earlier facecluster's, whose process failed
while writing it) is taken over instead of waited for."""
LOCK_IDENTITY = ("host", "pid", "started", "slurm_job", "slurm_restart", "launch")
"""What in a lock names the process holding it (the rest, ``checked``, changes while
it is held)."""
JOB_ENV = "FACECLUSTER_JOB"
"""Set in the processes the launchers start (the job's name): they read the run's
config and never rewrite it."""
RANK0_WAIT_ENV = "FACECLUSTER_RANK0_TIMEOUT"
"""Seconds the other processes that srun or torchrun started wait for rank 0 to open
the run folder and take its lock (default :data:`RANK0_WAIT_S`). Each process scans
the data first, so rank 0 may come minutes after them (a cold filesystem cache)."""
RANK0_WAIT_S = 1800.0
"""torch.distributed's default process-group timeout, which the ranks wait in next."""

CLASS_NAMES = "class_names.json"
SPLIT = "split.json"
SPLITS = ("val", "test")
"""The splits ``split.json`` records (:meth:`FaceDataModule.split_fingerprint`)."""
UNSEEN_IDENTITIES = "unseen_identities.json"
CLUSTERS = "clusters.pt"
RESULTS = "results.json"
CALIBRATION = "calibration.json"
"""route.decision=moe's numbers, fitted on the validation split after training."""
RESULTS_TABLE = "results.md"
LAST = "last"
"""Checkpoint file stem of the final finished epoch of a stage (``last.ckpt``)."""
EVAL_FILES = {
    "table": "results.md",
    "csv": "results.csv",
    "json": "results.json",
    "top_m": "top_m.png",
    "alpha": "alpha.png",
    "class_means": "class_means_pca.png",
    "single_means": "class_means.pt",  # the single model's, kept for its next evaluation
}
"""What evaluate.py writes into <run>/eval/."""

# What the checkpoints were trained on: changing any of these on resume would load
# weights into a model of another shape, or a head over other identities.
SPLIT_KEYS = (
    "seed",  # decides the split and, with data.unseen_fraction, which identities train
    "data.max_classes",
    "data.min_images_per_class",
    "data.unseen_fraction",
    "data.val_fraction",
    "data.test_fraction",
)
"""What decides which images a run trained on and which it holds out: fixed for a
resume (stage 2 would train on stage 1's held-out images) and for an evaluation (it
would test on training images)."""

NETWORK_KEYS = ("model", "data.image_size")
"""What decides the networks' shapes and input (an IResNet's fc layer is sized by the
image size): fixed for a resume and an evaluation (``model``'s speed options aside)."""

TRAINED_KEYS = (
    "method",
    *(f"clustering.{f.name}" for f in fields(ClusteringConfig)),
    "stage2.negatives",
    *(f"head.{f.name}" for f in fields(HeadConfig)),
)
"""What decides what the run trained: its method, clusters, sub-nets' heads and loss.
Fixed for an evaluation: another value evaluated the run as another method (its
eval/results.* overwritten) or ended in an error after minutes (no clusters.pt, a
top_m beyond the run's clusters)."""

EVALUATION_FIXED_KEYS = (*SPLIT_KEYS, *NETWORK_KEYS, *TRAINED_KEYS)

TRAINING_ONLY_KEYS = (
    "stage",
    "resume",
    "stage1",
    "stage2",
    "launcher",
    "slurm",
    "run_name",
    "trainer",
    "data.decode",  # evaluation loaders decode on the CPU
    "data.verification_every",  # stage 1's interval
    "model.weights",  # where stage 1 started
)
"""What only training reads: given to an evaluation it changed nothing, silently
(``trainer.devices`` and ``trainer.accelerator`` do not choose the evaluation's
device, ``eval.device`` does). Not ``output_dir``: it says where the run's cache is."""

TRAINING_ONLY_INSIDE_FIXED = tuple(
    k for k in TRAINING_ONLY_KEYS if any(k.startswith(f + ".") for f in EVALUATION_FIXED_KEYS)
)
"""Training-only keys inside a section an evaluation keeps fixed (``model.weights`` in
``model``): refused as training's, not compared with the run's."""

EVALUATION_TRAINER_KEYS = ("trainer.precision",)
"""The ``trainer.*`` an evaluation reads: the autocast of its predictors."""

DEVICE_KEYS = ("trainer.devices", "trainer.accelerator", "trainer.num_nodes", "trainer.strategy")
"""Training's devices: an evaluation given one is pointed to ``eval.device``."""

RESUME_FIXED_KEYS = (
    "method",
    *SPLIT_KEYS,
    *NETWORK_KEYS,
    "clustering.num_clusters",
    "clustering.method",
    "clustering.features",
    "clustering.overlap",
    "stage2.negatives",  # the sub-nets' heads have one more row
)


SETTLED_KEYS = (
    "data.batch_size",
    "head",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
    "trainer.limit_train_batches",
    "trainer.max_steps",
)
"""What shaped a run's weights beyond :data:`RESUME_FIXED_KEYS`, the epochs and the
optimizers: a resume refuses a change of them once the single model or one sub-net has
finished (unless it names sub-nets to train again), which its ``config.yaml`` would
record for weights trained otherwise. Compared as they
act (:func:`_settled`): an unset margin is the head's own, no accumulation is 1, no
clipping algorithm is ``norm``, no step cap is -1."""


def acting_config(cfg: Config) -> dict[str, Any]:
    """``cfg.to_dict()`` with each :data:`SETTLED_KEYS` value as it acts (an unset margin
    the head's own, no accumulation 1, ...): two configs that train alike are equal (a
    run's ``head.m: 0.5`` and a config's unset ArcFace margin)."""
    values = cfg.to_dict()
    acting = {key: _settled(cfg, values, key) for key in SETTLED_KEYS}
    for key, value in acting.items():
        *parents, last = key.split(".")
        section = values
        for part in parents:
            section = section[part]
        section[last] = value
    return values


def stage2_settings(cfg: Config) -> dict[str, Any]:
    """What shaped a sub-net's training, as its record keeps it: ``config.yaml`` holds
    the last command's settings, and a retrain of named sub-nets may give them others
    than the sub-nets that finished before (values as they act, :func:`_settled`)."""
    values = cfg.to_dict()
    return {
        "stage2.epochs": cfg.stage_epochs(2),
        "stage2.epoch_size": cfg.stage2.epoch_size,
        "stage2.optim": values["stage2"]["optim"],
        **{key: _settled(cfg, values, key) for key in SETTLED_KEYS},
    }


SPEED_OPTIONS = {"compile": False, "channels_last": False}
"""``model`` keys a resume may change: how the network runs, not what it is."""

FREE_MODEL_KEYS = (*SPEED_OPTIONS, "weights")
"""``model`` keys a resume may change: the speed options, and ``weights``, where stage 1
starts, while stage 1 has trained nothing (``_check_starting_weights``: a file moved
since is given anew)."""


def is_global_zero() -> bool:
    """True in the process that writes the run folder.

    ``rank_zero_only.rank`` is Lightning's global rank (from RANK, LOCAL_RANK or
    SLURM_PROCID before a Trainer exists); NODE_RANK covers the processes that
    Lightning's launcher starts on other nodes, which have only LOCAL_RANK yet.
    """
    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The facecluster metadata of a checkpoint; a clear error for anything else."""
    try:
        ckpt = load_plain(path, what="checkpoint", mmap=True)
    except (OSError, ValueError) as e:  # no checkpoint at all (README.md), or a damaged one
        raise ConfigError(
            f"resume={path} is not a run folder, and it cannot be read as a checkpoint: {e}"
        ) from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise ConfigError(
            f"resume={path}: not a facecluster checkpoint (no '{CHECKPOINT_KEY}' entry); "
            "pass a run folder or a .ckpt written by facecluster"
        )
    meta = ckpt[CHECKPOINT_KEY]
    # what on_save_checkpoint writes: a TypeError or KeyError at start, or a stage 7
    # told it was a stage-2 job's
    if not (isinstance(meta, dict) and meta.get("stage") in (1, 2) and "config" in meta):
        raise ConfigError(
            f"resume={path}: its '{CHECKPOINT_KEY}' entry is not facecluster's (a stage, "
            "1 or 2, and the run's config): the file is damaged; pass the run folder"
        )
    return meta


def _without_config(resume: str, folder: Path) -> ConfigError:
    """``resume=``'s refusal of a run folder that trained and has lost its config.yaml."""
    return ConfigError(
        f"resume={resume}: {folder} has no {RUN_CONFIG}: the run folder is damaged; "
        f"restore {RUN_CONFIG} from a copy of the run"
    )


def check_checkpoint_of_run(path: Path, meta: dict[str, Any], cfg: Config, resume: str) -> None:
    """Refuse a checkpoint saved by another run (its config differs from the run's on
    :data:`RESUME_FIXED_KEYS`, which no resume changes): another run's ``last.ckpt``
    copied into this one resumed with exit 0, its head rows other people's, or ended
    in Lightning's strict-load traceback after ``config.yaml`` was rewritten."""
    try:
        theirs = config_from_dict(meta["config"], f"{path}'s config")
    except (ConfigError, TypeError, KeyError):  # another release's keys: cannot tell
        return
    ours, values = cfg.to_dict(), theirs.to_dict()
    ignored = tuple(f"model.{k}" for k in FREE_MODEL_KEYS)
    problems = [
        f"{name}: {was!r} in the checkpoint, {now!r} in the run"
        for key in RESUME_FIXED_KEYS
        for name, was, now in _differences(key, _select(values, key), _select(ours, key))
        if name not in ignored
    ]
    if problems:
        raise ConfigError(
            f"resume={resume}: {path} was not saved by this run ({'; '.join(problems[:3])}): "
            "restore the run's own checkpoint from a copy of the run, or delete it (the "
            "stage, or its job, then trains from its start)"
        )


@dataclass(frozen=True)
class RunFolder:
    """One run's folder. ``RunFolder(path)`` only names it; nothing is read or written."""

    path: Path

    # ------------------------------------------------------------------ layout

    def stage_dir(self, stage: int, job: str | None = None) -> Path:
        """Stage 1's folder, or the folder of stage-2 job ``job`` (see :func:`job_name`)."""
        if stage == 2:
            if job is None:
                raise ValueError("stage 2 has one folder per job: name the job")
            return self.jobs_dir / job
        return self.path / f"stage{stage}"

    @property
    def jobs_dir(self) -> Path:
        """The folder of the stage-2 jobs' folders."""
        return self.path / "stage2" / "jobs"

    def checkpoint_dir(self, stage: int, job: str | None = None) -> Path:
        return self.stage_dir(stage, job) / "checkpoints"

    def last_checkpoint(self, stage: int, job: str | None = None) -> Path:
        return self.checkpoint_dir(stage, job) / f"{LAST}.ckpt"

    def job_log(self, job: str) -> Path:
        """Where launcher=local writes a stage-2 job's output."""
        return self.stage_dir(2, job) / "log.txt"

    @property
    def slurm_dir(self) -> Path:
        return self.path / "slurm"

    def subnet_file(self, k: int, suffix: str = ".pt") -> Path:
        """Sub-net ``k``'s final weights (.pt) or its record (.json)."""
        return self.path / "stage2" / "subnets" / f"subnet{k}{suffix}"

    @property
    def clusters_path(self) -> Path:
        return self.path / CLUSTERS

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def eval_file(self, what: str) -> Path:
        """An evaluation output: table (md), csv, json, or a plot (top_m, alpha, class_means)."""
        return self.eval_dir / EVAL_FILES[what]

    @property
    def finished(self) -> bool:
        return (self.path / RESULTS).is_file()

    # ---------------------------------------------------------- create, reopen

    @classmethod
    def for_training(cls, cfg: Config) -> RunFolder:
        """The folder this training run writes: inherited, resumed, or new."""
        if os.environ.get(RUN_DIR_ENV):
            return cls(Path(os.environ[RUN_DIR_ENV]))
        if cfg.resume:
            run = cls(_folder_of(Path(cfg.resume))).resolved()
            if problem := not_a_run(run.path):  # train(cfg) called without config_for_resume
                raise ConfigError(problem)
            path = Path(cfg.resume)
            if path.is_file():  # train(cfg) called without RunFolder.config_for_resume
                run._check_resume_point(path, read_checkpoint_meta(path)["stage"])
            try:  # another user's run: its config.yaml failed, after the data scan
                check_can_write(run.path)
            except OSError as e:
                raise ConfigError(
                    f"resume={cfg.resume}: this user cannot write the run folder "
                    f"{run.path} ({e.strerror or e}): resume it as a user who can (its owner, "
                    f"uid {run.path.stat().st_uid}), or copy the run folder and resume the copy"
                ) from None
            return run
        processes = launched_processes()
        if processes > 1 and not cfg.run_name:
            raise ConfigError(
                f"{processes} processes were started by torchrun or srun: name the run "
                "(run_name=...) so that they all write one run folder"
            )
        _check_output_dir(Path(cfg.output_dir).expanduser())
        name = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method}"
        run = cls(Path(cfg.output_dir).expanduser() / name).resolved()
        # The processes srun or torchrun start beside rank 0 refuse an existing run too,
        # or they would wait for it in DDP setup once it has refused (srun does not stop
        # them); one whose run.json names their own launch is the run their rank 0 has
        # just created (create)
        if (run.path / RUN_CONFIG).exists() and (
            is_global_zero() or _read_json(run.path / RUN_META).get("launch") != _launch_id()
        ):
            raise ConfigError(
                f"run folder {run.path} already exists; pass "
                f"{shlex.quote(f'resume={run.path}')} to continue it"
            )
        return run

    def resolved(self) -> RunFolder:
        return RunFolder(self.path.resolve())

    def create(self, new: bool = False, held: frozenset[str] = frozenset()) -> str:
        """Create (or reopen) the folder; returns the W&B run id. The config is written
        by :meth:`save_config` once the checks at start have passed. ``held``: what
        :meth:`held` found in the folder before the data scan (a new run refuses what
        another command has written since, :meth:`check_unclaimed`). ``new``: a new run
        (not a resume), whose ``run.json`` names the launch that creates it, so that the
        processes srun or torchrun started with rank 0 wait for this launch's, not an
        earlier command's that was refused before writing its config.

        Sets ``FACECLUSTER_RUN_DIR`` so the DDP ranks Lightning starts find it.
        """
        together = new and launched_processes() > 1
        if new and not together:
            self.check_unclaimed(held)
        os.environ[RUN_DIR_ENV] = str(self.path)
        meta = self.path / RUN_META
        if is_global_zero() and (
            not meta.exists() or (together and not (self.path / RUN_CONFIG).exists())
        ):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                check_can_write(self.path)
            except OSError as e:
                raise ConfigError(
                    f"output_dir: cannot write the run folder {self.path} ({e})"
                ) from None
            run_id = _read_json(meta).get("run_id") or uuid.uuid4().hex[:12]
            created = datetime.now().isoformat()
            import facecluster

            stamp = {"format": RUN_FORMAT, "facecluster": facecluster.__version__}
            self._write_json(
                RUN_META, {"run_id": run_id, "created": created, "launch": _launch_id(), **stamp}
            )
        if not is_global_zero():  # started by torchrun/srun with rank 0, not by it
            _wait_for(meta, launch=_launch_id() if together else None)
        return self.run_id

    CLAIMS = (RUN_CONFIG, CLASS_NAMES)
    """What a new run writes first into its folder: what another command's holds."""

    def held(self) -> frozenset[str]:
        """Which of :attr:`CLAIMS` the folder holds now (before the data scan: a folder
        left by a command stopped before its config is taken as it is)."""
        return frozenset(name for name in self.CLAIMS if (self.path / name).exists())

    def check_unclaimed(self, held: frozenset[str] = frozenset(), names: tuple = CLAIMS) -> None:
        """Refuse a new run whose folder another command has written ``names`` into since
        this one found it free or as ``held`` (:meth:`for_training`, before the data
        scan): two commands started with one ``run_name``, or in the same second without
        one. The second took the first's run over, rewriting its ``config.yaml`` (a
        review). Global rank 0 decides (the ranks Lightning's launcher starts come up
        after it wrote the config); the processes srun or torchrun start together are
        refused at start."""
        if not is_global_zero():
            return
        if found := [n for n in names if n not in held and (self.path / n).exists()]:
            raise ConfigError(
                f"run folder {self.path} was made by another command while this one read "
                f"the data (it holds {found[0]} now): two commands started with one "
                "run_name, or in the same second without one. Give each run its own "
                f"run_name (once that command has finished, "
                f"{shlex.quote(f'resume={self.path}')} continues its run)"
            )

    def save_config(self, cfg: Config) -> None:
        """Write the run's config (a resume: with its overrides), after the checks at
        start (free space, the data's identities): a refused command leaves the saved
        config as it was, so the next resume does not take up the settings it asked for."""
        if is_global_zero() and not os.environ.get(JOB_ENV):  # a job never rewrites it
            with replacing(self.path / RUN_CONFIG) as tmp:  # a job starting reads a whole file
                tmp.write_text(cfg.run_settings().to_yaml(), "utf-8")

    @property
    def run_id(self) -> str:
        return read_state(self.path / RUN_META, keys=("run_id",))["run_id"]

    def check_free_space(self, cfg: Config, backbone_params: int, num_classes: int) -> None:
        """Fail at start, naming output_dir, when the disk cannot hold the checkpoints
        still to be written: the run's estimate less what its folder holds already (a
        resume, each stage-2 job and the assembly would otherwise ask for the whole
        run's space again: 54 GiB at every start for an R50 over 93K identities, K=64,
        computed)."""
        needed = checkpoint_bytes_needed(cfg, backbone_params, num_classes)
        written = _bytes_under(self.path)
        needed = max(0, needed - written)
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise ConfigError(
                f"output_dir: {self.path} has {free / 2**20:.0f} MiB free, the run's checkpoints "
                f"need about {needed / 2**20:.0f} MiB more; free some space or choose another "
                "output_dir"
            )

    # ---------------------------------------------------------------- configs

    def config(self, overrides: list[str] | tuple = ()) -> Config:
        """The run's saved config with ``key=value`` overrides (e.g. a moved data.root).

        ``output_dir`` is where the folder is now (the saved value may be relative to
        another directory, or the folder moved), so evaluation and export find what
        the run's training kept there (``Config.cache_dir``).
        """
        if problem := not_a_run(self.path):
            raise ConfigError(problem)
        here = text_override("output_dir", self.path.parent)
        return load_config(self.path / RUN_CONFIG, [here, *overrides, "resume=null"])

    def _check_starting_weights(self, saved: Config, cfg: Config, resume: str) -> None:
        """A resume may name ``model.weights`` anew (a file moved since) only while stage
        1 has trained nothing: after that the file is not read, and the run's config
        would record another start than its weights had."""
        trained = self.has_stage_summary(1) or self.last_checkpoint(1).is_file()
        # as config.yaml keeps it (absolute): the same file, written relative, is no change
        if trained and cfg.run_settings().model.weights != saved.model.weights:
            raise ConfigError(
                f"resume={resume}: model.weights: stage 1 of {self.path} started from "
                f"{saved.model.weights!r} and has trained since, so the file is no longer "
                "read: leave model.weights unset"
            )

    def finished_config(self, overrides: list[str] | tuple = ()) -> Config:
        """The config of a finished run (evaluation, inference); refuses unfinished runs,
        naming the sub-nets still missing and the command that finishes them, and
        overrides of the keys that decide the split or the networks
        (:data:`EVALUATION_FIXED_KEYS`) or that only training reads
        (:data:`TRAINING_ONLY_KEYS`)."""
        unread = [  # stage2.negatives, which shaped the sub-nets, is named below, as trained
            o
            for o in overrides
            if _is_or_inside(key := o.split("=", 1)[0], TRAINING_ONLY_KEYS)
            and (
                _is_or_inside(key, TRAINING_ONLY_INSIDE_FIXED)  # model.weights
                or not _sets_any(key.strip(), EVALUATION_FIXED_KEYS)
            )
            and not _is_or_inside(key, EVALUATION_TRAINER_KEYS)
        ]
        if unread:
            device = any(_is_or_inside(o.split("=", 1)[0], DEVICE_KEYS) for o in unread)
            raise ConfigError(
                f"run={self.path}: {', '.join(unread)}: "
                f"{'a training setting' if len(unread) == 1 else 'training settings'}, "
                "which an evaluation does not read (to train the run further, resume it: "
                f"`{resume_command(self.path)} ...`"
                + (
                    "; the evaluation's device is eval.device=auto|cpu|cuda|cuda:N)"
                    if device
                    else ")"
                )
            )
        cfg = self.config(overrides)
        if overrides:  # the run's own config with every other override (a moved file)
            fixed = EVALUATION_FIXED_KEYS
            # "data={test_fraction: 0.3}" sets a fixed key too: a section's override goes
            others = [o for o in overrides if not _sets_any(o.split("=", 1)[0].strip(), fixed)]
            _refuse_contradictions(
                self.config(others), cfg, f"run={self.path}", fixed, evaluation=True
            )
        if not self.finished:
            busy = self.training_now()
            if busy is not None:  # the advice below would be refused as long as it runs
                lock, owner = busy
                raise ConfigError(
                    f"run={self.path}: the run is not finished: it is training now (host "
                    f"{owner.get('host', '?')}, pid {owner.get('pid', '?')}); try again "
                    f"once it has finished, or delete {lock} if that process is gone"
                )
            missing = ""
            if cfg.two_stage and self.clusters_path.is_file():
                todo = self.missing_subnets(cfg.clustering.num_clusters)
                if todo:
                    missing = f"; sub-nets {todo} of stage 2 are not trained"
            raise ConfigError(
                f"run={self.path}: the run is not finished (no {RESULTS}{missing}); "
                f"finish it with `{resume_command(self.path)}`"
            )
        return cfg

    @classmethod
    def config_for_resume(cls, resume: str, overrides: list[str] | tuple = ()) -> Config:
        """The saved config of the run to resume, with command-line overrides applied.

        Refuses a path that is neither a run folder nor a facecluster checkpoint, and
        overrides that contradict what the checkpoints were trained on.
        """
        path = resume_path(resume)
        if path.is_file():  # what the file is first, then where it is
            meta = read_checkpoint_meta(path)
            run = cls(_folder_of(path))
            run._check_resume_point(path, meta["stage"])
            # the run's own config, as resume=<run> takes: a job's checkpoint holds the
            # job's command (launcher=local, its devices, stage=2), and a SLURM run
            # resumed from it trained on the login node
            if not (run.path / RUN_CONFIG).is_file():  # (what the checkpoint holds was
                # taken here once, then refused by for_training: the run is damaged)
                raise _without_config(resume, run.path)
            saved = run.config()
            check_checkpoint_of_run(path, meta, saved, resume)
        elif (path / RUN_CONFIG).is_file():
            run = cls(path)
            saved = run.config()
        elif (path / RUN_META).is_file() and not any(
            (path / name).exists() for name in ("stage1", "stage2", CLUSTERS, RESULTS)
        ):  # made, then stopped before its config.yaml (a run that trained: damaged, below)
            raise ConfigError(
                f"resume={resume}: this run was stopped before it saved its {RUN_CONFIG} "
                "(in its checks at start), so it trained nothing: start it again with the "
                f"command that made it ({path} may be deleted)"
            )
        else:  # run.json without config.yaml (resume_path refused a path of neither)
            raise _without_config(resume, path)
        overrides = [o for o in overrides if not o.startswith("resume=")]
        # the run's own name and place, as given and behind a symbolic link
        here = {
            "output_dir": {run.path.parent.resolve(), run.path.resolve().parent},
            "run_name": {run.path.name, run.path.resolve().name},
        }
        for override in overrides:
            key, _, value = (part.strip().strip("'\"") for part in override.partition("="))
            if key in here:  # the run stays where it is: a new name or place was ignored
                given = Path(value).expanduser().resolve() if key == "output_dir" else value
                if given not in here[key]:
                    raise ConfigError(
                        f"resume={resume}: {key}={value} would move the run, which stays in "
                        f"{run.path}; leave {key} unset (or copy the run folder and resume "
                        "the copy)"
                    )
        where = [
            text_override("resume", path),
            text_override("output_dir", run.path.parent),
            text_override("run_name", run.path.name),  # a run named None, ~ or with a ${
        ]
        cfg = saved.with_overrides([*overrides, *where])
        # the run's modules stay: one registers its backbone for every later process (a
        # resume with imports=[] wrote them out of config.yaml, and the stage-2 jobs
        # failed after stage 1); a resume may add others
        cfg.imports = list(dict.fromkeys([*saved.imports, *cfg.imports]))
        # data at another path is checked by its split's digests (check_data), which a
        # run made before split.json lacks: there data.root stays as it was
        unchecked = () if (run.path / SPLIT).is_file() else ("data.root",)
        fixed = RESUME_FIXED_KEYS + unchecked + run._started_optim(cfg)
        _refuse_contradictions(saved, cfg, resume, fixed)
        run._check_starting_weights(saved, cfg, resume)
        epochs = saved.stage_epochs(1)
        done = run.stage1_finished
        if done and cfg.stage_epochs(1) != epochs:
            # without the clustering yet, stage 1 would continue from its last.ckpt for the
            # new count (its stage1.json then stale); with it, the count is ignored
            advice = (
                "Leave stage 1's epochs as they are (trainer.max_epochs sets them too, where "
                "stage1.max_epochs is unset: set stage2.max_epochs for the sub-nets), or start "
                "a new run"
                if cfg.two_stage
                else "The single model's training is finished (its epochs are stage1's and "
                "stage2's); start a new run for more"
            )
            raise ConfigError(
                f"resume={resume}: stage 1 of {run.path} is finished after {epochs} epochs; "
                f"{cfg.stage_epochs(1)} would train it again or change nothing. {advice}"
            )
        run._refuse_fewer_epochs(cfg, resume, stage1_done=done)
        run._refuse_settled(saved, cfg, resume)
        return cfg

    def _refuse_fewer_epochs(self, cfg: Config, resume: str, stage1_done: bool) -> None:
        """Refuse fewer epochs than an unfinished stage (stage 1, or a stage-2 job with
        sub-nets still to train) has trained already: Lightning refused the restored
        checkpoint at the fit with a traceback, after the run's config had taken up the
        count, so every later resume failed the same way."""
        started = [] if stage1_done else [(1, self.last_checkpoint(1))]
        if cfg.two_stage and self.clusters_path.is_file():
            missing = set(self.missing_subnets(cfg.clustering.num_clusters))
            named = set(cfg.stage2.subnets or ())  # trained again from the start
            started += [
                (2, self.last_checkpoint(2, job_name(subnets)))
                for subnets in self.started_jobs()
                if set(subnets) & missing and not set(subnets) <= named
            ]
        for stage, last in started:
            if not last.is_file():
                continue
            over = "stage 1 then trains" if stage == 1 else "its job then trains"
            try:
                saved = load_plain(last, what="checkpoint", mmap=True)
                # saved at an epoch's end: its "epoch" is that epoch's index
                trained = int(saved["epoch"]) + 1
                meta = saved[CHECKPOINT_KEY]
            except (OSError, ValueError, KeyError, TypeError) as e:  # a traceback before
                raise ConfigError(
                    f"resume={resume}: {last} cannot be read ({type(e).__name__}: {e}): "
                    f"restore it from a copy of the run, or delete it ({over} from its start)"
                ) from None
            check_checkpoint_of_run(last, meta if isinstance(meta, dict) else {}, cfg, resume)
            if cfg.stage_epochs(stage) < trained:
                raise ConfigError(
                    f"resume={resume}: stage {stage} of {self.path} has trained {trained} "
                    f"epochs ({last.relative_to(self.path)}); {cfg.stage_epochs(stage)} "
                    f"({cfg.epochs_source(stage)}) would end it before they were: give at "
                    f"least {trained}, or leave its epochs as they were"
                )

    def _refuse_settled(self, saved: Config, cfg: Config, resume: str) -> None:
        """Refuse overrides of what the run has done already and will not do again: the
        clustering's settings once ``clusters.pt`` exists; once the single model or one
        sub-net has finished (unless ``stage2.subnets`` names sub-nets to train again),
        stage 2's epochs and epoch size and what shaped the weights (:data:`SETTLED_KEYS`:
        the batch size, the margin head, gradient accumulation and clipping). They changed
        nothing for what had finished, or trained the rest otherwise, but the run's
        ``config.yaml`` then recorded them, misdescribing its weights."""
        old, new = saved.to_dict(), cfg.to_dict()
        changed = []
        if cfg.two_stage and self.clusters_path.is_file():
            changed += [
                f"clustering.{key}={new['clustering'][key]!r} (the run's clusters were made "
                f"with {value!r})"
                for key, value in old["clustering"].items()
                if new["clustering"][key] != value
            ]
        finished: list[int] = []  # sub-nets trained with the run's settings
        clusters = saved.clustering.num_clusters
        if cfg.two_stage:
            missing = self.missing_subnets(clusters) if self.clusters_path.is_file() else None
            finished = [k for k in range(clusters) if missing is not None and k not in missing]
            # one finished sub-net is enough: the others would train otherwise, unasked,
            # under a config.yaml describing them alone (a review: a mixed run, exit 0)
            trained = bool(finished)
        else:
            trained = self.has_stage_summary(1)
        subnets = "the sub-nets" if len(finished) == clusters else f"sub-nets {finished}"
        # named sub-nets train again with new settings (each sub-net's record keeps the
        # settings it trained with: stage2_settings); a single model has none to name
        if trained and (cfg.stage2.subnets is None or not cfg.two_stage):
            if cfg.two_stage and cfg.stage_epochs(2) != saved.stage_epochs(2):
                changed.append(
                    f"{cfg.stage_epochs(2)} stage-2 epochs ({subnets} trained "
                    f"{saved.stage_epochs(2)})"
                )
            if cfg.two_stage and cfg.stage2.epoch_size != saved.stage2.epoch_size:
                changed.append(  # the optimizer: above
                    f"stage2.epoch_size={cfg.stage2.epoch_size!r} ({subnets} trained with "
                    f"{saved.stage2.epoch_size!r})"
                )
            changed += [
                f"{key}={now!r} (the run trained with {'it unset' if was is None else repr(was)})"
                for settled in SETTLED_KEYS
                for key, was, now in _differences(settled, *_settled_pair(saved, cfg, settled))
            ]
        if changed:
            rest = [k for k in range(clusters) if k not in finished]
            again = (
                "to train sub-nets with new settings name them (stage2.subnets="
                f"[{','.join(map(str, rest or range(clusters)))}]: they train again from the "
                "stage-1 backbone, and each sub-net's record keeps the settings it trained "
                "with); for a new clustering start a new run"
                if cfg.two_stage
                else "for other settings start a new run"
            )
            done = (
                "has done this already and will not do it again, so these would change "
                "nothing but the run's record"
                if not 0 < len(finished) < clusters
                else f"has finished sub-nets {finished} with the run's settings, and the "
                f"others train with the same: these would train the others otherwise, and "
                f"the run's record would describe them alone"
            )
            raise ConfigError(
                f"resume={resume}: {self.path} {done}: {'; '.join(changed)}. Leave them "
                f"unset (data.eval_batch_size sets the evaluation's batch size); {again}"
            )

    def _started_optim(self, cfg: Config) -> tuple[str, ...]:
        """``stage<n>.optim`` of each stage that has trained: a resume restores its
        optimizer and schedule from the checkpoint (the learning rate, weight decay and
        momentum of the overrides would be ignored, the warm-up and schedule applied to
        the old base rate). Sub-nets that ``stage2.subnets`` names start over with them.
        And ``head`` while a stage is under way (trained, not finished): its loss would
        change in mid-training; between the stages it may, for the sub-nets. A retrain of
        named sub-nets may change both only while no other job is under way: the saved
        config is what the next resume continues that job with."""
        stage1 = self.last_checkpoint(1).is_file() or self.has_stage_summary(1)
        # a job command (stage2.group) resumes its own checkpoint, named sub-nets or not
        restarts = cfg.stage2.subnets and cfg.stage2.group is None
        if restarts:  # the jobs over named sub-nets go (restart_subnets); the others stay
            named, done = set(cfg.stage2.subnets), set(self.subnet_records())
            jobs = self.started_jobs()
            stage2 = any(not set(job) & named and set(job) - done for job in jobs)
        else:
            stage2 = bool(self.started_jobs() or self.subnet_records())
        midway = (stage1 and not self.has_stage_summary(1)) or stage2
        return (
            (("stage1.optim",) if stage1 else ())
            + (("stage2.optim",) if stage2 else ())
            + (("head",) if midway else ())
        )

    def _check_resume_point(self, path: Path, stage: int) -> None:
        """Refuse a ``resume=`` checkpoint the run would not continue from, whatever is
        left to do: a stage-2 checkpoint other than its job's ``last.ckpt`` (a job
        continues from its own), or an earlier stage-1 checkpoint once stage 1 has
        finished (it would train stage 1 again from there and replace its last.ckpt;
        the clustering and the sub-nets use the finished one)."""
        if stage != 1 and path.name != f"{LAST}.ckpt":
            raise ConfigError(
                f"resume={path}: a stage-2 job continues from its own {LAST}.ckpt; "
                f"pass the run folder {self.path}"
            )
        last = self.last_checkpoint(1)
        if stage == 1 and self.stage1_finished and path.resolve() != last.resolve():
            raise ConfigError(
                f"resume={path}: stage 1 of {self.path} is finished; continuing from this "
                f"checkpoint would train it again and replace its {last.parent.name}/"
                f"{last.name} (the clustering and the sub-nets use the finished stage 1): "
                f"pass the run folder, {shlex.quote(f'resume={self.path}')}"
            )

    def stage1_resume_point(self, resume: str | None) -> Path | None:
        """The checkpoint stage 1 continues from (None: stage 1 starts fresh): a stage-1
        checkpoint ``resume=`` names, else the run's own ``last.ckpt`` when resuming
        (:meth:`for_training` has refused the checkpoints it must not continue from, and
        ``config_for_resume`` before it, on the command line)."""
        path = Path(resume) if resume else None
        if path is not None and path.is_file() and read_checkpoint_meta(path)["stage"] == 1:
            return path
        stage1 = self.last_checkpoint(1)
        return stage1 if resume and stage1.is_file() else None

    # ------------------------------------------------------------ small files

    def _write_json(self, name: str | Path, value: Any) -> None:
        if is_global_zero():
            with replacing(self.path / name) as tmp:
                tmp.write_text(json.dumps(value, indent=2))

    def save_calibration(self, values: dict[str, float]) -> None:
        self._write_json(CALIBRATION, values)

    def calibration(self) -> dict[str, float]:
        """The fitted ``route`` numbers of the decision unit ({} before they are fitted)."""
        path = self.path / CALIBRATION
        if not path.is_file():
            return {}
        fitted = FITTED_ROUTE
        advice = "restore the file from a copy of the run, or delete it to fit these again"
        values = read_state(path, dict, fitted, advice)
        problems = route_problems(values)
        if problems or len(values) != len(fitted):
            why = "; ".join(problems) or f"it holds more than {', '.join(fitted)}"
            raise ConfigError(f"{path} cannot be used ({why}): the run folder is damaged; {advice}")
        return values

    def keep_data(self, dm: FaceDataModule) -> None:
        """Record the identity names of a new run, label by label, and what its val and
        test splits hold (:meth:`FaceDataModule.split_fingerprint`); a run that has them
        (resumed, a stage-2 job) checks instead that the data still gives the same
        (:meth:`check_data`)."""
        if (self.path / CLASS_NAMES).is_file():
            self.check_data(dm)
            return
        if is_global_zero():  # the writer's alone
            images, per_identity = dm.images_per_identity()
            kept = {
                **dm.split_fingerprint(),
                "images": images,
                "per_identity": per_identity,
                "split_version": SPLIT_VERSION,
            }
            self._write_json(SPLIT, kept)
        self._write_json(CLASS_NAMES, dm.class_names)  # last: it marks the data kept

    def check_data(self, dm: FaceDataModule) -> None:
        """The data's identities must be the run's, label for label, and split as the
        run's were (resume, evaluation, export).

        Raises:
            ConfigError: the data's identities are not the run's (an identity folder
                added or removed since): labels would name other people than the
                stage-1 head, the clusters and the sub-nets were trained on. Or their
                images are split otherwise (the same identities with their images in
                another order: a ``--shuffle`` pack of the run's folder, another copy):
                the val and test splits would hold training images; more than a quarter
                of the recorded images differing, or a split of another size. Or an
                identity holds more or fewer images than it did (any identity: its
                split changes too). A run made before the splits were recorded is not
                checked for that, nor one recorded before 2026-12-06 for the counts.
        """
        path = self.path / SPLIT
        # a damaged one read as absent, "a run made before split.json": unchecked, the
        # test split held training images and the results were written over
        kept = read_state(path, dict, SPLITS) if path.is_file() else None  # damaged: said
        made = (kept or {}).get("split_version", 1)  # recorded since 2026-12-07
        if made != SPLIT_VERSION:  # first: the open set's identities are split by it too,
            raise ConfigError(  # and other identities were said to be other data
                f"{path}: the run's images were split by facecluster's split version "
                f"{made!r}; this facecluster splits by version {SPLIT_VERSION}, so its val "
                "and test splits would not be the run's: resume, evaluate or export it with "
                "the facecluster that trained it"
            )
        self.check_identities(dm.class_names)
        if kept is None:
            return
        images, per_identity = dm.images_per_identity()
        if kept.get("per_identity", per_identity) != per_identity:  # recorded since 2026-12-06
            before = kept.get("images")
            said = (
                f"its splits hold {images:,} images, the run's {before:,}"
                if isinstance(before, int) and images != before
                else f"its splits hold {images:,} images, as the run's, but not as many of "
                "each identity"
            )
            raise ConfigError(
                f"{self.path}: the data at {dm.hparams.root} holds the run's identities, but "
                f"other images: {said} (images added to or removed from the data since the "
                "run), so its val and "
                "test splits would hold images the run trained on; point data.root at the "
                "data the run trained on, as it was"
            )
        # Images broken since (a disk error) change a few digests; a split made otherwise
        # changes most: an image is at the same place of an identity's split by chance
        # only (1 in 3 for an identity of 3 images, fewer for larger ones)
        differ = False
        counts = []  # images added or removed since: named as such, not as another order
        fingerprint = dm.split_fingerprint()
        for split in SPLITS:
            digests, before = fingerprint[split], kept[split]
            pairs = zip(digests, before, strict=False)
            changed = sum(a != b and "" not in (a, b) for a, b in pairs)  # "": unreadable
            differ |= len(digests) != len(before) or changed * 4 > len(digests)
            if len(digests) != len(before):
                counts.append(f"{split} {len(digests)} images, the run's {len(before)}")
        if counts:
            raise ConfigError(
                f"{self.path}: the data at {dm.hparams.root} holds the run's identities, but "
                f"other images: its split gives {'; '.join(counts)} (images added to or "
                "removed from the data since the run), so its val and test splits would "
                "hold images the run trained on; point data.root at the data the run "
                "trained on, as it was"
            )
        if differ:
            raise ConfigError(
                f"{self.path}: the data at {dm.hparams.root} holds the run's identities, but "
                "their images are not split as the run's were (the same identities with "
                "their images in another order, or other images: a `facecluster pack "
                "--shuffle` of the folder the run trained on, another copy of the data "
                "set), so its val and test splits would hold images the run trained on; "
                "point data.root at the data the run trained on (a folder and its plain "
                "pack split alike)"
            )

    def class_names(self) -> list[str]:
        return read_state(self.path / CLASS_NAMES, list, items=str)

    def test_split(self) -> list[str] | None:
        """The digests of the test split's images as the run recorded them (None: a run
        made before ``split.json``)."""
        path = self.path / SPLIT
        return read_state(path, dict, SPLITS)["test"] if path.is_file() else None

    def check_identities(self, names: list[str]) -> None:
        """The data's identities must be the run's, label for label (evaluation, export).

        Raises:
            ConfigError: naming the settings that decide them.
        """
        trained = self.class_names()
        if names != trained:
            order = " (the same count, other names or order)" if len(names) == len(trained) else ""
            pairs = enumerate(zip(names, trained, strict=False))  # up to the shorter list
            first = next((i for i, (a, b) in pairs if a != b), None)
            differ = ""
            if first is not None:
                given, own = names[first], trained[first]
                # two forms of one name (a copy made on macOS: NFD) looked the same
                alike = same_name(given) == same_name(own)
                shown = ascii if alike else repr
                differ = f"; label {first} is {shown(given)} in the data, {shown(own)} in the run"
                if alike:
                    differ += " (one name in two Unicode forms or spacings: a copy made on macOS?)"
            raise ConfigError(
                f"{self.path}: the data gives {len(names)} identities, the run trained on "
                f"{len(trained)}{order}{differ}; "
                "data.root, data.max_classes, data.min_images_per_class, "
                "data.unseen_fraction and seed must be the run's own, and data.root's "
                "identities as they were (to train on other identities, start a new run)"
            )

    def save_unseen_identities(self, names: dict[str, list[str]]) -> None:
        """Open-set runs: the identities held out of training, per split."""
        if any(names.values()):
            self._write_json(UNSEEN_IDENTITIES, names)

    def stage_summary_path(self, stage: int) -> Path:
        """``stage<n>.json``: the stage's held-out summary, written when it is done."""
        return self.path / f"stage{stage}.json"

    def save_stage_summary(self, stage: int, summary: dict[str, Any]) -> None:
        self._write_json(self.stage_summary_path(stage).name, summary)

    def stage_summary(self, stage: int) -> dict[str, Any]:
        return read_state(self.stage_summary_path(stage))

    def has_stage_summary(self, stage: int) -> bool:
        """Stage 1: trained and tested; stage 2: every sub-net finished and assembled."""
        return self.stage_summary_path(stage).is_file()

    @property
    def stage1_finished(self) -> bool:
        """Stage 1's training is over: tested (stage1.json), or clustered (clusters.pt,
        written at the end of its fit; a stop in its test leaves no stage1.json). The
        clusters and the sub-nets are made from that stage 1, never trained again."""
        return self.has_stage_summary(1) or self.clusters_path.is_file()

    def save_training_report(self, results: dict[str, Any], table: str) -> None:
        self._write_json(RESULTS, results)
        if is_global_zero():
            with replacing(self.path / RESULTS_TABLE) as tmp:  # never through a link
                tmp.write_text(table + "\n", "utf-8")

    def clear_training_report(self) -> None:
        """Sub-nets are (re)trained: the run's results, stage-2 summary and the decision
        unit's fitted numbers no longer hold."""
        if is_global_zero():
            for name in (RESULTS, RESULTS_TABLE, self.stage_summary_path(2).name, CALIBRATION):
                (self.path / name).unlink(missing_ok=True)

    # ----------------------------------------------------------------- sub-nets

    def save_subnet(
        self, k: int, backbone: dict[str, Tensor], head: Tensor, record: dict[str, Any]
    ) -> None:
        """Sub-net ``k`` is finished: its weights, then its record (the marker), atomically."""
        if not is_global_zero():
            return
        path = self.subnet_file(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"backbone": backbone, "head": head}, path)
        self._write_json(self.subnet_file(k, ".json").relative_to(self.path), record)

    def subnet_records(self) -> dict[int, dict[str, Any]]:
        """The finished sub-nets' records, by cluster: a record whose weights (.pt) are
        gone is not (the run said "finished", then its evaluation failed on the file;
        now the sub-net is trained again)."""
        folder = self.subnet_file(0).parent
        records = {}
        for path in sorted(folder.glob("subnet*.json")) if folder.is_dir() else ():
            record = read_state(path, keys=("cluster",))
            if path.with_suffix(".pt").is_file():
                records[int(record["cluster"])] = record
        return records

    def save_job(self, subnets: list[int]) -> None:
        """A stage-2 job starts: its folder records its sub-nets (``subnets.json``)."""
        if is_global_zero():
            folder = self.stage_dir(2, job_name(subnets))
            folder.mkdir(parents=True, exist_ok=True)
            # replaced whole: every job start (a requeue too) writes it while other jobs'
            # resumes read it (started_jobs), and a half-written file would stop them
            self._write_json(folder.relative_to(self.path) / JOB_SUBNETS, sorted(subnets))

    @contextlib.contextmanager
    def job_lock(self, job: str, subnets: list[int] | None = None) -> Iterator[None]:
        """Hold stage-2 job ``job`` while it trains: a second process that would train
        the same job (a second submission, a resume while jobs still run) is refused,
        and so is one whose job shares any of ``subnets`` with a job training now
        (another ``stage2.jobs`` groups the same sub-nets under other names).

        The lock is ``stage2/jobs/<job>/running.json``, held as :meth:`_lock` holds one;
        once taken, rank 0 looks at the other jobs' sub-nets and marks it ``checked``,
        which the other processes srun or torchrun started with it wait for too.
        """
        path = self.stage_dir(2, job) / RUNNING

        def check(refused: Path, me: dict[str, Any], mine: dict[str, Any]) -> None:
            self._check_subnets_free(job, subnets, path, refused, me, mine)

        extra = {"subnets": sorted(subnets or []), "checked": False}
        with self._lock(path, f"stage-2 job {job} is already training", extra, check):
            yield

    @contextlib.contextmanager
    def stage1_lock(self) -> Iterator[None]:
        """Hold stage 1 and the clustering while this process fits them (``stage=all``,
        ``1`` or ``cluster``): a second command on the run (a resume while the first
        still trains) is refused before it trains stage 1 again, or clusters again,
        into the same ``last.ckpt`` and ``clusters.pt``.

        The lock is ``stage1/running.json``, held as :meth:`_lock` holds one.
        """
        with self._lock(self.stage1_lock_path, self._stage1_busy):
            yield

    @property
    def stage1_lock_path(self) -> Path:
        return self.stage_dir(1) / RUNNING

    @property
    def _stage1_busy(self) -> str:
        return f"stage 1 (or the clustering) of {self.path} is already running"

    def check_stage1_free(self) -> None:
        """Refuse a command that would fit stage 1 or the clustering while another holds
        :meth:`stage1_lock`, at start: before it writes the run's config (a resume's
        overrides) or anything else. :meth:`stage1_lock` decides again when it is taken
        (two commands started at once). Global rank 0 decides; the processes srun or
        torchrun started with it read its refusal at the lock they wait for."""
        if not is_global_zero():
            return
        holder = self._stage1_holder()
        if holder is not None:
            self._refuse_held(self.stage1_lock_path, _lock_owner(), holder, self._stage1_busy)

    def drop_stale_stage1_lock(self) -> None:
        """Remove a :meth:`stage1_lock` whose process is gone (killed before it let go),
        by global rank 0, for a command that does not take it: a finished run kept it,
        and a command on another machine cannot tell it from a live one."""
        if is_global_zero() and (other := _read_json(self.stage1_lock_path)):
            if _lock_is_stale(other, _lock_owner()):
                _remove_stale(self.stage1_lock_path, other)

    def _stage1_holder(self) -> dict[str, Any] | None:
        """The record of the live process that holds :meth:`stage1_lock`, else None."""
        other = _read_json(self.stage1_lock_path)
        return other if other and not _lock_is_stale(other, _lock_owner()) else None

    @contextlib.contextmanager
    def _lock(
        self,
        path: Path,
        busy: str,
        extra: dict[str, Any] | None = None,
        check: Callable[[Path, dict[str, Any], dict[str, Any]], None] | None = None,
    ) -> Iterator[None]:
        """Hold the lock ``path`` while the block runs; a process that holds it already
        is named in the refusal, ``busy`` ("stage-2 job X is already training") first.

        The lock (host, pid, SLURM job id and restart count, launch, and ``extra``) is
        created exclusively by global rank 0. A lock left by a process that is gone
        (same host, no such pid) or by an earlier run of the same SLURM job (requeued:
        another ``SLURM_RESTART_COUNT``) is taken over; a live process in the same
        allocation (two commands under one ``salloc``) is not. ``check(refused, me,
        mine)`` runs once it is taken (it may refuse, which lets the lock go again).

        The other processes that srun or torchrun started with rank 0 wait for its
        decision: the lock naming their launch (once ``checked``, when ``extra`` has that
        mark), or ``refused.json`` naming it, which they raise too, rather than waiting
        for rank 0 in DDP setup. The ranks Lightning's own launcher starts come up inside
        rank 0's lock (in its ``Trainer.fit``) and take none.
        """
        refused = path.with_name(REFUSED)
        me = _lock_owner()
        if not is_global_zero():
            if launched_processes() > 1:
                _wait_for_lock(path, refused, me["launch"])
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # the record is written whole, then linked to the lock's name (os.link fails if
        # it exists, on NFS too): a write that fails (a full disk) leaves no empty lock
        record = path.with_name(f".{RUNNING}.{os.getpid()}")
        mine = {**me, **(extra or {})}
        text = json.dumps(mine)
        try:
            try:
                record.write_text(text)
            except OSError as e:  # a full disk: named by the lock it was for
                if disk_full(e):
                    raise write_error(e, path) from None
                raise
            while True:
                try:
                    os.link(record, path)
                    break
                except FileExistsError:
                    other = _read_json(path)
                except OSError:  # no hard links (an object-store mount): create it at once
                    try:
                        with open(path, "x") as f:
                            f.write(text)
                        break
                    except FileExistsError:
                        other = _read_json(path)
                if not other:  # gone since, or empty: left by an earlier facecluster
                    _remove_stale(path, other)  # if still empty, after EMPTY_LOCK_AGE
                    time.sleep(0.1)
                    continue
                if not _lock_is_stale(other, me):
                    self._refuse_held(path, me, other, busy)
                _remove_stale(path, other)
        finally:
            record.unlink(missing_ok=True)
        if check is not None:
            try:  # taken: let go again on any failure before it is marked checked
                check(refused, me, mine)
            except BaseException:
                _release(path, me)
                raise
        refused.unlink(missing_ok=True)
        try:
            yield
        finally:
            _release(path, me)

    def _refuse_held(
        self, path: Path, me: dict[str, Any], other: dict[str, Any], busy: str
    ) -> None:
        """Refuse: ``other`` holds the lock ``path``, live."""
        slurm = f", SLURM job {other['slurm_job']}" if other.get("slurm_job") else ""
        message = (
            f"{busy} (host {other['host']}, pid {other['pid']}{slurm}); wait for it to end, "
            f"or delete {path} if that process is gone"
        )
        self._refuse(path.with_name(REFUSED), me, message, other, path)

    def _check_subnets_free(
        self,
        job: str,
        subnets: list[int] | None,
        path: Path,
        refused: Path,
        me: dict[str, Any],
        mine: dict[str, Any],
    ) -> None:
        """Refuse ``job`` if a job training now holds any of ``subnets``; else mark its
        lock checked. Taken first, then the others looked at: of two jobs started at
        once over the same sub-nets, at least one sees the other."""
        busy = self._training_jobs(exclude=job)
        shared = {name: set(held) & set(subnets or []) for name, (held, _) in busy.items()}
        for name, common in shared.items():
            if common:  # job_lock lets this job's lock go
                holder = busy[name][1]
                message = (
                    f"stage-2 job {job} would train sub-nets {sorted(common)}, which job "
                    f"{name} is training now (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}); wait for it to end, or delete "
                    f"{self.stage_dir(2, name) / RUNNING} if that process is gone"
                )
                self._refuse(refused, me, message, holder, self.stage_dir(2, name) / RUNNING)
        with replacing(path) as tmp:  # now the other ranks of this launch may train
            tmp.write_text(json.dumps({**mine, "checked": True}))

    @staticmethod
    def _refuse(
        refused: Path, me: dict[str, Any], message: str, holder: dict[str, Any], lock: Path
    ) -> None:
        """Raise ``message``; this launch's other processes (srun's, torchrun's) read it
        from ``refused`` and stop too, while ``holder`` still holds ``lock``."""
        if me["launch"]:
            refusal = {
                "launch": me["launch"],
                "error": message,
                "holder": holder,
                "holder_lock": str(lock),
            }
            with replacing(refused) as tmp:
                tmp.write_text(json.dumps(refusal))
        raise ConfigError(message)

    def _training_jobs(self, exclude: str | None = None) -> dict[str, tuple[list[int], dict]]:
        """The stage-2 jobs training now (a live lock, or an empty one being written),
        with their sub-nets (from the lock, or the job's ``subnets.json``) and lock."""
        jobs = self.jobs_dir
        found = {}
        for lock in sorted(jobs.glob(f"*/{RUNNING}")) if jobs.is_dir() else ():
            if lock.parent.name == exclude:
                continue
            other = _read_json(lock)  # empty: an earlier facecluster's, left or being written
            if (not other and _age(lock) <= EMPTY_LOCK_AGE) or (
                other and not _lock_is_stale(other, _lock_owner())
            ):
                held = other.get("subnets") or _read_json(lock.parent / JOB_SUBNETS) or []
                found[lock.parent.name] = (list(held), other)
        return found

    def training_now(self) -> tuple[Path, dict[str, Any]] | None:
        """The lock of a command training the run now (its stage 1 or clustering, or a
        stage-2 job) and its record (empty while it is being written), else None."""
        holder = self._stage1_holder()
        if holder is not None:
            return self.stage1_lock_path, holder
        jobs = self._training_jobs()
        first = min(jobs, default=None)
        return (self.stage_dir(2, first) / RUNNING, jobs[first][1]) if first else None

    def started_jobs(self) -> list[list[int]]:
        """The sub-nets of each stage-2 job that has saved a checkpoint, furthest first."""
        jobs = self.jobs_dir
        found = []
        for last in jobs.glob(f"*/checkpoints/{LAST}.ckpt") if jobs.is_dir() else ():
            record = last.parents[1] / JOB_SUBNETS
            if record.is_file():
                found.append((-last.stat().st_mtime, read_state(record, list)))
        return [subnets for _, subnets in sorted(found)]

    def check_no_job_training(self) -> None:
        """Refuse a retrain of named sub-nets (``stage2.subnets``) while a stage-2 job of
        the run is training: deleting its folder would leave two processes training its
        sub-nets. Global rank 0 decides alone: the ranks Lightning starts come up inside
        its own job lock, and ranks on other nodes cannot tell a lock left there by a
        process that is gone from a live one (they would disagree with rank 0). When it
        refuses, the ranks srun or torchrun started beside it stop at the job lock they
        wait for (``job_lock``: "rank 0 did not take the job lock")."""
        if not is_global_zero():
            return
        busy = sorted(self._training_jobs())
        if busy:
            raise ConfigError(
                f"stage2.subnets: stage-2 job {busy[0]} is training now "
                f"({self.stage_dir(2, busy[0]) / RUNNING}); retrain sub-nets once it has ended"
            )

    def check_not_training(self) -> None:
        """Refuse a command that continues the run (not a launcher's job) while another
        process trains it, at start: it wrote its overrides into the run's config before
        a lock refused it, so the resume that the training command printed then took them
        up (fewer epochs than it had trained: a traceback at every later resume), and
        the local jobs it planned over the locked sub-nets were reported as failed.
        Global rank 0 decides (:meth:`check_no_job_training`)."""
        if not is_global_zero():
            return
        busy = self.training_now()
        if busy is not None:
            lock, owner = busy
            raise ConfigError(
                f"resume={self.path}: the run is training now (host {owner.get('host', '?')}, "
                f"pid {owner.get('pid', '?')}); resume it once that command has ended (or "
                f"stop it: its own resume continues it), or delete {lock} if that process "
                "is gone"
            )

    def restart_subnets(self, groups: list[list[int]]) -> None:
        """These sub-nets start over: their jobs' folders and finished files go.

        Raises:
            ConfigError: a stage-2 job of the run is training now (its lock is live):
                deleting its folder would leave two processes training its sub-nets.
        """
        self.check_no_job_training()
        if not is_global_zero():
            return
        restarted = {k for group in groups for k in group}
        # every job over any of them, however it was grouped: a job folder left with
        # another grouping's checkpoint would be continued by the next resume
        jobs = self.jobs_dir
        for record in sorted(jobs.glob(f"*/{JOB_SUBNETS}")) if jobs.is_dir() else ():
            if restarted & set(_read_json(record) or []):
                shutil.rmtree(record.parent, ignore_errors=True)
        for group in groups:
            shutil.rmtree(self.stage_dir(2, job_name(group)), ignore_errors=True)
            for k in group:
                self.subnet_file(k, ".json").unlink(missing_ok=True)
                self.subnet_file(k).unlink(missing_ok=True)

    def missing_subnets(self, num_clusters: int) -> list[int]:
        """Sub-nets with no finished record yet."""
        done = self.subnet_records()
        return [k for k in range(num_clusters) if k not in done]

    def assignment(self, num_clusters: int | None = None) -> ClusterAssignment:
        """The run's clusters: ``clusters.pt``, holding ``num_clusters`` when given (the
        run's config's: a hand-edited ``config.yaml`` was ignored without a word).

        Raises:
            UnsafeFileError: the file holds objects other than plain data.
            ConfigError: the file is damaged, or holds another number of clusters (one
                line, where a traceback came).
        """
        try:
            return ClusterAssignment.load(self.clusters_path, num_clusters)
        except UnsafeFileError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # ----------------------------------------------------------------- weights
    # The stage systems' attribute names are the checkpoints' key prefixes:
    # BackboneSystem.backbone / .head, SubnetSystem.subnets[k] / .heads[k].

    def stage1_weights(self, map_location: str | torch.device = "cpu") -> StageWeights:
        """The stage-1 backbone and head of the final finished epoch."""
        path = self._stage1_checkpoint()
        # memory-mapped: a stage-2 job reads the backbone, not the (large) head
        saved = load_plain(path, map_location, "stage-1 checkpoint", mmap=True)
        state = self._checked_state(path, saved, "stage-1 checkpoint", ["head.weight"])
        head_state = {k: v for k, v in _under(state, "head.").items() if k != "weight"}
        return StageWeights(_under(state, "backbone."), state["head.weight"], head_state)

    def subnet_weights(self, map_location: str | torch.device = "cpu") -> list[StageWeights]:
        """Each sub-net's backbone and head rows (index = cluster), as its job finished.

        Raises:
            ConfigError: sub-nets are missing, named, with the command that trains them.
        """
        files = self._subnet_files()
        if isinstance(files, Path):  # a run finished before stage 2 had jobs: one
            saved = load_plain(files, map_location, "stage-2 checkpoint")
            heads = [f"heads.{k}.weight" for k in range(self.assignment().num_clusters)]
            state = self._checked_state(files, saved, "stage-2 checkpoint", heads)
            return [  # checkpoint held every sub-net
                StageWeights(_under(state, f"subnets.{k}."), state[f"heads.{k}.weight"])
                for k in range(self.assignment().num_clusters)
            ]
        weights = []
        for k, path in enumerate(files):
            saved = load_plain(path, map_location, f"sub-net {k}")
            saved = saved if isinstance(saved, dict) else {}
            # what save_subnet writes: a KeyError, or a TypeError where the weights went
            problems = [
                f"it has no {key!r}" if key not in saved else f"its {key!r} is not {what}"
                for key, kind, what in (
                    ("backbone", dict, "a state dict"),
                    ("head", Tensor, "a tensor of head rows"),
                )
                if not isinstance(saved.get(key), kind)
            ]
            if problems:
                _, remedy = self._weights_files(True)[path]
                raise ConfigError(
                    f"{path} (sub-net {k}) cannot be read ({'; '.join(problems)}): the run "
                    f"folder is damaged{remedy}"
                )
            weights.append(StageWeights(saved["backbone"], saved["head"]))
        return weights

    @staticmethod
    def _checked_state(path: Path, saved: Any, what: str, tensors: list[str]) -> dict:
        """A Lightning checkpoint's ``state_dict``, holding each of ``tensors``.

        Raises:
            ConfigError: it has none, or lacks one of them (a KeyError before).
        """
        state = saved.get("state_dict") if isinstance(saved, dict) else None
        if not isinstance(state, dict):
            problem = "it has no state dict"
        else:
            lacking = [key for key in tensors if not isinstance(state.get(key), Tensor)]
            problem = f"its state dict lacks {lacking[0]!r}" if lacking else ""
        if problem:
            raise ConfigError(
                f"{path} ({what}) cannot be read ({problem}): the run folder is damaged; "
                "restore it from a copy of the run"
            )
        return state

    def _weights_files(self, two_stage: bool) -> dict[Path, tuple[str, str]]:
        """The weights files an evaluation of the run reads: ``{path: (what, remedy)}``
        (the remedy where one is missing or damaged)."""
        restore = "; restore it from a copy of the run"
        files = {self._stage1_checkpoint(): ("stage-1 checkpoint", restore)}
        if two_stage:
            subnets = self._subnet_files()
            if isinstance(subnets, Path):
                files[subnets] = ("stage-2 checkpoint", restore)
            else:
                for k, path in enumerate(subnets):  # one sub-net trains again on its own
                    again = f'{resume_command(self.path)} "stage2.subnets=[{k}]"'
                    files[path] = (f"sub-net {k}", f"{restore}, or train it again: `{again}`")
        return files

    def weights_stamp(self, two_stage: bool) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """The run's weights files (:meth:`check_weights`' and, for a two-stage run, its
        clusters) by what they are, each with what tells it rewritten since
        (:func:`~facecluster.io.file_stamp`; :func:`changed_weights` looks again): an
        evaluation that began before a resume retrained sub-nets wrote the old weights'
        figures over the new ones' (a review)."""
        files = {what: path for path, (what, _) in self._weights_files(two_stage).items()}
        if two_stage:
            files["clusters.pt"] = self.clusters_path
        return {what: (path, file_stamp(path, inode=False)) for what, path in files.items()}

    @staticmethod
    def changed_weights(stamp: dict[str, tuple[Path, tuple[int, ...]]]) -> list[str]:
        """What of :meth:`weights_stamp`'s files is no longer as it was: rewritten, or
        gone (a resume retraining a sub-net deletes its file first)."""
        changed = []
        for what, (path, then) in stamp.items():
            try:
                now = file_stamp(path, inode=False)
            except FileNotFoundError:
                now = None
            if now != then:
                changed.append(what)
        return changed

    def _stage1_checkpoint(self) -> Path:
        path = self.last_checkpoint(1)
        if not path.is_file():
            why = (
                "deleted or moved since the run finished?"
                if self.finished
                else "is stage 1 finished?"
            )
            raise FileNotFoundError(f"{path} is missing: {why}")
        return path

    def _subnet_files(self) -> list[Path] | Path:
        """Each sub-net's file (index = cluster), or the one stage-2 checkpoint of a run
        finished before stage 2 had jobs.

        Raises:
            ConfigError: sub-nets are missing, named, with the command that trains them.
        """
        num_clusters = self.assignment().num_clusters
        missing = self.missing_subnets(num_clusters)
        legacy = self.path / "stage2" / "checkpoints" / f"{LAST}.ckpt"
        if len(missing) == num_clusters and self.finished and legacy.is_file():
            return legacy
        if missing:
            raise ConfigError(
                f"{self.path}: sub-nets {missing} of stage 2 are not trained; finish them "
                f"with `{resume_command(self.path)}`"
            )
        return [self.subnet_file(k) for k in range(num_clusters)]

    def check_weights(self, two_stage: bool) -> None:
        """Every weights file an evaluation of the run reads is there and not cut short
        (:func:`~facecluster.io.check_archive`; no tensor is read): ``evaluate.py run=A
        run=B`` checks every run before the first one's evaluation, minutes at scale.

        Raises:
            FileNotFoundError: a file is missing. ValueError: one is cut short or is no
                torch file. ConfigError: sub-nets are not trained.
        """
        for path, (what, remedy) in self._weights_files(two_stage).items():
            try:
                check_archive(path, what)
            except ValueError as e:  # cut short, or no torch file: what to do
                raise ValueError(f"{e}{remedy}") from None


@dataclass(frozen=True)
class StageWeights:
    """A trained backbone's state dict and its margin head's rows."""

    backbone: dict[str, Tensor]
    head: Tensor
    head_state: dict[str, Tensor] = field(default_factory=dict)
    """The head's other saved tensors (AdaFace's running norm statistics): stage 1's
    start each sub-net's head, whose backbone starts from stage 1's."""


def _lock_owner() -> dict[str, Any]:
    """What a job lock records of the process holding it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME"),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "launch": _launch_id(),
        "started": _process_start(os.getpid()),
    }


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, as this machine's boot and the tick count since it
    (``/proc``; None where there is none): a pid names one process only together with
    it. A container restarted runs ``train.py`` as pid 1 again."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot} {stat.rsplit(')', 1)[1].split()[19]}"  # field 22: starttime


def _data_set(root: Path) -> Path:
    """What ``data.root`` reads, however written: a RecordIO file (named by itself or by
    its folder), else the image folder."""
    try:
        paths = rec_paths(root)
    except (OSError, ValueError):  # a folder this user cannot search: compared as written
        paths = None
    return (paths[0] if paths is not None else root).resolve()


def _remove_stale(path: Path, stale: dict[str, Any]) -> None:
    """Remove lock ``path`` if it still holds the ``stale`` record read from it (``{}``:
    if it is still empty, and older than :data:`EMPTY_LOCK_AGE`).

    Two processes that judged the same lock stale must not both take it over. One
    process at a time removes a lock: the one that created its takeover mark
    (``.running.json.takeover``, exclusively, naming that process as a lock does), which
    reads the lock again under it and removes it only if it is still the stale one. A
    live lock is never moved or removed by another process. (The version before
    renamed the lock aside and put it back if it was live: a third process could link
    its own lock in that gap, and it and the live holder both held it.) The others
    return at once and read the lock again. A mark is taken away only when its process
    is gone (killed in the instant it held it), as a lock is, never for its age: a
    holder held up on a slow file system keeps it."""
    mark = path.with_name(f".{path.name}.takeover")
    me = _lock_owner()
    if not _create_whole(mark, json.dumps(me)):
        held = _read_json(mark)
        if (held and _lock_is_stale(held, me)) or (not held and _age(mark) > EMPTY_LOCK_AGE):
            _unlink_if(mark, held)
        time.sleep(0.05)  # another process is taking it over: read the lock again
        return
    try:
        if _read_json(path) == stale and (stale or _age(path) > EMPTY_LOCK_AGE):
            path.unlink(missing_ok=True)
    finally:
        _unlink_if(mark, me)


def _create_whole(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists (False): written to a file of its
    own, then linked to ``path`` (os.link fails if it exists, on NFS too), so that it is
    never seen empty; where hard links are refused (an object-store mount), created at
    once and written."""
    record = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        record.write_text(text)
        try:
            os.link(record, path)
        except FileExistsError:
            return False
        except OSError:
            try:
                with open(path, "x") as f:
                    f.write(text)
            except FileExistsError:
                return False
        return True
    finally:
        record.unlink(missing_ok=True)


def _release(path: Path, me: dict[str, Any]) -> None:
    """Let go of lock ``path`` if this process still holds it. Another process may have
    taken it over meanwhile (it judged this one stale: a requeue of the same SLURM job
    while this process was still ending), and its lock is left to it."""
    held = _read_json(path)
    if all(held.get(key) == me[key] for key in LOCK_IDENTITY):
        path.unlink(missing_ok=True)


def _unlink_if(path: Path, record: dict[str, Any]) -> None:
    """Remove ``path`` if it still holds ``record``."""
    if _read_json(path) == record:
        path.unlink(missing_ok=True)


def _lock_is_stale(other: dict[str, Any], me: dict[str, Any]) -> bool:
    """A job lock whose process is gone, or an earlier run of this SLURM job, or one of
    another SLURM job that has left the queue (killed on its node: an OOM kill, a node
    failure, which left its lock where a resubmission was refused)."""
    # a job id names a job within its cluster only (a lock from before the cluster was
    # recorded: taken as this one's)
    cluster = other.get("slurm_cluster", me["slurm_cluster"])
    same_job = (
        other.get("slurm_job")
        and other.get("slurm_job") == me["slurm_job"]
        and cluster == me["slurm_cluster"]
    )
    if same_job and other.get("slurm_restart") != me["slurm_restart"]:
        return True  # requeued: SLURM counts the restarts of a job id
    if other.get("host") != me["host"]:
        # another machine's processes cannot be looked at; SLURM knows its jobs (on this
        # host the pid decides: an environment can carry an allocation's id past its end)
        if not other.get("slurm_job") or same_job:
            return False
        return _slurm_job_gone(other["slurm_job"], cluster)
    if not pid_alive(int(other["pid"])):
        return True
    # a live pid, but another process than the lock's (a restarted container's pid 1)
    started, now = other.get("started"), _process_start(int(other["pid"]))
    return started is not None and now is not None and started != now


_SQUEUE_FAILED = [-float("inf")]
"""When squeue last could not be asked: a start that looks at many locks (a stage-2 job
beside 63 others) asks it again only a minute later, while the ranks srun started with
it wait for its decision."""


def _slurm_job_gone(job: str, cluster: str | None = None) -> bool:
    """Whether SLURM no longer has job ``job`` queued or running (``squeue -j`` lists
    nothing, or no longer knows the id); False when squeue cannot be asked.

    ``cluster``: the SLURM cluster the job ran on (``SLURM_CLUSTER_NAME``). A job of
    another cluster than this machine's is asked about there (``--clusters``): under
    multi-cluster SLURM this one's does not know the id, which looked like a job gone.
    Only then, as ``--clusters`` goes through slurmdbd, which a site without accounting
    does not run (squeue then fails, and the lock is kept)."""
    if time.monotonic() - _SQUEUE_FAILED[0] < 60.0:
        return False
    try:
        command = ["squeue", "--noheader", "--format=%i", f"--jobs={job}"]
        if cluster and cluster != _local_cluster():
            command.append(f"--clusters={cluster}")
        asked = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        _SQUEUE_FAILED[0] = time.monotonic()
        return False
    if asked.returncode != 0:  # an id SLURM has forgotten: "Invalid job id specified"
        forgotten = "invalid job id" in asked.stderr.lower()
        if not forgotten:
            _SQUEUE_FAILED[0] = time.monotonic()
        return forgotten
    # --clusters prints a "CLUSTER: <name>" line before the cluster's jobs
    return not [
        line
        for line in asked.stdout.split("\n")
        if line.strip() and not line.startswith("CLUSTER:")
    ]


def _local_cluster() -> str | None:
    """The SLURM cluster this machine belongs to: the job's (``SLURM_CLUSTER_NAME``), else
    the configured one (a login node); None if neither says."""
    return os.environ.get("SLURM_CLUSTER_NAME") or _configured_cluster()


@functools.cache
def _configured_cluster() -> str | None:
    """``ClusterName`` of ``scontrol show config`` (slurm.conf; no slurmdbd), or None."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in shown.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip() or None
    return None


def launched_processes() -> int:
    """Processes an outside launcher started for this run (torchrun, srun), else 1.

    Not WORLD_SIZE alone: Lightning's own launcher leaves it in rank 0's environment.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return int(os.environ.get("WORLD_SIZE", 1))
    if os.environ.get("SLURM_STEP_ID") is not None:  # inside srun
        return int(os.environ.get("SLURM_NTASKS", 1))
    return 1


def _launch_id() -> str | None:
    """What the processes that srun or torchrun started together share, else None.

    torchrun's run id is "none" unless a rendezvous id was given, so its master
    address and port (one launch's alone while it runs) are part of it; a loopback
    master (one machine's launch, ``--standalone`` or a static port) is the same address
    on every machine, so the machine's name is too.
    """
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID"):
        master = env.get("MASTER_ADDR")
        if master in ("127.0.0.1", "localhost", "::1"):
            master = f"{socket.gethostname()}/{master}"
        return (
            f"torchrun {env['TORCHELASTIC_RUN_ID']} {master}:"
            f"{env.get('MASTER_PORT')} restart {env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        )
    if env.get("SLURM_STEP_ID") is not None:
        return (
            f"srun {env.get('SLURM_JOB_ID')}.{env['SLURM_STEP_ID']} "
            f"restart {env.get('SLURM_RESTART_COUNT', '0')}"
        )
    return None


def rank0_timeout() -> float:
    """How long a process started beside rank 0 waits for it (:data:`RANK0_WAIT_ENV`)."""
    value = os.environ.get(RANK0_WAIT_ENV)
    if value is None:
        return RANK0_WAIT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"{RANK0_WAIT_ENV}={value!r}: give a number of seconds > 0")
    return seconds


def _rank0_late(what: str, timeout: float) -> ConfigError:
    return ConfigError(
        f"{what} within {timeout:.0f} s: did rank 0 fail? If it is still reading the "
        f"data, wait longer: {RANK0_WAIT_ENV}=<seconds> in every process's environment"
    )


def _wait_for_lock(
    path: Path, refused: Path, launch: str | None, timeout: float | None = None
) -> None:
    """A process that srun or torchrun started beside rank 0 waits until rank 0 holds
    the job lock for their launch (``path`` names it), or refused it (``refused``);
    ``timeout``: :func:`rank0_timeout` by default."""
    timeout = rank0_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        lock, refusal = _read_json(path), _read_json(refused)
        if lock.get("launch") == launch and lock.get("checked", True):
            return
        # a refusal of this launch while its holder still holds its lock (this job's, or
        # another job's over the same sub-nets): torchrun's launch id repeats from run to
        # run (static rendezvous), so a refusal left by an earlier launch names a holder
        # that has since let go
        held = _read_json(Path(refusal.get("holder_lock", path))) if refusal else {}
        if refusal.get("launch") == launch and held and _same_holder(held, refusal["holder"]):
            raise ConfigError(refusal["error"])
        if time.monotonic() > deadline:
            raise _rank0_late(f"rank 0 did not take the job lock {path}", timeout)
        time.sleep(0.2)


def _same_holder(lock: dict[str, Any], holder: dict[str, Any]) -> bool:
    """The lock is still the holder's: the same record, but for its ``checked`` mark
    (set once its own check is done, after another job may have read it)."""
    return {**lock, "checked": None} == {**holder, "checked": None}


def _age(path: Path) -> float:
    """Seconds since ``path`` was last modified (0 if it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _bytes_under(folder: Path) -> int:
    """The size of the files under ``folder``. Other jobs of the run write it meanwhile:
    a file (a temporary one most often, replaced into place) that is gone by the time
    it is looked at counts for nothing, where a plain ``rglob`` and ``stat`` raised
    FileNotFoundError at this job's start."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


STATE_ADVICE = "restore the file from a copy of the run, or start a new run"
"""What :func:`read_state` advises for a file it cannot read."""


def read_state(
    path: Path,
    shape: type = dict,
    keys: tuple[str, ...] = (),
    advice: str = STATE_ADVICE,
    items: type | None = None,
) -> Any:
    """A JSON file the run keeps (``split.json``, ``stage1.json``, a sub-net's record,
    ...), which must hold a ``shape`` (with ``keys``; a list: of ``items`` when given):
    one that is not JSON, or JSON of another shape, is named as a damaged run folder,
    one line, where a traceback ended in ``JSONDecodeError``, ``RecursionError`` (deep
    nesting), ``TypeError``, ``KeyError`` or ``AttributeError`` (a lock file being
    written is :func:`_read_json`'s).

    Raises:
        ConfigError: the file, and why it cannot be read (or that it is missing).
    """
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:  # a raw "[Errno 2]" said nothing of the run folder
        raise ConfigError(f"{path} is missing: the run folder is damaged; {advice}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError too; [[[... nested deep
        why = f"{type(e).__name__}: {e}"
    else:
        missing = [key for key in keys if key not in state] if isinstance(state, shape) else []
        listed = isinstance(state, list) and items is not None
        others = [item for item in state if not isinstance(item, items)] if listed else []
        if not isinstance(state, shape):
            kind = "an object" if shape is dict else "a list"
            why = f"it holds {json.dumps(state)[:40]}, not {kind}"
        elif missing:
            why = f"it has no {', '.join(map(repr, missing))}"
        elif others:  # a name null or 5: an AttributeError or TypeError at the export
            kind = "text" if items is str else f"a {items.__name__}"
            why = f"its entry {json.dumps(others[0])[:40]} is not {kind}"
        else:
            return state
    raise ConfigError(f"{path} cannot be read ({why}): the run folder is damaged; {advice}")


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON file's content; empty if it is absent or being written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}


def _wait_for(path: Path, timeout: float | None = None, launch: str | None = None) -> None:
    """Wait until rank 0 has written ``path`` (processes started together); with
    ``launch``, a JSON ``path`` naming that launch. ``timeout``: :func:`rank0_timeout`
    by default."""
    timeout = rank0_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while not path.exists() or (launch is not None and _read_json(path).get("launch") != launch):
        if time.monotonic() > deadline:
            raise _rank0_late(f"{path} did not appear", timeout)
        time.sleep(0.2)


def job_name(subnets: list[int]) -> str:
    """A stage-2 job's name, from its sub-nets: [0, 1, 2, 5] -> ``subnets-0-2_5`` (a
    hashed name when that would be long; the job folder's ``subnets.json`` lists them)."""
    ids, runs = sorted(subnets), []
    for k in ids:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    name = "subnets-" + "_".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    if len(name) <= 48:
        return name
    # many scattered sub-nets (large K): a short, stable name; subnets.json lists them
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:10]
    return f"subnets-{len(ids)}-from-{ids[0]}-{digest}"


def _under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def checkpoint_bytes_needed(cfg: Config, backbone_params: int, num_classes: int) -> int:
    """Disk the run's checkpoints need: a generous estimate, checked before any work.

    Each stage (each stage-2 job) keeps its last checkpoint, and an atomic write briefly
    holds one more copy; a checkpoint holds fp32 weights plus optimizer
    state (SGD momentum: one more copy, AdamW: two). Each finished sub-net's weights
    are saved once more on their own, and the clustering saves the class means.
    """
    state_copies = 3 if "adamw" in (cfg.stage1.optim.name, cfg.stage2.optim.name) else 2
    heads = num_classes * cfg.model.embedding_dim
    stage1 = backbone_params + heads
    # clustering.overlap: its identities have a row in a second sub-net's head too
    heads2 = round(heads * (1 + cfg.clustering.overlap))
    stage2 = cfg.clustering.num_clusters * backbone_params + heads2 if cfg.two_stage else 0
    # clusters.pt: the class means (fp32) and two int64 maps per identity
    clusters = 4 * heads + 16 * num_classes if cfg.two_stage else 0
    return 2 * 4 * state_copies * (stage1 + stage2) + 4 * stage2 + clusters


def _check_output_dir(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that cannot hold run folders, before the data scan
    (minutes over a large set) that used to come first: a file, or a path through one,
    or a folder this user cannot write.

    Raises:
        ConfigError: naming output_dir and what is wrong with it.
    """
    here = output_dir.absolute()
    while not here.exists() and here != here.parent:  # the nearest part that exists
        here = here.parent
    if not here.is_dir():
        where = "is a file" if here == output_dir.absolute() else f"lies under a file ({here})"
        raise ConfigError(f"output_dir={output_dir} {where}: name a folder for the runs")
    try:  # a file made, not os.access: that says yes where root's writes are squashed (NFS)
        check_can_write(here)
    except OSError as e:
        raise ConfigError(
            f"output_dir={output_dir}: {here} cannot be written (read-only, or no "
            f"permission: making a file there failed, {e.strerror or e})"
        ) from None


def _folder_of(resume: Path) -> Path:
    """The run folder of a ``resume=`` path: itself, <run>/stage1/checkpoints/x.ckpt or
    <run>/stage2/jobs/<job>/checkpoints/x.ckpt.

    Raises:
        ConfigError: a checkpoint file outside that layout (the run would be written
            wherever its grandparent folder happens to be).
    """
    if resume.is_dir():
        return resume
    path = resume.resolve()
    names = [p.name for p in path.parents]
    if names[:4] == ["checkpoints", names[1], "jobs", "stage2"] and len(names) > 4:
        return path.parents[4]
    if names[:2] in (["checkpoints", "stage1"], ["checkpoints", "stage2"]) and len(names) > 2:
        return path.parents[2]
    raise ConfigError(
        f"resume={resume}: a checkpoint resumes inside its run folder, as "
        "<run>/stage1/checkpoints/<file>.ckpt or <run>/stage2/jobs/<job>/checkpoints/"
        "<file>.ckpt; put it back there (or copy it to <new run>/stage1/checkpoints/), or "
        "pass the run folder"
    )


def _refuse_contradictions(
    saved: Config,
    cfg: Config,
    resume: str,
    keys: tuple[str, ...] = RESUME_FIXED_KEYS,
    evaluation: bool = False,
) -> None:
    """Refuse a resume (or an ``evaluation``, with ``keys=EVALUATION_FIXED_KEYS``) whose
    overrides change what the run's checkpoints were trained on.

    Epochs, logger, trainer settings and the like may change; the identities, the
    split, the backbone and clusters may not.
    """
    old_values, new_values = saved.to_dict(), cfg.to_dict()
    problems = []
    for key in keys:
        old, new = _select(old_values, key), _select(new_values, key)
        if key == "data.root":  # the same data, written differently, is no change
            same = _data_set(saved.data.resolved_root()) == _data_set(cfg.data.resolved_root())
            if not same:
                problems.append(f"{key}: the run has {old!r}, the command line {new!r}")
            continue
        # speed options change no weight; a resume may also name the starting weights
        # anew while stage 1 has trained nothing (_check_starting_weights); an evaluation
        # refuses them as training's
        free = SPEED_OPTIONS if evaluation else FREE_MODEL_KEYS
        ignored = tuple(f"model.{k}" for k in free) if key == "model" else ()
        if key == "head":  # as it acts: ArcFace's own margin written out is no change
            old, new = _settled_pair(saved, cfg, key)
        problems += [  # None: unset, or a key of model.kwargs/head.kwargs not given
            f"{name}: the run has {'it unset' if was is None else repr(was)}, the command "
            f"line {'unsets it' if now is None else repr(now)}"
            for name, was, now in _differences(key, old, new)
            if name not in ignored
        ]
    if problems:
        resuming = not evaluation
        raise ConfigError(
            f"{'resume=' if resuming else ''}{resume}: the overrides contradict the run's "
            "checkpoints:\n  - "
            + "\n  - ".join(problems)
            + (
                "\nStart a new run for these settings (epochs, logger and most trainer.* may "
                "change; a stage's optimizer until it has trained; the head between the "
                "stages)."
                if resuming
                else "\nAn evaluation tests the run as it trained (its method, clusters "
                "and networks) on its own held-out split; leave these unset."
            )
        )


def _settled(cfg: Config, values: dict[str, Any], key: str) -> Any:
    """A :data:`SETTLED_KEYS` value as it acts: an unset value is what it means (the
    head's own margin, no accumulation, no clipping), so writing it out changes nothing."""
    value = _select(values, key)
    if key == "head":
        from facecluster.models.components.heads import HEADS, default_margin

        # a name no head is registered under (a typo, a module imports does not name)
        # keeps its unset margin: the resume is refused as changing the head, naming it
        if value["m"] is None and cfg.head.name in HEADS:
            return {**value, "m": default_margin(cfg.head.name)}
        return dict(value)
    if key == "trainer.accumulate_grad_batches":
        return 1 if value is None else value
    if key == "trainer.gradient_clip_val":
        return None if value in (None, 0, 0.0) else value
    if key == "trainer.gradient_clip_algorithm":
        return "norm" if value is None else value
    if key == "trainer.limit_train_batches":  # a fraction; 1.0 is every batch
        return None if value == 1.0 and isinstance(value, float) else value
    if key == "trainer.max_steps":
        return None if value == -1 else value
    return value


def _settled_pair(saved: Config, cfg: Config, key: str) -> tuple[Any, Any]:
    """A :data:`SETTLED_KEYS` value as it acts in the run's config and in the command's.
    A head no module registered (a typo of its name) has a margin unknown here: its
    unset ``head.m`` is not shown as a change beside the name's."""
    old, new = _settled(saved, saved.to_dict(), key), _settled(cfg, cfg.to_dict(), key)
    if key == "head" and new["m"] is None and new["name"] != old["name"]:
        new = {**new, "m": old["m"]}
    return old, new


def _differences(key: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """Each key under ``key`` whose value differs, named in full (``model.embedding_dim``,
    not the whole ``model`` section), with the two values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            found
            for k in sorted(old.keys() | new.keys())
            for found in _differences(f"{key}.{k}", old.get(k), new.get(k))
        ]
    return [] if old == new else [(key, old, new)]


def _sets_any(key: str, keys: tuple[str, ...]) -> bool:
    """Whether an override of ``key`` can set one of ``keys``: itself, a section above it
    (``data={...}``) or a key inside it (``model.embedding_dim`` for ``model``)."""
    return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in keys)


def _is_or_inside(key: str, keys: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``keys`` or a key inside one (``stage1.optim.lr`` for
    ``stage1``); unlike :func:`_sets_any`, not a section above one."""
    key = key.strip()
    return any(key == k or key.startswith(k + ".") for k in keys)


def _select(values: dict[str, Any], dotted: str) -> Any:
    """``values["a"]["b"]`` for ``a.b``; None where a key is absent (``trainer.*``)."""
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def run_folder(run_dir: str | Path) -> RunFolder:
    """The folder ``run=`` names, ``~`` expanded (as ``resume=`` and ``data.root`` are).

    Raises:
        ConfigError: the path does not exist, naming it as given and where it was looked for.
    """
    if missing := missing_path(run_dir, prefix="run="):
        raise ConfigError(missing)
    return RunFolder(Path(run_dir).expanduser().resolve())
