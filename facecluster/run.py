"""The run folder: the one place that knows its layout, its file names and its rules.

::

    <output_dir>/<run_name>/
      config.yaml  run.json           resolved config; W&B run id and creation time
      class_names.json                identity names, index = global label
      unseen_identities.json          open set: identities never trained on ({val, test})
      stage1/checkpoints/             best-epochNNN.ckpt (val/acc) and last.ckpt of stage 1
      stage1.json                     stage-1 steps, epochs and test accuracy
      clusters.pt                     the ClusterAssignment (written once, atomically)
      stage2/checkpoints/             best-epochNNN.ckpt and last.ckpt of stage 2
      results.json  results.md        held-out accuracies of training
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

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from facecluster.clustering import ClusterAssignment
from facecluster.config import Config, ConfigError, config_from_dict, load_config
from facecluster.io import load_plain
from facecluster.models.base import CHECKPOINT_KEY

RUN_DIR_ENV = "FACECLUSTER_RUN_DIR"

CONFIG = "config.yaml"
META = "run.json"
CLASS_NAMES = "class_names.json"
UNSEEN_IDENTITIES = "unseen_identities.json"
CLUSTERS = "clusters.pt"
RESULTS = "results.json"
RESULTS_TABLE = "results.md"
LAST = "last"
"""Checkpoint file stem of the final finished epoch of a stage (``last.ckpt``)."""
BEST = "best-epoch{epoch:03d}"
"""Checkpoint file name pattern of the best val/acc epoch of a stage."""
EVAL_FILES = {
    "table": "results.md",
    "csv": "results.csv",
    "json": "results.json",
    "top_m": "top_m.png",
    "alpha": "alpha.png",
    "class_means": "class_means_pca.png",
}
"""What evaluate.py writes into <run>/eval/."""

# What the checkpoints were trained on: changing any of these on resume would load
# weights into a model of another shape, or a head over other identities.
RESUME_FIXED_KEYS = (
    "method",
    "seed",  # decides the split and, with data.unseen_fraction, which identities train
    "data.root",
    "data.max_classes",
    "data.min_images_per_class",
    "data.unseen_fraction",
    "model",
    "clustering.num_clusters",
    "clustering.method",
)


SPEED_OPTIONS = {"compile": False, "channels_last": False}
"""``model`` keys a resume may change: how the network runs, not what it is."""


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
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume: {e}") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise ConfigError(
            f"resume={path}: not a facecluster checkpoint (no '{CHECKPOINT_KEY}' entry); "
            "pass a run folder or a .ckpt written by facecluster"
        )
    return ckpt[CHECKPOINT_KEY]


@dataclass(frozen=True)
class RunFolder:
    """One run's folder. ``RunFolder(path)`` only names it; nothing is read or written."""

    path: Path

    # ------------------------------------------------------------------ layout

    def checkpoint_dir(self, stage: int) -> Path:
        return self.path / f"stage{stage}" / "checkpoints"

    def stage_dir(self, stage: int) -> Path:
        return self.path / f"stage{stage}"

    def last_checkpoint(self, stage: int) -> Path:
        return self.checkpoint_dir(stage) / f"{LAST}.ckpt"

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
            return cls(_folder_of(Path(cfg.resume))).resolved()
        name = cfg.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method}"
        run = cls(Path(cfg.output_dir).expanduser() / name).resolved()
        if (run.path / CONFIG).exists():
            raise ConfigError(
                f"run folder {run.path} already exists; pass resume={run.path} to continue it"
            )
        return run

    def resolved(self) -> RunFolder:
        return RunFolder(self.path.resolve())

    def create(self, cfg: Config) -> str:
        """Create (or reopen) the folder and write the config; returns the W&B run id.

        Sets ``FACECLUSTER_RUN_DIR`` so the DDP ranks Lightning starts find it.
        """
        os.environ[RUN_DIR_ENV] = str(self.path)
        meta = self.path / META
        if is_global_zero() and not meta.exists():
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise ConfigError(
                    f"output_dir: cannot write the run folder {self.path} ({e})"
                ) from None
            run_id = uuid.uuid4().hex[:12]
            self._write_json(META, {"run_id": run_id, "created": datetime.now().isoformat()})
        if is_global_zero():
            (self.path / CONFIG).write_text(cfg.to_yaml())
        return self.run_id

    @property
    def run_id(self) -> str:
        return json.loads((self.path / META).read_text())["run_id"]

    def check_free_space(self, cfg: Config, backbone_params: int, num_classes: int) -> None:
        """Fail at start, naming output_dir, when the disk cannot hold the checkpoints."""
        needed = checkpoint_bytes_needed(cfg, backbone_params, num_classes)
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise ConfigError(
                f"output_dir: {self.path} has {free / 2**20:.0f} MiB free, the run's checkpoints "
                f"need about {needed / 2**20:.0f} MiB; free some space or choose another "
                "output_dir"
            )

    # ---------------------------------------------------------------- configs

    def config(self, overrides: list[str] | tuple = ()) -> Config:
        """The run's saved config with ``key=value`` overrides (e.g. a moved data.root)."""
        if not (self.path / CONFIG).is_file():
            raise ConfigError(f"{self.path}: not a facecluster run folder (no {CONFIG})")
        return load_config(self.path / CONFIG, [*overrides, "resume=null"])

    def finished_config(self, overrides: list[str] | tuple = ()) -> Config:
        """The config of a finished run (evaluation, inference); refuses unfinished runs."""
        cfg = self.config(overrides)
        if not self.finished:
            raise ConfigError(
                f"run={self.path}: the run is not finished (no {RESULTS}); "
                f"finish it with `python train.py resume={self.path}`"
            )
        return cfg

    @classmethod
    def config_for_resume(cls, resume: str, overrides: list[str] | tuple = ()) -> Config:
        """The saved config of the run to resume, with command-line overrides applied.

        Refuses a path that is neither a run folder nor a facecluster checkpoint, and
        overrides that contradict what the checkpoints were trained on.
        """
        path = Path(resume).expanduser()
        if not path.exists():
            raise ConfigError(f"resume={resume}: no such run folder or checkpoint")
        run = cls(_folder_of(path))
        if path.is_file():
            meta = read_checkpoint_meta(path)
            saved = config_from_dict(meta["config"], f"resume={path}")
        elif (run.path / CONFIG).is_file():
            saved = run.config()
        else:
            raise ConfigError(
                f"resume={resume}: not a facecluster run folder (no {CONFIG}); "
                "pass the folder printed at the start of the run, or a checkpoint"
            )
        overrides = [o for o in overrides if not o.startswith("resume=")]
        where = [f"resume={path}", f"output_dir={run.path.parent}", f"run_name={run.path.name}"]
        cfg = saved.with_overrides([*overrides, *where])
        _refuse_contradictions(saved, cfg, resume)
        return cfg

    def resume_points(self, resume: str | None) -> tuple[Path | None, Path | None]:
        """Checkpoints to resume stage 1 and stage 2 from (None: start that stage fresh)."""
        if not resume:
            return None, None
        path = Path(resume)
        if path.is_file():
            stage = read_checkpoint_meta(path)["stage"]
            return (path, None) if stage == 1 else (None, path)
        if self.last_checkpoint(2).is_file():
            return None, self.last_checkpoint(2)
        stage1 = self.last_checkpoint(1)
        return (stage1 if stage1.is_file() else None), None

    # ------------------------------------------------------------ small files

    def _write_json(self, name: str, value: Any) -> None:
        if is_global_zero():
            (self.path / name).write_text(json.dumps(value, indent=2))

    def save_class_names(self, names: list[str]) -> None:
        self._write_json(CLASS_NAMES, names)

    def class_names(self) -> list[str]:
        return json.loads((self.path / CLASS_NAMES).read_text())

    def check_identities(self, names: list[str]) -> None:
        """The data's identities must be the run's, label for label (evaluation, export).

        Raises:
            ConfigError: naming the settings that decide them.
        """
        trained = self.class_names()
        if names != trained:
            order = " (the same count, other names or order)" if len(names) == len(trained) else ""
            raise ConfigError(
                f"{self.path}: the data gives {len(names)} identities, the run trained on "
                f"{len(trained)}{order}; "
                "data.root, data.max_classes, data.min_images_per_class, "
                "data.unseen_fraction and seed must be the run's own"
            )

    def save_unseen_identities(self, names: dict[str, list[str]]) -> None:
        """Open-set runs: the identities held out of training, per split."""
        if any(names.values()):
            self._write_json(UNSEEN_IDENTITIES, names)

    def save_stage_summary(self, stage: int, summary: dict[str, Any]) -> None:
        self._write_json(f"stage{stage}.json", summary)

    def stage_summary(self, stage: int) -> dict[str, Any]:
        return json.loads((self.path / f"stage{stage}.json").read_text())

    def save_training_report(self, results: dict[str, Any], table: str) -> None:
        self._write_json(RESULTS, results)
        if is_global_zero():
            (self.path / RESULTS_TABLE).write_text(table + "\n")

    def assignment(self) -> ClusterAssignment:
        return ClusterAssignment.load(self.clusters_path)

    # ----------------------------------------------------------------- weights
    # The stage systems' attribute names are the checkpoints' key prefixes:
    # BackboneSystem.backbone / .head, SubnetSystem.subnets[k] / .heads[k].

    def _final_state(self, stage: int, map_location: str | torch.device) -> dict[str, Tensor]:
        path = self.last_checkpoint(stage)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is the run finished?")
        return load_plain(path, map_location, f"stage-{stage} checkpoint")["state_dict"]

    def stage1_weights(self, map_location: str | torch.device = "cpu") -> StageWeights:
        """The stage-1 backbone and head of the final finished epoch."""
        state = self._final_state(1, map_location)
        return StageWeights(_under(state, "backbone."), state["head.weight"])

    def subnet_weights(self, map_location: str | torch.device = "cpu") -> list[StageWeights]:
        """Each sub-net's backbone and head rows (index = cluster), final epoch of stage 2."""
        state = self._final_state(2, map_location)
        count = len({key.split(".")[1] for key in state if key.startswith("subnets.")})
        return [
            StageWeights(_under(state, f"subnets.{k}."), state[f"heads.{k}.weight"])
            for k in range(count)
        ]


@dataclass(frozen=True)
class StageWeights:
    """A trained backbone's state dict and its margin head's rows."""

    backbone: dict[str, Tensor]
    head: Tensor


def _under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def checkpoint_bytes_needed(cfg: Config, backbone_params: int, num_classes: int) -> int:
    """Disk the run's checkpoints need: a generous estimate, checked before any work.

    Each stage keeps a best and a last checkpoint, and an atomic write briefly holds
    one more copy; a checkpoint holds fp32 weights plus optimizer state (SGD momentum:
    one more copy, AdamW: two).
    """
    state_copies = 3 if "adamw" in (cfg.stage1.optim.name, cfg.stage2.optim.name) else 2
    heads = num_classes * cfg.model.embedding_dim
    stage1 = backbone_params + heads
    stage2 = cfg.clustering.num_clusters * backbone_params + heads if cfg.two_stage else 0
    return 3 * 4 * state_copies * (stage1 + stage2)


def _folder_of(resume: Path) -> Path:
    """The run folder of a ``resume=`` path: itself, or <run>/stageN/checkpoints/x.ckpt."""
    return resume if resume.is_dir() else resume.resolve().parents[2]


def _refuse_contradictions(saved: Config, cfg: Config, resume: str) -> None:
    """Refuse a resume whose overrides change what the run's checkpoints were trained on.

    Epochs, logger, trainer settings and the like may change; the identities,
    backbone and clusters may not.
    """
    old_values, new_values = saved.to_dict(), cfg.to_dict()
    problems = []
    for key in RESUME_FIXED_KEYS:
        old, new = _select(old_values, key), _select(new_values, key)
        if key == "data.root":  # the same folder, written differently, is no change
            same = saved.data.resolved_root().resolve() == cfg.data.resolved_root().resolve()
        elif key == "model":  # speed options change no weight
            same = {**old, **SPEED_OPTIONS} == {**new, **SPEED_OPTIONS}
        else:
            same = old == new
        if not same:
            problems.append(f"{key}: the run has {old!r}, the command line {new!r}")
    if problems:
        raise ConfigError(
            f"resume={resume}: the overrides contradict the run's checkpoints:\n  - "
            + "\n  - ".join(problems)
            + "\nStart a new run for these settings (epochs, logger and trainer.* may change)."
        )


def _select(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values
