"""Typed configuration: the schema, loading (YAML + dotlist overrides) and validation.

One dataclass per swappable piece; every field carries a docstring. Loading merges,
in order: the schema defaults, an optional YAML file (``-c configs/x.yaml``), then
``key=value`` overrides from the command line. A misspelled key or a wrong type
fails before any work with a message naming the key and the closest valid keys;
contradictory settings are all collected into one error. No Lightning import here,
except to read the Trainer's signature for validating ``trainer.*`` keys.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout (or install) root: relative default paths such as the bundled demo
set are resolved against it when they do not exist relative to the working dir."""


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts."""


@dataclass
class DataConfig:
    root: str = "datasets/lfw-demo/images"
    """Image folder with one sub-folder per identity (the default is the bundled LFW demo set)."""
    image_size: int = 112
    """Images are resized to image_size x image_size."""
    batch_size: int = 64
    """Training batch size per process; in stage 2 per sub-net (each cluster gets a batch)."""
    eval_batch_size: int | None = None
    """Batch size for validation, test and the embedding pass (None: batch_size)."""
    num_workers: int = 2
    """DataLoader worker processes per loader."""
    val_fraction: float = 0.1
    """Fraction of each identity's images held out for validation (at least one image)."""
    test_fraction: float = 0.2
    """Fraction of each identity's images held out for the test (at least one image)."""
    min_images_per_class: int = 10
    """Identities with fewer images are dropped (their names are logged)."""
    max_classes: int | None = None
    """Keep only the first max_classes identities (sorted by name); None keeps all."""
    on_bad_image: str = "skip"
    """Undecodable image files: skip (replace by another image of the same identity,
    each path logged once, the total reported at epoch ends) or fail (stop naming the file)."""
    max_bad_fraction: float = 0.01
    """Stop when more than this fraction of a split is undecodable or zero-byte files."""


@dataclass
class ModelConfig:
    backbone: str = "iresnet18"
    """A registered backbone (iresnet18/34/50/100, tiny) or any timm model name."""
    embedding_dim: int = 512
    """Size of the face embedding."""
    pretrained: bool = False
    """Load timm's pretrained weights (needs network access; never the default)."""
    dropout: float = 0.0
    """Dropout before the embedding layer."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the backbone builder (e.g. width for IResNet)."""


@dataclass
class HeadConfig:
    name: str = "arcface"
    """Margin head: arcface or cosface."""
    s: float = 64.0
    """Logit scale."""
    m: float | None = None
    """Margin (None: the head's default, 0.5 for ArcFace, 0.35 for CosFace)."""
    init_from_class_means: bool = True
    """Stage 2: start each sub-net's head rows from its identities' class means."""


@dataclass
class ClusteringConfig:
    num_clusters: int = 4
    """Number of clusters K, i.e. of sub-nets."""
    method: str = "kmeans"
    """kmeans (spherical, the paper), balanced (equal sizes) or random (the ISM baseline)."""
    niter: int = 20
    """k-means iterations."""
    nredo: int = 1
    """k-means restarts (the best objective is kept)."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd or adamw."""
    lr: float = 0.1
    """Peak learning rate (reached after the warm-up)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for AdamW); not applied to norm layers and biases."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    scheduler: str = "cosine"
    """cosine, poly or constant, after the linear warm-up; stepped every optimizer step."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (fractions allowed)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr."""
    poly_power: float = 2.0
    """Exponent of the polynomial decay."""


@dataclass
class StageConfig:
    max_epochs: int | None = None
    """Epochs of this stage (None: trainer.max_epochs)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule of this stage."""


@dataclass
class RouteConfig:
    top_m: int = 1
    """Clusters a face is routed to (nearest class means); their sub-nets run."""
    alpha: float = 0.0
    """Decision unit: score = (1 - alpha) * sub-net cosine + alpha * class-mean similarity."""
    index: str = "flat"
    """faiss index over the class means: flat (exact inner product), ivf or hnsw."""
    ivf_nlist: int | None = None
    """IVF lists (None: about 4 * sqrt(identities))."""
    ivf_nprobe: int = 16
    """IVF lists searched per query."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    neighbours: int = 64
    """Class means retrieved per query to rank the clusters (at least top_m * 8 are used)."""


@dataclass
class EvalConfig:
    batch_size: int = 256
    """Batch size of the accuracy passes and of the throughput measurement."""
    timing_batches: int = 3
    """Batches timed for throughput (after one warm-up batch); latency uses 20 single images."""
    plots: bool = True
    """Write the top_m / alpha / class-mean plots (PNG, and W&B images with logger=wandb)."""
    after_training: bool = True
    """train.py ends by evaluating the run it trained (evaluate.py does it later otherwise)."""


@dataclass
class WandbConfig:
    project: str = "facecluster"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None: the key's default."""
    mode: str | None = None
    """online, offline or disabled; None decides: offline without an API key or without network."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""


@dataclass
class Config:
    method: str = "clustered"
    """clustered (the paper), random (ISM: random partition, every sub-net runs at test
    time) or single (one network over all identities for stage1 + stage2 epochs)."""
    seed: int = 42
    """Seeds the split, the clustering and training; a CPU run is repeatable."""
    output_dir: str = "runs"
    """Runs are written to output_dir/<run_name>/."""
    run_name: str | None = None
    """Run folder name (None: <date>-<time>-<method>)."""
    resume: str | None = None
    """A run folder or a facecluster checkpoint to continue."""
    logger: str = "wandb"
    """wandb, csv or none."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    """Stage 1: the backbone with one margin head over all identities."""
    stage2: StageConfig = field(default_factory=StageConfig)
    """Stage 2: K sub-nets, each warm-started from the stage-1 backbone."""
    trainer: dict[str, Any] = field(default_factory=lambda: {"accelerator": "auto", "devices": 1})
    """Any lightning.Trainer argument, applied to both stages; trainer.max_epochs is the
    epochs of each stage that has no stageN.max_epochs of its own."""
    route: RouteConfig = field(default_factory=RouteConfig)
    """Routed inference: the router and the final decision unit."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluate.py and the table at the end of train.py."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


METHODS = ("clustered", "random", "single")
INDEXES = ("flat", "ivf", "hnsw")
LOGGERS = ("wandb", "csv", "none")
HEADS = ("arcface", "cosface")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "poly", "constant")
CLUSTER_METHODS = ("kmeans", "balanced", "random")
WANDB_MODES = ("online", "offline", "disabled")
# Trainer arguments facecluster sets itself, per stage.
RESERVED_TRAINER_KEYS = ("callbacks", "logger", "default_root_dir", "enable_checkpointing")


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema, nested sections included."""
    keys = []
    for f in fields(schema):
        name = prefix + f.name
        keys.append(name)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.extend(_all_keys(type(default), name + "."))
    return keys


def _trainer_args() -> list[str]:
    from lightning import Trainer  # only here: the schema itself stays Lightning-free

    return [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]


def _suggest(key: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if not close:  # a misspelled leaf in the right section: compare the last part only
        leaf = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]])]
        close = close[:3]
    return f"; did you mean: {', '.join(prefix + c for c in close)}?" if close else ""


def _merge(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    """Merge with messages that name the key and suggest valid ones."""
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key
        raise ConfigError(
            f"{source}: unknown config key '{key}'{_suggest(key, _all_keys(Config))}"
        ) from None
    except ValidationError as e:
        msg = str(e.msg).splitlines()[0]
        raise ConfigError(f"{source}: wrong type for '{e.full_key}': {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` strings (Hydra-style dotlist) to a config; values are YAML-typed."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    return OmegaConf.from_dotlist(overrides)


def load_config(
    path: str | Path | list[str | Path] | tuple | None = None, overrides: list[str] | tuple = ()
) -> DictConfig:
    """Load and validate a config.

    Args:
        path: optional YAML file, or several merged in order (later ones win); each
            lists only what differs from the schema defaults.
        overrides: ``key=value`` strings applied last.

    Returns:
        The validated, typed config (an OmegaConf structured config of ``Config``).
    """
    cfg = OmegaConf.structured(Config)
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    for p in map(Path, paths):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # YAML syntax errors name line and column
            raise ConfigError(f"cannot parse {p}: {e}") from None
        cfg = _merge(cfg, loaded, str(p))
    if overrides:
        cfg = _merge(cfg, parse_overrides(list(overrides)), "command line")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Collect every problem of a merged config and raise them as one ConfigError."""
    problems: list[str] = []

    def choice(key: str, value: Any, options: tuple) -> None:
        if value not in options:
            problems.append(f"{key}={value!r} is not one of {', '.join(options)}")

    def positive(key: str, value: Any) -> None:
        if value is not None and value <= 0:
            problems.append(f"{key} must be > 0, got {value}")

    choice("method", cfg.method, METHODS)
    choice("route.index", cfg.route.index, INDEXES)
    positive("route.top_m", cfg.route.top_m)
    positive("eval.batch_size", cfg.eval.batch_size)
    if not 0.0 <= cfg.route.alpha <= 1.0:
        problems.append(f"route.alpha must be in [0, 1], got {cfg.route.alpha}")
    if cfg.route.top_m > cfg.clustering.num_clusters:
        problems.append(
            f"route.top_m={cfg.route.top_m} is more than clustering.num_clusters="
            f"{cfg.clustering.num_clusters}"
        )
    if cfg.method == "clustered" and cfg.clustering.method == "random":
        problems.append("clustering.method=random is the ISM baseline: use method=random")
    if cfg.method == "random" and cfg.clustering.method == "balanced":
        problems.append(
            "method=random partitions at random: clustering.method=balanced contradicts it"
        )
    choice("logger", cfg.logger, LOGGERS)
    choice("head.name", cfg.head.name, HEADS)
    choice("clustering.method", cfg.clustering.method, CLUSTER_METHODS)
    if cfg.wandb.mode is not None:
        choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    for key in (
        "data.image_size",
        "data.batch_size",
        "data.eval_batch_size",
        "data.min_images_per_class",
        "data.max_classes",
        "model.embedding_dim",
        "clustering.num_clusters",
        "clustering.niter",
        "clustering.nredo",
        "head.s",
    ):
        section, name = key.split(".")
        positive(key, cfg[section][name])
    if cfg.data.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    choice("data.on_bad_image", cfg.data.on_bad_image, ("skip", "fail"))
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        problems.append(f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")
    for key in ("val_fraction", "test_fraction"):
        v = cfg.data[key]
        if not 0.0 <= v < 1.0:
            problems.append(f"data.{key} must be in [0, 1), got {v}")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
        problems.append(
            "data.val_fraction + data.test_fraction must be < 1 (no training images left)"
        )
    if cfg.data.test_fraction == 0.0:
        problems.append("data.test_fraction must be > 0: the held-out accuracy needs a test split")
    if cfg.head.m is not None and not 0.0 <= cfg.head.m < math.pi / 2:
        problems.append(f"head.m must be in [0, pi/2), got {cfg.head.m}")
    if cfg.data.max_classes is not None and cfg.data.max_classes < cfg.clustering.num_clusters:
        problems.append(
            f"data.max_classes={cfg.data.max_classes} is smaller than "
            f"clustering.num_clusters={cfg.clustering.num_clusters}: every cluster needs identities"
        )
    for stage in ("stage1", "stage2"):
        o = cfg[stage].optim
        choice(f"{stage}.optim.name", o.name, OPTIMIZERS)
        choice(f"{stage}.optim.scheduler", o.scheduler, SCHEDULERS)
        positive(f"{stage}.optim.lr", o.lr)
        positive(f"{stage}.max_epochs", cfg[stage].max_epochs)
        if o.warmup_epochs < 0:
            problems.append(f"{stage}.optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            problems.append(f"{stage}.optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if cfg[stage].max_epochs is None and cfg.trainer.get("max_epochs") in (None, -1):
            problems.append(f"{stage}.max_epochs or trainer.max_epochs must be set")
    if (
        cfg.trainer.get("max_epochs") is not None
        and cfg.stage1.max_epochs is not None
        and cfg.stage2.max_epochs is not None
    ):
        problems.append(
            f"trainer.max_epochs={cfg.trainer.max_epochs} would be ignored: "
            f"stage1.max_epochs={cfg.stage1.max_epochs} and stage2.max_epochs="
            f"{cfg.stage2.max_epochs} are set; set those instead, or null them "
            "(stage1.max_epochs=null stage2.max_epochs=null) to use trainer.max_epochs"
        )
    valid = _trainer_args()
    for key in cfg.trainer:
        if key in RESERVED_TRAINER_KEYS:
            problems.append(f"trainer.{key} is set by facecluster itself (see docs/TRAINING.md)")
        elif key not in valid:
            problems.append(
                f"unknown Trainer argument 'trainer.{key}'" + _suggest(key, valid, "trainer.")
            )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def resolve_data_root(root: str) -> Path:
    """A relative data.root is taken from the working dir, else from the project root."""
    p = Path(root).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


def stage_epochs(cfg: DictConfig, stage: str) -> int:
    """Epochs of a stage: its own max_epochs, else trainer.max_epochs.

    With method=single there is no stage 2: stage 1 trains for both stages' epochs,
    so the single-model baseline gets the same total epochs as the two-stage method.
    """
    epochs = int(cfg[stage].max_epochs or cfg.trainer.max_epochs)
    if cfg.method == "single" and stage == "stage1":
        epochs += int(cfg.stage2.max_epochs or cfg.trainer.max_epochs)
    return epochs


def partition_method(cfg: DictConfig) -> str:
    """How identities are grouped: method=random forces the random (ISM) partition."""
    return "random" if cfg.method == "random" else cfg.clustering.method


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
