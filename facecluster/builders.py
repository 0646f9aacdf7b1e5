"""What a config describes, built: the datamodule and each stage's Lightning Trainer.

The Lightning plumbing of a run lives here so that ``pipeline.py`` reads like the
method. A stage's Trainer gets the user's ``trainer.*`` settings plus what every
facecluster stage needs: epoch-end checkpoints (``last.ckpt``),
per-epoch reseeding for exact resume, the divergence stop, the bad-image report and
atomic checkpoint writes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_info

from facecluster.callbacks import (
    BadImageReport,
    DivergenceCallback,
    EpochSeedCallback,
    StderrProgressBar,
    StopTogether,
    VerificationCallback,
)
from facecluster.checkpoint_io import AtomicCheckpointIO
from facecluster.config import (
    COMMAND,
    NAME_RULE,
    SAME_NAME_RULE,
    Config,
    ConfigError,
    check_data_root,
    name_collisions,
    naming,
    resolve_data_root,
    shown_names,
    unreadable_names,
)
from facecluster.data import BadImageError, FaceDataModule
from facecluster.data.folder import IDENTITY_NAMES
from facecluster.data.recordio import rec_paths
from facecluster.data.verification import (
    VerificationPairs,
    load_pairs,
    named_sets,
    size_warning,
    trained_pairs_warning,
)
from facecluster.io import disk_full, load_plain, non_finite_keys, shown_list
from facecluster.models.components import (
    TimmBackbone,
    create_backbone,
    create_head,
    load_backbone,
    shareable_stages,
)
from facecluster.models.precision import skip_groups_apart
from facecluster.run import LAST, RunFolder, is_global_zero, launched_processes

# Lightning's notices that nobody using facecluster can act on, printed at every Trainer
# (twice a run): an advertisement for its cloud logger, that fit stopped at max_epochs
# or max_steps (the end of a stage: written onto the end of the still open epoch bar),
# torch's deprecation of a pytree call inside Lightning's own code, and, at every
# resume, that the checkpoint folder the run continues from is not empty (a new run
# never starts in an existing run folder)
_NOTICES = (
    "\N{ELECTRIC LIGHT BULB} Tip:",
    "`Trainer.fit` stopped: `max_",
    "TPU available: False",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith(_NOTICES)
)
warnings.filterwarnings(
    "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning
)
warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty", UserWarning)
# said in facecluster's settings instead (hardware_hints): Lightning's name Trainer and
# DataLoader arguments that no facecluster user sets
warnings.filterwarnings("ignore", r"GPU available but not used")
warnings.filterwarnings("ignore", r"The '\w+_dataloader' does not have many workers")
# the verification sets' accuracies are measured and logged by rank 0 alone (a sync_dist
# would wait for ranks that log nothing): Lightning's advice, at every epoch under DDP
warnings.filterwarnings(
    "ignore", r"It is recommended to use `self.log\('val/[^']+_acc', \.\.\., sync_dist=True\)`"
)
# Lightning's advice that does not apply here (a warnings review): to prepend `srun` on
# any machine that has it (a login node, a local run; launcher=slurm starts its own
# srun), printed at each stage; that modules are in eval mode as stage 2 starts (the
# frozen shared trunk of model.shared_layers, on purpose); and, at a resume of a run
# folder that was moved, that its checkpoint folder changed (it keeps last.ckpt alone,
# with no best model to reload)
warnings.filterwarnings("ignore", r"The `srun` command is available on your system but is not used")
warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", r"The dirpath has changed from .* won't be reloaded", UserWarning)


def build_datamodule(cfg: Config, eval_batch_size: int | None = None) -> FaceDataModule:
    """The scanned and split datamodule of ``cfg.data``; bad data fails here, named."""
    args = {
        **cfg.data.datamodule_args(cfg.seed),
        "subnet_epoch_size": cfg.stage2.epoch_size,
        "subnet_negatives": cfg.stage2.negatives,
        "cache": str(cfg.cache_dir()),
    }
    if eval_batch_size is not None:
        args["eval_batch_size"] = eval_batch_size
    check_data_root(cfg.data.root, run=True)  # a new run's was checked at load
    with naming("data"):
        dm = FaceDataModule(**args)
        dm.setup()
    return dm


def verification_sets(cfg: Config) -> dict[str, VerificationPairs]:
    """``data.verification``, read: set name -> pairs."""
    with naming("data.verification"):
        paths = named_sets(cfg.data.verification_paths())
        return {name: load_pairs(path) for name, path in paths.items()}


def check_verification_sets(cfg: Config, stage1_done: bool = False) -> list[VerificationPairs]:
    """Before any training, when this command uses ``data.verification`` (stage 1
    measures it; the evaluation after training tables it): read every set whole, the
    pickle and every image decoded (:func:`~facecluster.data.verification.load_pairs`),
    and drop it; stage 1 reads the sets again when it first measures them. A file cut
    short, or an image that cannot be decoded, stops the command here, named (a config
    error), not after the first epoch. Images that are not ``data.image_size`` square
    are resized (squashed, if not square) by verification: a warning says so, in global
    rank 0. Under a second for lfw.bin's 12,000 images here (0.69-0.72 s).
    ``stage1_done``: the run's stage 1 is finished (a resume), so only an evaluation
    after training reads them.

    Returns:
        The sets read, their images dropped, for :func:`warn_trained_pairs` once the
        data is scanned (none when this command uses none).

    Raises:
        ConfigError: ``data.verification: <file>: ...``, the file and what is wrong.
    """
    trains = cfg.stage in ("all", "1") and not stage1_done  # stage 1 measures them
    uses = trains or (cfg.assembles and cfg.eval.after_training)
    if not cfg.data.verification or not uses:
        return []
    read = []
    with naming("data.verification"):
        for path in named_sets(cfg.data.verification_paths()).values():
            pairs = load_pairs(path)
            warning = size_warning(pairs, cfg.data.image_size)
            if warning and is_global_zero():
                logging.getLogger(__name__).warning(f"data.verification: {warning}")
            read.append(dataclasses.replace(pairs, images=[]))
    return read


def warn_trained_pairs(sets: Iterable[VerificationPairs], trained: list[str]) -> None:
    """Warn, in global rank 0, for each set with pairs of identities the run trains on
    (``trained``; :func:`~facecluster.data.verification.trained_pairs_warning`)."""
    for pairs in sets:
        if (warning := trained_pairs_warning(pairs, trained)) and is_global_zero():
            logging.getLogger(__name__).warning(f"data.verification: {warning}")


def check_head(cfg: Config) -> None:
    """Build the margin head once on 2 identities before any work: an unknown
    ``head.name`` (a head of the user's own whose module ``imports`` does not name),
    a ``head.m`` out of that head's own bounds or a ``head.kwargs`` key its class does
    not take is refused here, not when stage 1 builds it after the run folder was made."""
    m = cfg.head.m
    named = [f"head.m={m}"] if m is not None else []
    named += [f"head.kwargs.{k}={v!r}" for k, v in cfg.head.kwargs.items() if v is not None]
    given = f"head.name={cfg.head.name!r}" + (f" with {', '.join(named)}" if named else "")
    with naming(given, TypeError):
        create_head(num_classes=2, embedding_dim=cfg.model.embedding_dim, **cfg.head.head_args())


def backbone_parameters(cfg: Config) -> int:
    """Build the backbone once before any work (a bad name fails with close names) and
    run it on a batch of 2 zero images: a backbone that cannot take ``data.image_size``
    (a timm ViT built for 224), or does not give one ``model.embedding_dim`` embedding
    per image, is refused here, not in training after the run folder was made. The pass
    costs about 0.3 s for iresnet50 at 112 on one CPU thread.

    Returns:
        Its parameter count (for the disk-space check).
    """
    # a keyword the backbone does not take was named as the backbone alone (a walkthrough)
    given = ", ".join(f"model.kwargs.{k}={v!r}" for k, v in cfg.model.kwargs.items())
    # the settings it is built with named too: a size it refuses said "image_size", not
    # which key sets it (an mbf review)
    with naming(
        f"model.backbone={cfg.model.backbone!r} at data.image_size={cfg.data.image_size}"
        + (f" with {given}" if given else ""),
        KeyError,
        TypeError,
    ):
        backbone = create_backbone(**cfg.model.backbone_args(cfg.data.image_size))
    size = cfg.data.image_size
    try:
        with torch.no_grad():
            out = backbone.eval()(torch.zeros(2, 3, size, size))
    except (AssertionError, RuntimeError, ValueError, TypeError) as e:
        hint = (
            f"; a timm model with a fixed input size takes model.kwargs.img_size={size}"
            if isinstance(backbone, TimmBackbone) and "img_size" not in cfg.model.kwargs
            else ""
        )
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise ConfigError(
            f"model.backbone={cfg.model.backbone!r} cannot take data.image_size={size} "
            f"images ({reason}){hint}"
        ) from None
    # a backbone of the user's own (register_backbone) that gives [B, d', 1, 1] or
    # another width failed in the first training step, after the run folder was made
    dim = cfg.model.embedding_dim
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, dim):
        raise ConfigError(
            f"model.backbone={cfg.model.backbone!r} gives {shape} for a batch of 2 "
            f"{size}x{size} images; facecluster needs (2, {dim}): one "
            f"model.embedding_dim={dim} embedding per image (flatten or project its output)"
        )
    available = shareable_stages(backbone)
    if cfg.model.shared_layers > available:
        raise ConfigError(
            f"model.shared_layers={cfg.model.shared_layers}: backbone {cfg.model.backbone!r} "
            + (
                f"has {available} stages to share"
                if available
                else "cannot share stages (IResNets, MobileFaceNets and tiny can); "
                "set model.shared_layers=0"
            )
        )
    return sum(p.numel() for p in backbone.parameters())


def starting_weights(cfg: Config) -> dict[str, torch.Tensor] | None:
    """``model.weights``: the backbone weights stage 1 starts from (:func:`backbone_weights`,
    into the backbone the config builds), so that a file of another architecture or size
    is refused before any work; None when unset.

    Raises:
        ConfigError: naming the file: missing, unreadable, holding no backbone weights, or
            weights that do not fit (the first mismatch).
    """
    if cfg.model.weights is None:
        return None
    given = f"model.weights={cfg.model.weights!r}"
    moved = "; moved? name it anew: model.weights=<new place>" if cfg.resume else ""
    try:
        return backbone_weights(
            cfg.model.weights, cfg.model.backbone_args(cfg.data.image_size), given, moved
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def backbone_weights(
    file: str | Path, args: dict[str, Any], given: str, if_missing: str = ""
) -> dict[str, torch.Tensor]:
    """A backbone's weights from ``file``, read (memory-mapped) and loaded once into the
    backbone that ``args`` builds (``create_backbone``'s), then copied into memory.

    Takes a state dict of tensors (``torch.save(backbone.state_dict())``; arcface_torch's
    ``backbone.pth`` or ``model.pt`` has the keys of facecluster's IResNets and
    MobileFaceNets, a
    ``module.`` prefix is dropped; its ``checkpoint_gpu_<rank>.pt``, its
    ``state_dict_backbone``), a facecluster checkpoint of stage 1 or of a single model (its
    ``backbone.*`` weights) or a sub-net's file (``stage2/subnets/subnet<k>.pt``).
    ``given``: how the user named the file, first in each message; ``if_missing``: added
    to the message of a file that does not exist.

    Raises:
        ValueError: naming the file: missing, unreadable, holding no backbone weights, or
            weights that do not fit (the first mismatch).
    """
    path = Path(file).expanduser()
    if path.is_dir():  # a run folder, as resume= and run= take
        raise ValueError(
            f"{given} is a folder: give a file, such as a run's stage1/checkpoints/last.ckpt"
        )
    try:
        loaded = load_plain(path, what="backbone weights", mmap=True)
    except (OSError, ValueError) as e:  # missing, damaged, or not plain data
        hint = if_missing if isinstance(e, FileNotFoundError) else ""
        raise ValueError(f"{given}: {e}{hint}") from None
    state = loaded if isinstance(loaded, dict) else {}
    lightning = isinstance(state.get("state_dict"), dict)
    if lightning:  # a Lightning checkpoint: its backbone.* (below)
        state = state["state_dict"]
    elif isinstance(state.get("backbone"), dict):  # a sub-net's file: backbone and head
        state = state["backbone"]
    elif isinstance(state.get("state_dict_backbone"), dict):  # arcface_torch's checkpoint
        state = state["state_dict_backbone"]
    elif state and all(str(k).startswith("module.") for k in state):  # saved under DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    stage2 = lightning and any(str(k).startswith("subnets.") for k in state)
    # a stage module's weights, in its checkpoint or its own state_dict(): the backbone's
    if lightning or any(str(k).startswith("backbone.") for k in state):
        state = {
            k.removeprefix("backbone."): v
            for k, v in state.items()
            if isinstance(k, str) and k.startswith("backbone.")
        }
    named = all(isinstance(k, str) for k in state)  # {0: tensor}: a traceback in torch
    if not state or not named or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{given}: {path} holds no backbone weights"
            + (
                " (a stage-2 checkpoint holds sub-nets: give one sub-net's file, "
                "stage2/subnets/subnet<k>.pt)"
                if stage2
                else ""
            )
            + ": give a state dict of tensors (torch.save(backbone.state_dict())), a "
            "facecluster stage-1 checkpoint or a sub-net's file"
        )
    # another architecture, width, embedding size or image size: ValueError, named
    load_backbone(args, state, f"the weights of {given}")
    # integers where the network holds floats: load_state_dict cast int8 weights (97% of
    # them 0) and trained on, without a word; BatchNorm's step count is an integer
    other = [
        (name, v.dtype)
        for name, v in state.items()
        if not v.is_floating_point() and not name.endswith("num_batches_tracked")
    ]
    if other:
        raise ValueError(
            f"{given}: {path} holds {other[0][1]} values in {other[0][0]}, where the backbone "
            "holds floating-point weights: give weights saved as float32, float16 or bfloat16"
        )
    if bad := non_finite_keys(state):  # a diverged run's weights would train on as NaN
        value = state[bad[0]]
        if value.dtype == torch.float16 and not value.isnan().any():
            # a float32 file converted with .half(): BatchNorm's running variances pass
            # 65,504 after a few epochs (a review: 144,324), which "diverged?" misnamed
            raise ValueError(
                f"{given}: {path} holds inf in {bad[0]}, a float16 tensor: values past "
                "float16's range (65,504), such as a BatchNorm's running variance, became "
                "inf when the weights were converted to float16: give them as float32 or "
                "bfloat16"
            )
        raise ValueError(
            f"{given}: {path} holds non-finite values (NaN, Inf, or past float32's range) in "
            f"{bad[0]}: weights saved from a run that diverged? give weights saved before it did"
        )
    # in memory, not mapped from the file until the fit: a file replaced or cut short
    # during the data scan was a SIGBUS (the backbone's tensors only: not a checkpoint's head)
    return {name: value.clone() for name, value in state.items()}


def check_identity_count(cfg: Config, dm: FaceDataModule) -> None:
    """Refuse fewer than 2 training identities (a classifier over one identity learns
    nothing, and torchmetrics refused it with a traceback once the run folder was
    made) and, for a two-stage run, fewer than clusters (every cluster needs
    identities), naming what left them out (``data.max_classes``, the open set's
    ``data.unseen_fraction``) when it did."""
    clusters = cfg.clustering.num_clusters if cfg.two_stage else 1
    if dm.num_classes >= max(2, clusters):
        if cfg.two_stage:  # the evaluation's router, before training
            cfg.route.check_identities(dm.num_classes)
        return
    data = cfg.data
    held = len(dm.unseen_identities("val")) + len(dm.unseen_identities("test"))
    found = dm.num_classes + held  # with at least min_images_per_class, within max_classes
    why = f"{data.root} has {found} identities with at least {data.min_images_per_class} images"
    if data.max_classes is not None and found >= data.max_classes:
        why += f" (data.max_classes={data.max_classes} keeps no more)"
    if held:
        why += f", and data.unseen_fraction={data.unseen_fraction} holds {held} of them out"
    if dm.num_classes < 2:
        raise ConfigError(
            f"only {dm.num_classes} identit{'y' if dm.num_classes == 1 else 'ies'} would "
            f"train, and identification needs at least 2: {why}"
        )
    raise ConfigError(
        f"clustering.num_clusters={cfg.clustering.num_clusters} but only {dm.num_classes} "
        f"identities train: {why}"
    )


def check_identity_names(cfg: Config, dm: FaceDataModule) -> None:
    """Refuse a new run whose identities (held-out ones included) have a name that
    :func:`~facecluster.config.name_problem` refuses: a tab or line break splits the rows
    of the results and of identify's answers, and a blank name answers nothing to read;
    enrol and pack refuse such names, training took them for hours of work. A resumed
    run's names are its own (checked against the data, not refused)."""
    if cfg.resume:
        return
    names = [*dm.class_names, *dm.unseen_identities("val"), *dm.unseen_identities("test")]
    packed = rec_paths(resolve_data_root(cfg.data.root)) is not None
    if broken := unreadable_names(names):
        where = f"their lines of {IDENTITY_NAMES} beside the .rec" if packed else "their folders"
        raise ConfigError(
            f"data.root={cfg.data.root}: {len(broken)} identity name(s) cannot name an "
            f"identity ({shown_list([f'{name!r} {why}' for name, why in broken], 3)}); "
            f"{NAME_RULE}: rename {where}"
        )
    # two folders that every table and answer shows as one name (a copy from macOS
    # beside a Linux one; "Ann" and "Ann "): two identities a reader cannot tell apart,
    # where enrol refuses the second (a review)
    if alike := name_collisions(names):
        where = f"names of {IDENTITY_NAMES} beside the .rec" if packed else "folders"
        raise ConfigError(
            f"data.root={cfg.data.root}: {len(alike)} pair(s) of identity {where} name one "
            f"person twice ({shown_list([shown_names(pair) for pair in alike], 3)}: "
            f"{SAME_NAME_RULE}); merge or rename them"
        )


def module_args(cfg: Config, stage: int) -> dict[str, Any]:
    """Keyword arguments shared by both stage systems (plain dicts, saved in checkpoints)."""
    config = cfg.run_settings().to_dict()
    return {
        "backbone": cfg.model.backbone_args(cfg.data.image_size),
        "head": cfg.head.head_args(),
        "optim": config[f"stage{stage}"]["optim"],
        "config": config,
    }


def _checkpoints(cfg: Config, run: RunFolder, stage: int, job: str | None) -> list[ModelCheckpoint]:
    # last.ckpt alone, saved after the epoch's validation, at a clean epoch boundary: a
    # resume never starts mid-epoch (ordinary DataLoaders cannot fast-forward). Until
    # 2026-12-07 a best-epochNNN.ckpt by val/acc was kept beside it, which nothing read
    # (evaluation, export and stage 2 take the last epoch): a third copy of every
    # checkpoint at an epoch's end, 8 GB of writes more for stage 1 at 2M identities.
    # monitor=None: with a monitor, Lightning 2.6 rewrites "last" only in epochs that
    # improve it, so resume and evaluation would miss the final epochs.
    return [
        ModelCheckpoint(
            dirpath=run.checkpoint_dir(stage, job),
            filename=LAST,
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    ]


def _plugins(trainer_args: dict[str, Any]) -> list[Any]:
    # Atomic, fsynced checkpoint writes (a kill never leaves a half-written checkpoint)
    # that refuse NaN weights; a user's own CheckpointIO plugin wins.
    plugins = trainer_args.pop("plugins", None) or []
    many = isinstance(plugins, Sequence) and not isinstance(plugins, str)
    plugins = list(plugins) if many else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if any(isinstance(p, ClusterEnvironment) for p in plugins):
        return plugins  # the user's
    torchrun = os.environ.get("TORCHELASTIC_RUN_ID")
    srun = not torchrun and os.environ.get("SLURM_STEP_ID")
    devices, nodes = trainer_args.get("devices", 1), trainer_args.get("num_nodes", 1)
    world = devices * nodes if all(type(v) is int for v in (devices, nodes)) else None
    if torchrun:  # Lightning's own choice, before SLURM's (torchrun in a batch script)
        return plugins
    if (srun and launched_processes() > 1 and world == launched_processes()) or (
        SLURMEnvironment.detect()
    ):
        # tasks srun started together, as many as the trainer counts: Lightning takes
        # SLURM's ranks only when it detects SLURM, which it does not under a job named
        # "bash" or "interactive" (salloc's shell): each task then started a DDP world
        # of its own. Where it detects SLURM, the same without its requeue: requeueing
        # is submitit's (launcher=slurm); Lightning's (on SIGUSR1, when a user's sbatch
        # asks for it) saved an hpc_ckpt and requeued a command that, run again, is
        # refused as a run folder that exists (a review).
        try:
            plugins.append(SLURMEnvironment(auto_requeue=False))
        except RuntimeError:
            # Lightning's refusal of this job's variables (--ntasks without
            # --ntasks-per-node): a Trainer that takes SLURM's ranks says so itself;
            # launcher=slurm's submission from such an allocation builds none
            pass
    return plugins


def hardware_hints(cfg: Config) -> list[str]:
    """What Lightning's "GPU available but not used" and "does not have many workers"
    said in its own terms (``Trainer(accelerator='gpu')``, ``num_workers=15`` in the
    ``DataLoader``), in the settings a facecluster user sets; once a command (pipeline's
    train says them), not at each stage. Workers are asked for on a GPU only: on the
    CPU they take its cores from training (the demo and smoke configs' 1 and 0)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    kind = (
        "a CUDA GPU"
        if torch.cuda.is_available()
        else "an Apple GPU (MPS)"
        if torch.backends.mps.is_available()
        else None
    )
    if kind is None:
        return []
    if accelerator == "cpu":
        return [
            f"{kind} is here, but trainer.accelerator=cpu (the demo and smoke configs' "
            "setting) trains on the CPU: add trainer.accelerator=gpu to train on the GPU"
        ]
    if cfg.data.num_workers < 2:
        return [
            f"data.num_workers={cfg.data.num_workers} decodes the images in too few processes "
            "to keep a GPU busy: set data.num_workers to about the CPU cores per GPU "
            "(docs/DATA.md)"
        ]
    return []


def default_precision(accelerator: str) -> str:
    """What ``trainer.precision`` is when unset or ``auto``.

    bf16-mixed on CUDA GPUs that support bf16 (Ampere and newer: fp32's range, no
    loss scaling), 16-mixed with loss scaling on older ones (Volta, Turing), 32-true
    elsewhere. On CPU, 32-true keeps a seeded run bit-for-bit reproducible (folder
    and .rec, 1 or 2 processes, resumed or not); bf16-mixed was 1.2-1.4x faster on
    this project's CPU with AMX (docs/PERFORMANCE.md) and is one override away.
    Margin heads compute in fp32 under every choice.
    """
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        # without emulation: Volta/Turing can hold bf16 tensors but have no bf16 math
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16-mixed" if native else "16-mixed"
    return "32-true"


@functools.cache  # once a command: the training's check and its evaluation
def warn_emulated_bf16(precision: str) -> None:
    """Warn (global rank 0) when a 16-bit ``precision`` (the ``trainer.precision`` given)
    runs on a CPU without bf16 instructions (``16-mixed`` runs as bf16 on a CPU): oneDNN
    then emulates every bf16 matrix product. A training step of the demo's backbone
    (IResNet-18, batch 32 at 64 px) took 33 times as long as under 32-true on a 2-core
    AMD EPYC with AVX2 (53.7 s against 1.6 s, 2026-12-04, a one-off script)."""
    if "16" not in precision or _cpu_bf16():
        return
    if is_global_zero():
        logging.getLogger(__name__).warning(
            f"trainer.precision={precision} on this CPU, which has no bf16 instructions "
            f"(torch sees {torch.backends.cpu.get_cpu_capability()}): each bf16 matrix "
            "product is emulated, many times slower than 32-true (33x for a training step "
            "of the demo's backbone, measured); trainer.precision=32-true runs at full speed"
        )


def _cpu_bf16() -> bool:
    """Whether this CPU has bf16 instructions, as oneDNN sees them; torch builds without
    oneDNN (some ARM ones) have no such op: taken as yes, nothing to warn of."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is None or bool(supported())


def build_trainer(
    cfg: Config,
    stage: int,
    run: RunFolder,
    logger: Any,
    callbacks: Sequence[L.Callback],
    job: str | None = None,
    batches: Callable[[int], int] | None = None,
) -> L.Trainer:
    """A Trainer for stage 1, or for stage-2 job ``job`` (:func:`facecluster.run.job_name`):
    the user's ``trainer.*`` plus this stage's callbacks. ``batches``: training batches
    per epoch for a world size (:meth:`FaceDataModule.stage1_steps`, ``subnet_steps``),
    to which the per-batch settings are fitted (:func:`_fit_epoch`)."""
    stage_callbacks = [
        *_checkpoints(cfg, run, stage, job),
        EpochSeedCallback(cfg.seed, stage),
        # Stops a NaN/Inf loss before the epoch-end save could overwrite "last".
        DivergenceCallback(stage, checkpoint=run.last_checkpoint(stage, job)),
        BadImageReport(),
        StopTogether(on_stop=detach_started_ranks),  # SIGTERM to any rank stops all
        *callbacks,
    ]
    if logger is not None:
        stage_callbacks.append(LearningRateMonitor(logging_interval="step"))
    if stage == 1 and cfg.data.verification:
        stage_callbacks.append(
            VerificationCallback(
                cfg.data.verification_paths(),
                cfg.data.verification_every,
                cfg.data.image_size,
                cfg.data.eval_batch_size or cfg.data.batch_size,
            )
        )
    kwargs = _trainer_kwargs(cfg, stage)
    if kwargs.get("enable_progress_bar", True) is not False:
        stage_callbacks.append(StderrProgressBar())  # stdout holds the results alone
    if cfg.trainer.get("precision", "auto") == "auto":
        rank_zero_info(f"trainer.precision=auto: {kwargs['precision']}")

    def trainer() -> L.Trainer:
        return L.Trainer(
            **kwargs,
            logger=logger if logger is not None else False,
            callbacks=stage_callbacks,
            default_root_dir=str(run.stage_dir(stage, job)),
            enable_checkpointing=True,
        )

    made = trainer()
    # the epoch's batches depend on the world size, which the Trainer decides
    if batches is not None and _fit_epoch(kwargs, batches(made.world_size), stage):
        made = trainer()
    skip_groups_apart(made)  # 16-mixed: a sub-net's fp16 overflow skips its own step only
    if isinstance(made.strategy.launcher, _SubprocessScriptLauncher):
        _LAUNCHERS.append(made.strategy.launcher)
    return made


_LAUNCHERS: list[_SubprocessScriptLauncher] = []
"""The Lightning launchers of this process's Trainers that start processes: under
Lightning's own DDP launcher (``trainer.devices=N``, no torchrun or srun) the first fit
of each node's local rank 0 starts the node's other ranks as its child processes, the
launcher's ``procs``."""

_DETACHED: list[subprocess.Popen] = []
"""Processes taken from the launchers' ``procs`` (:func:`detach_started_ranks`), not
yet ended by :func:`stop_started_ranks`."""

STOP_GRACE_S = 10.0
"""How long a failed rank 0 lets the ranks it started end on their own."""


def detach_started_ranks() -> None:
    """Take the DDP ranks this process's Trainers started out of Lightning's sight, for
    :func:`stop_started_ranks` to end. Lightning's child-process observer watches each
    launcher's ``procs`` list and kills this process too when one of them ends in an
    error; emptied, it sees none of their exits, and this process's own error, or its
    stop on SIGTERM, stands."""
    for launcher in _LAUNCHERS:
        _DETACHED.extend(launcher.procs)
        launcher.procs.clear()


_STOPPED_BY = {  # stop_started_ranks' cause, in its note
    "failed": "failed (its error follows)",
    "terminated": "was stopped by SIGTERM",
    "interrupted": "was interrupted",
}


def stop_started_ranks(grace: float = STOP_GRACE_S, cause: str = "failed") -> int:
    """In a process that failed, or stopped on SIGTERM (``cause="terminated"``) or
    Ctrl-C (``"interrupted"``): end the DDP ranks its Trainer started. Returns how many
    had to be killed.

    Lightning ends every process when one it started fails, but not when rank 0 (the
    process that started them) fails alone: a checkpoint that does not fit on its disk,
    the clustering that it runs alone. The others then wait for it in their next
    collective, under NCCL for the process group's timeout (30 minutes), holding their
    GPUs after the command has returned. This closes the process group (under gloo their
    collective then fails at once and they stop with a line), gives them ``grace``
    seconds to end, then kills the rest (SIGKILL: a process blocked in a collective
    does not run its signal handlers). On SIGTERM every rank stops at the same batch
    (:class:`facecluster.callbacks.StopTogether`) and they end on their own: this waits
    for them, so the command returns once they have.
    """
    what = _STOPPED_BY[cause]  # a wrong cause: before anything is ended
    detach_started_ranks()
    children = list(_DETACHED)
    _DETACHED.clear()
    if not children:
        return 0
    killed = 0
    try:
        close_process_group()
        deadline = time.monotonic() + grace
        for proc in children:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                killed += 1
    except Exception as e:  # never in place of the error that brought this process here
        print(f"note: the processes this one started were not all ended: {e!r}", file=sys.stderr)
    if killed:
        # a failed process's ranks wait for it; the others may still have been at work
        still = (
            "which were waiting for it" if cause == "failed" else f"still running {grace:g} s later"
        )
        print(
            f"note: this process {what} and ended the {killed} other process(es) of the run "
            f"that it had started, {still}",
            file=sys.stderr,
            flush=True,
        )
    return killed


@dataclass(frozen=True)
class Stopped:
    """How a command tells of a run stopped by bad data, a lost peer or a full disk: one
    line instead of a traceback, the exit status, and when to resume (the run folder
    exists by then, and its checkpoints before the stop are whole)."""

    message: str
    status: int
    when: str


def stopped_run(error: BaseException) -> Stopped | None:
    """What a run stopped by ``error`` says, when a resume continues it once the cause is
    dealt with; None for any other error (its traceback is the message)."""
    if isinstance(error, BadImageError):  # found by a loader: bad input
        # from a DataLoader worker the message holds the worker's traceback: what follows it
        message = str(error).rsplit("BadImageError: ", 1)[-1].strip()
        return Stopped(message, 2, "once the data is repaired")
    if isinstance(error, RuntimeError) and peer_stopped(error):
        # another DDP process stopped (a broken image under data.on_bad_image=fail, an
        # error of its own) and said why; gloo then fails this one's next collective, a
        # traceback of 100 lines after that process's one-line error
        message = "another process of this run stopped first (its own error says why); "
        return Stopped(message + "this one stopped with it", 1, "once its cause is dealt with")
    if isinstance(error, OSError) and disk_full(error):
        # a copy's (shutil: wandb's media files) names its source first, the file it
        # could not write second (a full-disk review: the message sent users to /tmp)
        written = error.filename2 or error.filename
        where = f"{written}: " if written else ""
        return Stopped(f"{where}{error.strerror or error}", 1, "once the disk has space")
    if type(error).__name__ == "CommError" and type(error).__module__.startswith("wandb"):
        # the server took the connection (the start-up check's test) but refused or did
        # not answer as W&B does: a WANDB_BASE_URL mistyped, a proxy, an outage, an
        # entity or project this key may not write to
        server = os.environ.get("WANDB_BASE_URL")
        where = f"W&B at {server} (WANDB_BASE_URL)" if server else "W&B"
        message = (
            f"{where} refused the run or did not answer ({error}): check wandb.entity, "
            "wandb.project and WANDB_BASE_URL, or log offline with wandb.mode=offline "
            "(`wandb sync` uploads it later)"
        )
        return Stopped(message, 1, "once W&B answers, or with wandb.mode=offline")
    return None


def peer_stopped(error: RuntimeError) -> bool:
    """Whether ``error`` is gloo's word that another process of this DDP run has gone
    (its transport's message; the process group may be closed by now,
    :func:`stop_started_ranks`). Not a DataLoader worker's own
    error re-raised here, which a network filesystem's "reset by peer" can be. (Under
    NCCL no collective fails at once: Lightning's launcher in rank 0 kills every process
    within 5 s of one it started failing, and rank 0 ends those it started when it
    fails itself.)"""
    text = str(error)
    return (
        "gloo" in text.lower()
        and "DataLoader worker" not in text
        and ("Connection closed by peer" in text or "Connection reset by peer" in text)
    )


def close_process_group() -> None:
    """Destroy the DDP process group this process joined (Lightning leaves it): left to
    the interpreter's exit, a gloo rank once ended in "terminate called without an
    active exception" and exit status 134 after its work was done (a review, 1 of 5
    runs of 2 srun tasks), which fails a SLURM step and cancels the jobs after it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_trainer(cfg: Config) -> None:
    """Before the run folder changes: refuse ``trainer.*`` values Lightning's Trainer
    refuses on this machine (``devices=abc``, ``strategy=foo``, ``accelerator=gpu`` on a
    machine without one, ...), which otherwise stopped the run with a traceback after
    its folder and logger were made, and a DDP world this launch cannot make (several
    nodes that nothing launched, processes the Trainer does not count). Builds stage 1's
    Trainer once, quietly, and drops it. :func:`check_trainer_settings` is the part that
    holds on any machine.

    Raises:
        ConfigError: naming the ``trainer.*`` settings and Lightning's reason, or the
            settings that do not fit this launch.
    """
    trainer = _trial_trainer(cfg)
    if isinstance(trainer.accelerator, CPUAccelerator):
        warn_emulated_bf16(str(cfg.trainer.get("precision", "auto")))
        if cfg.trainer.get("sync_batchnorm") is True and isinstance(
            trainer.strategy, ParallelStrategy
        ):
            # torch's SyncBatchNorm syncs GPU (CUDA/XPU) modules only: DDP refused it on
            # the CPU when it wrapped the model, after the data scan and the run folder
            raise ConfigError(
                f"trainer.sync_batchnorm=true with trainer.strategy="
                f"{cfg.trainer.get('strategy', 'auto')} on the CPU: torch's SyncBatchNorm "
                "needs a GPU (or XPU) in each process. Leave it out on the CPU (each "
                "process then normalises over its own batch), or train on GPUs"
            )
    environment = getattr(trainer.strategy, "cluster_environment", None)
    started = launched_processes()
    if (
        trainer.num_nodes > 1
        and started == 1
        and isinstance(environment, LightningEnvironment)
        and "MASTER_ADDR" not in os.environ
    ):
        # Lightning starts this node's processes, which then wait for the other nodes'
        # at 127.0.0.1 without end: the run hung after its folder was made
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes}, but no launcher started this run on "
            "several nodes: run it with srun (SLURM) or torchrun on each node, or set "
            "MASTER_ADDR, MASTER_PORT and NODE_RANK on each node and run the same command "
            "there (docs/TRAINING.md); alone, this process would wait for the other nodes "
            "without end"
        )
    # stage=2 as local jobs: this process only starts them, each job without SLURM's
    # task variables, whose own processes Lightning starts (launch.SLURM_TASK_ENV)
    jobs_only = cfg.stage == "2" and cfg.starts_local_jobs()
    if isinstance(environment, SLURMEnvironment) and not jobs_only:
        _check_slurm_tasks(cfg, trainer, started)
    if started > 1 and trainer.world_size != started:
        # Lightning checks the count under ddp only: with the default devices=1 each
        # process trained alone, all into one run folder (each over the others' last.ckpt)
        raise ConfigError(
            f"{started} processes were started by torchrun or srun, but trainer.devices="
            f"{cfg.trainer.get('devices', 'auto')} x trainer.num_nodes="
            f"{cfg.trainer.get('num_nodes', 1)} (trainer.strategy="
            f"{cfg.trainer.get('strategy', 'auto')}) makes {trainer.world_size}: each process "
            f"would train alone into the same run folder. Set trainer.devices to the "
            f"processes per node, trainer.num_nodes to the nodes and trainer.strategy=ddp"
        )


def _check_slurm_tasks(cfg: Config, trainer: L.Trainer, started: int) -> None:
    """Under SLURM (Lightning's SLURMEnvironment), Lightning starts no process itself:
    it takes the job's ``SLURM_NTASKS`` tasks for processes srun started, one per
    device. Refuse a launch where that does not hold: run by the batch script itself,
    a DDP world waited for the other tasks without end (Lightning issues #8707,
    #19817); srun with fewer tasks than devices trained that many processes, on one of
    the devices asked for, silently (a review)."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    asked = trainer.num_devices * trainer.num_nodes
    settings = (
        f"trainer.devices={cfg.trainer.get('devices', 'auto')} x trainer.num_nodes="
        f"{cfg.trainer.get('num_nodes', 1)}"
    )
    if started == 1 and os.environ.get("SLURM_STEP_ID") is None and trainer.world_size > 1:
        raise ConfigError(
            f"this process runs in SLURM job {os.environ.get('SLURM_JOB_ID', '?')}'s batch "
            f"script, not under srun: Lightning takes the job's {tasks} tasks "
            f"(SLURM_NTASKS) for {tasks} processes srun started, and this one would wait "
            f"for the others without end. Prepend srun (`srun {COMMAND['train']} ...`, one "
            f"task per device: #SBATCH --ntasks-per-node=<trainer.devices>), or use "
            f"launcher=slurm (docs/TRAINING.md)"
        )
    if asked != trainer.world_size:
        raise ConfigError(
            f"SLURM started {tasks} task(s) for this run (SLURM_NTASKS), but {settings} "
            f"asks for {asked} processes, one per device: Lightning would train "
            f"{trainer.world_size} process(es) and leave the other devices idle. Give the "
            f"job one task per device (#SBATCH --ntasks-per-node=<trainer.devices>, "
            f"--nodes=<trainer.num_nodes>), or set trainer.devices and trainer.num_nodes "
            f"to its tasks"
        )


def check_trainer_settings(cfg: Config) -> None:
    """:func:`check_trainer`'s part that holds on any machine: stage 1's Trainer built as
    for one process on the CPU, so every ``trainer.*`` setting but ``accelerator``,
    ``devices`` and ``num_nodes`` is checked, with the same message. For
    ``launcher=slurm`` on the login node, which may have no GPU and is no job's node:
    each job's command line sets those three from ``slurm.*``, and the job checks them
    (:func:`check_trainer`) where it runs, with its GPUs and its srun tasks.

    Raises:
        ConfigError: naming the ``trainer.*`` settings and Lightning's reason.
    """
    # SLURM's, as _plugins hands it: not this machine's launch (that is each job's)
    plugins = [p for p in _trainer_kwargs(cfg, 1)["plugins"] if not isinstance(p, SLURMEnvironment)]
    if not any(isinstance(p, ClusterEnvironment) for p in plugins):
        # not SLURM's: a submission from inside an allocation (sbatch --ntasks=4 around
        # train.py) is no job's world, and Lightning refused its ntasks with a traceback
        plugins = [*plugins, LightningEnvironment()]
    _trial_trainer(cfg, accelerator="cpu", devices=1, num_nodes=1, plugins=plugins)


def _trial_trainer(cfg: Config, **hardware: Any) -> L.Trainer:
    """Stage 1's Trainer, built quietly to be dropped; ``hardware``: Trainer arguments
    in place of the user's."""
    kwargs = {**_trainer_kwargs(cfg, 1), **hardware}
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # as build_trainer makes it (barebones=true refuses the checkpointing)
            trainer_args = {"enable_progress_bar": False, **kwargs}
            trainer = L.Trainer(**trainer_args, logger=False, enable_checkpointing=True)
    except (MisconfigurationException, ImportError, TypeError, ValueError) as e:
        settings = " ".join(f"trainer.{k}={v}" for k, v in cfg.trainer.items())
        raise ConfigError(f"trainer: Lightning refuses {settings}: {e}") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return trainer


def _fit_epoch(kwargs: dict[str, Any], batches: int, stage: int) -> bool:
    """Fit per-batch settings to an epoch of ``batches``: a stage-2 epoch is about 1/K of
    a stage-1 epoch, and Lightning refuses a ``val_check_interval`` count longer than
    the epoch, or a ``limit_train_batches`` fraction under one batch (it stopped stage 2
    after stage 1 and the clustering had trained; in stage 1, a traceback after the data
    scan, an unfinished run folder left). Whether it changed any."""
    before = dict(kwargs)
    limit = kwargs.get("limit_train_batches")
    runs = batches  # what Lightning will run of the epoch
    if isinstance(limit, float) and 0 < limit < 1:
        runs = int(limit * batches)
        if runs < 1:
            runs = kwargs["limit_train_batches"] = 1
            rank_zero_info(
                f"trainer.limit_train_batches={limit} of stage {stage}'s epoch of {batches} "
                "batches is under one batch: it trains one batch per epoch"
            )
    elif isinstance(limit, int) and not isinstance(limit, bool):
        runs = min(limit, batches)
    interval = kwargs.get("val_check_interval")
    counted = isinstance(interval, int) and not isinstance(interval, bool)
    if counted and kwargs.get("check_val_every_n_epoch", 1) is not None and interval > runs:
        kwargs["val_check_interval"] = runs
        rank_zero_info(
            f"trainer.val_check_interval={interval} is longer than stage {stage}'s epoch of "
            f"{runs} batches: it validates at each epoch's end"
        )
    return kwargs != before


def fit_eval_batches(trainer: L.Trainer, dm: FaceDataModule, stage: int) -> None:
    """Raise a ``limit_val_batches`` / ``limit_test_batches`` fraction under one batch of
    this process's share of the split to one batch: Lightning refuses it when the loop
    starts, and the test starts after the stage has trained (a review: stage 2 trained,
    then ``0.01 * 10 < 1`` stopped the run, whose resume failed the same way)."""
    for split in ("val", "test"):
        name = f"limit_{split}_batches"
        limit = getattr(trainer, name)
        if not (isinstance(limit, float) and 0 < limit < 1):
            continue
        faces = -(-len(dm.split_labels(split)) // trainer.world_size)  # one rank's, padded
        batches = -(-faces // dm.eval_batch_size)
        if batches and int(limit * batches) < 1:
            setattr(trainer, name, 1)
            rank_zero_info(
                f"trainer.{name}={limit} of stage {stage}'s {split} split of {batches} "
                f"batches is under one batch: it runs one batch"
            )


def _trainer_kwargs(cfg: Config, stage: int) -> dict[str, Any]:
    """Stage ``stage``'s Trainer arguments from ``trainer.*``: precision ``auto``
    resolved, its epochs, validation off without a validation split, our plugins."""
    kwargs = dict(cfg.trainer)
    if kwargs.get("precision", "auto") == "auto":
        kwargs["precision"] = default_precision(str(kwargs.get("accelerator", "auto")))
    kwargs["max_epochs"] = cfg.stage_epochs(stage)
    if cfg.data.val_fraction == 0:
        kwargs["limit_val_batches"] = 0
    kwargs["plugins"] = _plugins(kwargs)
    return kwargs
