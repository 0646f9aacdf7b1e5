"""Typed configuration: the schema, loading (YAML + dotlist overrides) and validation.

One dataclass per swappable piece; every field carries a docstring, and each
section's rules are methods of that section (``problems``), after litgpt's
``args.py``. Loading merges, in order: the schema defaults, optional YAML files
(``-c configs/x.yaml``), then ``key=value`` overrides from the command line. A
misspelled key or a wrong type fails before any work with a message naming the key
and the closest valid keys; contradictory settings are all collected into one
error. The result is a plain :class:`Config` object: sections are passed down as
objects, and lower layers receive plain arguments (``DataConfig.datamodule_args``,
``ModelConfig.backbone_args``) and raise in their own terms; :func:`naming` maps
such an error back to the config key. No Lightning import here, except to read the
Trainer's signature for validating ``trainer.*`` keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import json
import math
import os
import re
import shlex
import sys
import traceback
import typing
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    GrammarParseError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout (or install) root: relative default paths such as the bundled demo
set are resolved against it when they do not exist relative to the working dir."""

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
"""``configs/`` as an installed package holds it (pyproject's package-dir ships the
checkout's ``configs/`` as ``facecluster/configs``; a checkout has none here)."""

CHECKOUT = None if PACKAGE_CONFIGS.is_dir() else PROJECT_ROOT
"""The checkout facecluster runs from, None for an installed package: there
PROJECT_ROOT is site-packages, whose ``configs/`` of another package was read for
``-c configs/...`` (a review)."""

DEMO_ROOT = "datasets/lfw-demo/images"
"""The bundled demo set, ``data.root``'s default: in the checkout, not in the package."""


def config_file(given: str | Path) -> Path:
    """A ``-c`` file: from the working dir, else the checkout's (as data.root), or, for
    ``configs/...`` of an installed package, its own copy."""
    if home := unknown_home(given):
        raise ConfigError(f"-c {home}")
    path = Path(given).expanduser()
    if path.is_absolute() or path.exists() or CHECKOUT is not None:
        return resolve_data_root(str(given))
    if len(path.parts) > 1 and path.parts[0] == "configs":
        return PACKAGE_CONFIGS.joinpath(*path.parts[1:])
    return path


def default_config() -> Path:
    """``configs/default.yaml`` of the checkout, or of the installed package."""
    return (PACKAGE_CONFIGS if CHECKOUT is None else CHECKOUT / "configs") / "default.yaml"


TRAINER_ARGS = frozenset(
    {
        "accelerator", "strategy", "devices", "num_nodes", "precision", "logger",
        "callbacks", "fast_dev_run", "max_epochs", "min_epochs", "max_steps", "min_steps",
        "max_time", "limit_train_batches", "limit_val_batches", "limit_test_batches",
        "limit_predict_batches", "overfit_batches", "val_check_interval",
        "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
        "enable_checkpointing", "enable_progress_bar", "enable_model_summary",
        "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
        "deterministic", "benchmark", "inference_mode", "use_distributed_sampler",
        "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm",
        "reload_dataloaders_every_n_epochs", "default_root_dir", "enable_autolog_hparams",
        "model_registry",
    }
)  # fmt: skip
"""Lightning 2.6's Trainer arguments (tests/test_config.py checks that the installed
Trainer takes each): a config whose trainer keys are all here is checked without
importing Lightning (4-5 s of the 5.4 s a config mistake took); any other key is looked
up in the installed Trainer's signature."""
TRAINER_COUNTS = {
    "accumulate_grad_batches": 1,
    "check_val_every_n_epoch": 1,
    "log_every_n_steps": 0,
    "num_sanity_val_steps": -1,
    "min_epochs": 0,
    "min_steps": 0,
}
"""Trainer counts checked at config time, with their least value (null: Lightning's default)."""
TRAINER_FRACTIONS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
)
"""Trainer settings that are a count of batches or a fraction of an epoch's."""
TRAINER_SWITCHES = (
    "benchmark",
    "enable_progress_bar",
    "enable_model_summary",
    "sync_batchnorm",
    "detect_anomaly",
    "inference_mode",
    "use_distributed_sampler",
)
"""Trainer switches checked at config time: true or false (null: Lightning's default)."""
UNSUPPORTED_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "xla")
"""Lightning strategies that facecluster refuses: the spawn/fork ones load rank 0's
head shard back into the launching process's whole head at the end of a fit; FSDP
and DeepSpeed do not honour DDP's ignore list, so the shards would be averaged."""


MAX_IMAGE_SIZE = 1024
"""Largest ``data.image_size``: face crops are 112 (arcface_torch), and 1024 is the
largest default input of timm's models (SAM's ViTs); a larger value ended in a huge
allocation, with a traceback."""


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts."""


@contextlib.contextmanager
def naming(key: str, *also: type[Exception]) -> Iterator[None]:
    """Re-raise a lower layer's error (its own terms) as a ConfigError naming ``key``.

    Catches ValueError (a bad value), FileNotFoundError and NotADirectoryError, plus
    the exception types in ``also`` (e.g. TypeError for a backbone's unknown keyword).
    """
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError, *also) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"{key}: {message}") from None


class _Rules:
    """Collects the problems of one section, each naming its full key."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.problems: list[str] = []

    def add(self, message: str) -> None:
        self.problems.append(message)

    def choice(self, name: str, value: Any, options: tuple) -> None:
        if value not in options:
            self.add(f"{self.prefix}{name}={value!r} is not one of {', '.join(options)}")

    def positive(self, name: str, value: Any) -> None:
        if value is not None and not value > 0:  # NaN too
            self.add(f"{self.prefix}{name} must be > 0, got {value}")

    def within(self, name: str, value: float, lo: float, hi: float, closed: bool = True) -> None:
        inside = lo <= value <= hi if closed else lo <= value < hi
        if not inside:
            bracket = "]" if closed else ")"
            self.add(f"{self.prefix}{name} must be in [{lo:g}, {hi:g}{bracket}, got {value}")


def _not_finite(section: Any, prefix: str = "") -> list[str]:
    """A problem for every float setting that is NaN or infinite (``stage1.optim.lr=nan``
    passed ``lr <= 0``, and trained stage 1 before stage 2 diverged at its first step)."""
    found = []
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            found += _not_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append(f"{prefix}{f.name} must be a finite number, got {value}")
        elif isinstance(value, list | tuple):
            if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                found.append(f"{prefix}{f.name} must hold finite numbers, got {list(value)}")
    return found


_SAID_EMPTY = ("data.root", "output_dir", "resume", "run_name")
"""Text keys whose empty value the config's rules refuse with words of their own (an unset
shell variable?); every other key's empty override is refused as no value."""


def _empty(rules: _Rules, name: str, value: str | None, use: str) -> None:
    """An empty path (``resume=$RUN`` with RUN unset) is refused, not read as the working
    dir (``data.root``, ``output_dir``) or as no value (``resume``: a new run started)."""
    if value is not None and not value.strip():
        rules.add(f"{rules.prefix}{name}={value!r} is empty (an unset shell variable?): {use}")


def _number(value: Any) -> bool:
    """An int or float as YAML types it (not a bool, which is an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    """An int as YAML types it (not a bool)."""
    return _number(value) and isinstance(value, int)


CACHE_FOLDER = ".cache"
"""The folder in ``output_dir`` that keeps what later processes reuse (Config.cache_dir)."""

COMMAND = {"train": "python train.py", "evaluate": "python evaluate.py"}
"""How messages name the commands that continue and evaluate a run. ``facecluster
train`` and ``facecluster evaluate`` (:func:`facecluster.cli.main`) put their own names
here, so that a hint works where there is no train.py (an installed package)."""


def resume_command(run: str | Path, *overrides: str) -> str:
    """The command that continues ``run``, quoted for a POSIX shell where it must be
    (a run folder's path with a space was two arguments when pasted)."""
    return f"{COMMAND['train']} {shlex.join([f'resume={run}', *overrides])}"


def unknown_home(given: str | Path) -> str | None:
    """Why ``given`` cannot be expanded, or None: it begins with ``~user`` for a user
    this machine does not have (a shell leaves it as typed, and pathlib's expanduser
    raised a RuntimeError: a traceback in every command)."""
    text = str(given)
    if not text.startswith("~") or os.path.expanduser(text) != text:
        return None
    user = text[1:].split(os.sep, 1)[0]
    if not user:
        return f"{text}: no home folder ($HOME) to expand ~ to"
    return f"{text}: this machine has no user {user!r}, whose home folder ~{user} would be"


def missing_path(given: str | Path, prefix: str = "", what: str = "") -> str | None:
    """``given``, ``~`` expanded, named with where it was looked for when it does not
    exist; ``None`` when it does. Light (no torch): the commands check their paths with
    it before their imports, and ``run=`` (:func:`facecluster.run.run_folder`) after.
    A blank path (the working dir, which identify searched and enroll enrolled whole)
    names nothing."""
    if not str(given).strip():
        return f"{prefix}{given!r} names no file or folder{what}"
    if home := unknown_home(given):
        return f"{prefix}{home}"
    path = Path(given).expanduser().resolve()
    if cannot := unreadable_folder(path):  # exists() failed on it with a traceback
        return f"{prefix}{cannot}"
    if path.exists():
        return None
    key, equals, value = str(given).partition("=")
    if equals and not prefix and Path(value).expanduser().exists():  # export run=runs/x
        return f"{given}: give the path itself, {value}, without {key}="
    return f"{prefix}{given}: {path} does not exist{what}"


def resume_path(resume: str) -> Path:
    """The run folder or checkpoint that ``resume=`` names, ``~`` expanded. Light (no
    torch): train.py checks a resume's path with it before its imports (a mistyped run
    folder was named after 8 s of them), :meth:`facecluster.run.RunFolder.config_for_resume`
    again as it reads the run.

    Raises:
        ConfigError: the path names a user's home this machine lacks, lies in a folder
            this user cannot read, does not exist, or is a folder that no run made (no
            config.yaml or run.json: the runs' folder itself, most likely), or neither
            a folder nor a file (/dev/null)."""
    if home := unknown_home(resume):  # a RuntimeError traceback in expanduser
        raise ConfigError(f"resume={home}")
    path = Path(resume).expanduser()
    if cannot := unreadable_folder(path):  # another user's: before any look inside
        raise ConfigError(f"resume={resume}: {cannot}")
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such run folder or checkpoint")
    if not path.is_file() and not any((path / name).is_file() for name in (RUN_CONFIG, RUN_META)):
        raise ConfigError(
            f"resume={resume}: not a facecluster run folder (no {RUN_CONFIG}); "
            "pass the folder printed at the start of the run, or a checkpoint"
        )
    return path


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an identity or a run, or None: it is blank (spaces and
    invisible format characters only), or holds a line break or another control
    character (Unicode categories Cc, Zl, Zp), which splits a printed table's row and a
    folder listing's line. Letters of any script, spaces between words, a no-break
    space or a zero-width non-joiner (Persian names) are fine."""
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return "holds a line break or another control character"
    if all(unicodedata.category(c) in ("Zs", "Cf") for c in name):
        return "is blank"
    return None


NAME_RULE = "it needs a visible character and no line break or other control character"
"""What :func:`name_problem` asks of a name, as the messages say it."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # categories Cc, Zl, Zp
_WORD = re.compile(r"\w")  # a letter or digit of any script: neither Zs nor Cf


def unreadable_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, why)`` for each of ``names`` that :func:`name_problem` refuses, in order.
    Only the names that hold a control character or no letter or digit are looked at
    character by character: :func:`name_problem` on each of 2M names of 20 characters
    (WebFace42M's count) took 13.7 s, this 0.8 s (measured on 2 cores)."""
    return [
        (name, why)
        for name in names
        if (_CONTROL.search(name) or not _WORD.search(name)) and (why := name_problem(name))
    ]


def escape_unencodable_output() -> None:
    """Make standard output escape what its encoding cannot hold, as Python's standard
    error does (``backslashreplace``): under a UTF-8 locale other than C.UTF-8 it is
    strict, and a command that printed a name that is not UTF-8 (a folder's bytes kept
    as they are) ended with a UnicodeEncodeError traceback after its work was saved:
    enrol, pack, export (a review). Commands call it as they start."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def same_name(name: str) -> str:
    """The form in which identity names are compared: NFC (the same characters however
    composed: a folder copied from macOS holds "José" decomposed) without surrounding
    spaces."""
    return unicodedata.normalize("NFC", name).strip()


def name_collisions(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(earlier, later)`` for each of ``names`` that is an earlier one's under
    :func:`same_name`, in order: two identities that every table and answer shows as
    one name (2M ASCII names of 20 characters: 0.7 s on one core; NFC's own quick
    check leaves such names as they are)."""
    seen: dict[str, str] = {}
    found = []
    for name in names:
        key = same_name(name)
        if key in seen:
            found.append((seen[key], name))
        else:
            seen[key] = name
    return found


def shown_names(pair: tuple[str, str]) -> str:
    """Two names that look alike, told apart: their ``ascii()`` forms."""
    return f"{ascii(pair[0])} and {ascii(pair[1])}"


SAME_NAME_RULE = "names are one after Unicode normalisation (NFC) and without surrounding spaces"
"""Why :func:`name_collisions` refuses two names, as the messages say it."""


RUN_CONFIG = "config.yaml"
"""The run folder's saved config: what makes a folder a run's."""
RUN_META = "run.json"
"""The run folder's id, creation, launch and format (:meth:`RunFolder.create`)."""
RUN_FORMAT = 1
"""The run-folder format this facecluster writes and reads: ``run.json``'s ``format``,
with the ``facecluster`` release that made the folder (a folder without them, made
before 2026-12-07, has this format). A release that changes what a run's files mean
raises it, so that an older facecluster refuses such a folder (:func:`not_a_run`):
read by today's schema, a newer run's new setting was "unknown config key" (a typo, by
its hint) and a newer record "a damaged run folder"."""


def not_a_run(folder: str | Path) -> str | None:
    """Why ``folder`` (which exists) is not a run folder this facecluster reads, or
    ``None``. Light (no torch): evaluate and export say it before their imports, and
    :meth:`RunFolder.config` (resume, evaluation, export) after."""
    path = Path(folder).expanduser().resolve()
    if cannot := unreadable_folder(path):
        return cannot
    if not (path / RUN_CONFIG).is_file():
        return (  # an export folder, given to evaluate or export, most likely
            f"{path}: not a facecluster run folder (no {RUN_CONFIG}): evaluation and export "
            "take the folder that training made (runs/<run>); an export's folder is for "
            "`facecluster identify` and `facecluster enroll`"
        )
    try:
        meta = json.loads((path / RUN_META).read_text())
    except (OSError, ValueError):  # none or damaged: said where the run's id is read
        return None
    stamp = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(stamp, int) and not isinstance(stamp, bool) and stamp > RUN_FORMAT:
        return newer_format(path, "run folder", stamp, RUN_FORMAT, meta.get("facecluster"))
    return None


def unreadable_folder(path: Path) -> str | None:
    """Why this user cannot look into ``path`` (a run, an export or images of another
    user's, made under umask 077, or inside such a folder), or ``None``: each look
    inside it was a PermissionError traceback. Names the outermost folder that keeps
    this user out."""
    try:
        (path / RUN_CONFIG).is_file()
    except PermissionError as e:
        # the folders above need only be passed through (0711); this one read too
        closed = next((p for p in reversed(path.parents) if not os.access(p, os.X_OK)), None)
        if closed is None:
            closed = path
        try:
            owner = f", owned by uid {closed.stat().st_uid}"
        except OSError:
            owner = ""
        return (
            f"{path}: this user cannot read it ({e.strerror}): {closed}{owner} does not let "
            "this user in; ask its owner to make it readable (chmod g+rX on each folder "
            "down to it), or work on a copy"
        )
    return None


def newer_format(
    path: str | Path, what: str, stamp: int, newest: int, writer: object = None
) -> str:
    """What a file or folder of a format newer than this facecluster reads says:
    ``stamp`` and ``writer`` (the facecluster release it names, if any) against this
    release's ``newest``."""
    import facecluster

    known = isinstance(writer, str) and writer not in ("", "unknown")  # "unknown": a source tree
    by = f"facecluster {writer}" if known else "a later facecluster"
    return (
        f"{path}: a {what} of format {stamp}, made by {by}; this facecluster "
        f"({facecluster.__version__}) reads formats up to {newest}: read it with {by} or later"
    )


def resolve_data_root(root: str) -> Path:
    """A relative data.root is taken from the working dir, else from the checkout.

    Raises:
        ConfigError: ``root`` begins with ``~user`` of no user here."""
    if home := unknown_home(root):
        raise ConfigError(home)
    p = Path(root).expanduser()
    if p.is_absolute() or p.exists() or CHECKOUT is None:
        return p
    return CHECKOUT / p


def check_data_root(root: str, run: bool) -> None:
    """Refuse a ``data.root`` that does not exist, light (no torch): a new run's is
    checked as its config is read (``run=False``), a run's (a resume, an evaluation, an
    export: ``run=True``) when its data is scanned, with the advice for data that moved
    since it trained."""
    if resolve_data_root(root).exists():
        return
    places = (
        []
        if Path(root).expanduser().is_absolute()
        else list(dict.fromkeys([Path.cwd(), *([CHECKOUT] if CHECKOUT else [])]))
    )
    where = f" (looked for in {' and '.join(map(str, places))})" if places else ""
    moved = (
        f"; for a run whose data moved, add data.root=<new place> to its "
        f"`{COMMAND['train']} resume=<run>` or `{COMMAND['evaluate']}` command, or "
        "--data-root <new place> to facecluster export"
    )
    demo = (
        " (the bundled demo set comes with a checkout of facecluster's repository, not "
        "with the installed package)"
        if root == DEMO_ROOT and CHECKOUT is None
        else ""
    )
    raise ConfigError(
        f"data.root={root!r} does not exist{where}{demo}: give an image folder (one "
        f"sub-folder per identity) or an InsightFace .rec{moved if run else ''}"
    )


@dataclass
class DataConfig:
    root: str = DEMO_ROOT
    """Image folder with one sub-folder per identity, or an InsightFace ``.rec`` file or
    the folder holding ``train.rec``/``train.idx`` (the default is the bundled LFW demo set)."""
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
    """Undecodable image files: skip (in training replaced by another image of the same
    identity; left out of validation, evaluation and the class means; each path logged
    once, the total reported at epoch ends) or fail (stop naming the file)."""
    max_bad_fraction: float = 0.01
    """Stop when more than this fraction of a split is undecodable or zero-byte files."""
    decode: str = "cpu"
    """Where training images are decoded: cpu (the loader workers, simplejpeg) or device
    (the loaders ship the JPEG bytes and the training device decodes each batch in one
    call: nvJPEG on a GPU; docs/DATA.md). Evaluation loaders always decode on the CPU."""
    verification: list[str] = field(default_factory=list)
    """Verification sets for the 10-fold protocol: InsightFace ``.bin`` files
    (lfw.bin, cfp_fp.bin, agedb_30.bin) or an LFW ``pairs.txt`` with ``images/``
    beside it. Measured on the stage-1 backbone during training and by evaluate.py."""
    verification_every: int = 1
    """Stage-1 epochs between verification measurements (the last epoch always)."""
    unseen_fraction: float = 0.0
    """Open set: this fraction of the identities (at least 2 when > 0) never trains;
    half of these identities, all their faces, choose the "unknown" threshold (val),
    the other half measure false positives (test). 0: closed set."""

    def problems(self) -> list[str]:
        r = _Rules("data.")
        _empty(r, "root", self.root, "name the image folder or .rec file to train on")
        for name in ("image_size", "eval_batch_size", "min_images_per_class", "max_classes"):
            r.positive(name, getattr(self, name))
        if self.image_size > MAX_IMAGE_SIZE:
            r.add(
                f"data.image_size={self.image_size} is more than {MAX_IMAGE_SIZE}: images are "
                "resized to image_size x image_size (face crops: 112)"
            )
        if self.batch_size < 2:
            r.add(
                "data.batch_size must be >= 2 (BatchNorm1d cannot train on a batch of 1), "
                f"got {self.batch_size}"
            )
        if self.num_workers < 0:
            r.add(f"data.num_workers must be >= 0, got {self.num_workers}")
        r.choice("on_bad_image", self.on_bad_image, ("skip", "fail"))
        r.choice("decode", self.decode, ("cpu", "device"))
        r.within("max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        r.within("val_fraction", self.val_fraction, 0.0, 1.0, closed=False)
        r.within("unseen_fraction", self.unseen_fraction, 0.0, 1.0, closed=False)
        r.positive("verification_every", self.verification_every)
        # OmegaConf takes a mapping as an item of a list[str] ([{a: 1}]): a TypeError below
        others = [v for v in self.verification if not isinstance(v, str)]
        if others:
            r.add(f"data.verification: each item is a file's path, got {others[0]!r}")
        for path in [] if others else self.verification_paths():
            if path.is_dir():  # was reported as "does not exist"
                r.add(f"data.verification: {path} is a folder: name its .bin file or pairs.txt")
            elif not path.is_file():
                r.add(f"data.verification: {path} does not exist")
            elif path.suffix != ".bin" and not (path.parent / "images").is_dir():
                r.add(
                    f"data.verification: {path} is not a .bin file and has no images/ "
                    "folder beside it (an LFW pairs.txt needs one)"
                )
        r.within("test_fraction", self.test_fraction, 0.0, 1.0, closed=False)
        if self.val_fraction + self.test_fraction >= 1.0:
            r.add("data.val_fraction + data.test_fraction must be < 1 (no training images left)")
        if self.test_fraction == 0.0:
            r.add("data.test_fraction must be > 0: the held-out accuracy needs a test split")
        return r.problems

    def resolved_root(self) -> Path:
        return resolve_data_root(self.root)

    def verification_paths(self) -> list[Path]:
        """``verification`` resolved as ``root`` is (working dir, else project root)."""
        return [resolve_data_root(p) for p in self.verification]

    def datamodule_args(self, seed: int) -> dict[str, Any]:
        """Keyword arguments of ``FaceDataModule`` (plain values, no config objects)."""
        args = dataclasses.asdict(self)
        del args["verification"], args["verification_every"]  # the callback's, not data's
        args["root"] = str(self.resolved_root())
        return {**args, "seed": seed}


@dataclass
class ModelConfig:
    backbone: str = "iresnet18"
    """A registered backbone (iresnet18/34/50/100/200, mbf, mbf_large, tiny) or any timm
    model name."""
    embedding_dim: int = 512
    """Size of the face embedding."""
    pretrained: bool = False
    """Load timm's pretrained weights (needs network access; never the default)."""
    weights: str | None = None
    """A file of backbone weights stage 1 starts from instead of a random initialisation:
    ``torch.save(backbone.state_dict())`` (arcface_torch's ``backbone.pth`` for the same
    IResNet or MobileFaceNet, trained at the same ``data.image_size``), a facecluster
    checkpoint of stage 1 (its ``backbone.*``) or a sub-net's file. Read when stage 1
    starts from epoch 0, a resume's too while stage 1 has no checkpoint; the run keeps it
    absolute, and a resume may give it anew (moved since)."""
    dropout: float = 0.0
    """Dropout before the embedding layer."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the backbone builder (e.g. width for IResNet)."""
    compile: bool = False
    """torch.compile each backbone for training (docs/PERFORMANCE.md has its measured effect)."""
    channels_last: bool = False
    """Keep weights in channels-last memory order (a GPU speed option; docs/PERFORMANCE.md)."""
    shared_layers: int = 0
    """Stages of the stage-1 backbone (stem included) that every sub-net shares, frozen:
    stage 2 trains only the later stages, and routed inference runs the shared trunk once
    per face (IResNets and tiny: 1 to 4, MobileFaceNets: 1 to 3; 0: sub-nets are whole
    copies)."""

    def problems(self) -> list[str]:
        r = _Rules("model.")
        if self.pretrained and self.weights is not None:
            r.add(
                f"model.weights={self.weights!r} and model.pretrained=true both give stage 1's "
                "starting weights: set one"
            )
        r.positive("embedding_dim", self.embedding_dim)
        r.within("dropout", self.dropout, 0.0, 1.0, closed=False)
        r.within("shared_layers", self.shared_layers, 0, 4)
        return r.problems

    def backbone_args(self, image_size: int) -> dict[str, Any]:
        """Keyword arguments of ``create_backbone`` for this model section."""
        return {
            "name": self.backbone,
            "embedding_dim": self.embedding_dim,
            "image_size": image_size,
            "pretrained": self.pretrained,
            "dropout": self.dropout,
            **dict(self.kwargs),
        }


HEAD_MARGIN_BOUNDS = {"arcface": math.pi / 2, "cosface": 2.0, "adaface": 1.0}
"""The built-in heads' margins are in [0, bound): an angle for ArcFace, a cosine for
CosFace and AdaFace. A head of the user's own is bounded by its ``_validate_margin``."""

HEAD_GIVEN = {
    "num_classes": "facecluster gives it (the identities the head serves)",
    "embedding_dim": "set model.embedding_dim",
    **{key: f"set head.{key}" for key in ("name", "s", "m", "sample_rate")},
}
"""A head class's arguments that facecluster gives, each from one place: never from
``head.kwargs`` (nor AdaFace's ``h`` and ``t_alpha``, which ``head.h`` and
``head.t_alpha`` set; a head of the user's own may take arguments of those names)."""


@dataclass
class HeadConfig:
    name: str = "arcface"
    """Margin head: arcface, cosface, adaface, or one of the user's own registered with
    ``register_head`` in a module that ``imports`` names."""
    s: float = 64.0
    """Logit scale."""
    m: float | None = None
    """Margin (None: the head's default, 0.5 for ArcFace, 0.35 for CosFace, 0.4 for
    AdaFace)."""
    h: float | None = None
    """AdaFace: how far a face's standardised embedding norm moves its margin (None:
    0.333, the authors')."""
    t_alpha: float | None = None
    """AdaFace: momentum of the running mean and std of the batches' embedding norms
    (None: 0.01, the authors')."""
    init_from_class_means: bool = True
    """Stage 2: start each sub-net's head rows from its identities' class means."""
    sample_rate: float = 1.0
    """Partial FC: share of class centres per step, every positive kept (1: all)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the head's class: a head of your own's (e.g.
    ``head.kwargs.c=0.25``; null: the class's default); checked against its signature
    when a run starts. ``head.kwargs={}`` on the command line clears them."""

    def problems(self) -> list[str]:
        r = _Rules("head.")
        given = dict(HEAD_GIVEN)
        if self.name == "adaface":
            given.update({key: f"set head.{key}" for key in ("h", "t_alpha")})
        for key in sorted(set(self.kwargs) & set(given)):  # one place for each value
            r.add(f"head.kwargs.{key}: {given[key]}, not head.kwargs")
        # a name of a head of the user's own (register_head, in a module `imports`
        # names) is checked with the head's own bounds when a run starts
        # (builders.check_head): this layer cannot read the registry
        if not isinstance(self.name, str) or not self.name.strip():
            r.add(f"head.name={self.name!r} names no margin head (arcface, cosface, adaface)")
        r.positive("s", self.s)
        if not 0.0 < self.sample_rate <= 1.0:
            r.add(f"head.sample_rate must be in (0, 1], got {self.sample_rate}")
        bound = HEAD_MARGIN_BOUNDS.get(self.name)
        if self.m is not None and bound is not None:
            r.within("m", self.m, 0.0, bound, closed=False)
        given = {k: v for k, v in {"h": self.h, "t_alpha": self.t_alpha}.items() if v is not None}
        if self.name == "adaface":
            r.positive("h", self.h)
            if self.t_alpha is not None and not 0.0 < self.t_alpha <= 1.0:
                r.add(f"head.t_alpha must be in (0, 1], got {self.t_alpha}")
        elif given:  # set for nothing: said, not ignored
            named = " and ".join(f"head.{k}={v}" for k, v in given.items())
            unset = " ".join(f"head.{k}=null" for k in given)  # a resume's config.yaml keeps them
            r.add(f"{named}: AdaFace's, but head.name={self.name!r} (to unset: {unset})")
        return r.problems

    def head_args(self) -> dict[str, Any]:
        """Keyword arguments of ``create_head`` for this head section, beside the
        identity count and the embedding size (as ``ModelConfig.backbone_args``)."""
        return {
            "name": self.name,
            "s": self.s,
            "m": self.m,
            "sample_rate": self.sample_rate,
            **self.head_options(),
        }

    def head_options(self) -> dict[str, float]:
        """The head's own arguments beyond s and m that are set (AdaFace's ``h`` and
        ``t_alpha``, ``kwargs``' keys; unset or null: the head's defaults)."""
        options = {"h": self.h, "t_alpha": self.t_alpha, **dict(self.kwargs)}
        return {k: v for k, v in options.items() if v is not None}


@dataclass
class ClusteringConfig:
    num_clusters: int = 4
    """Number of clusters K, i.e. of sub-nets."""
    method: str = "kmeans"
    """kmeans (spherical, the paper), balanced (sizes differ by at most one, before
    ``overlap``'s extra members) or random (the ISM baseline)."""
    niter: int = 20
    """k-means iterations."""
    nredo: int = 1
    """k-means restarts (the best objective is kept)."""
    features: str = "means"
    """What k-means groups: means (the identities' class-mean embeddings, the paper) or
    head (the stage-1 head's rows: identities its classifier places close together, the
    ones it confuses). Routing uses the class means either way; method=random refuses head."""
    overlap: float = 0.0
    """Fraction of the identities that also join their next nearest cluster: those whose
    class mean is nearest a boundary between two centroids (0: a partition, the paper).
    Their images train both sub-nets; method=random refuses it."""

    def problems(self) -> list[str]:
        r = _Rules("clustering.")
        r.choice("method", self.method, ("kmeans", "balanced", "random"))
        r.choice("features", self.features, ("means", "head"))
        r.within("overlap", self.overlap, 0.0, 1.0)
        for name in ("num_clusters", "niter", "nredo"):
            r.positive(name, getattr(self, name))
        return r.problems


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd or adamw."""
    lr: float = 0.1
    """Peak learning rate (reached after the warm-up)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Weight decay (decoupled for AdamW); not applied to 1-D parameters (norm layers,
    biases, PReLU slopes) nor to a timm model's ``no_weight_decay()`` ones."""
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

    def problems(self, prefix: str) -> list[str]:
        r = _Rules(prefix)
        r.choice("name", self.name, ("sgd", "adamw"))
        r.choice("scheduler", self.scheduler, ("cosine", "poly", "constant"))
        r.positive("lr", self.lr)
        if self.warmup_epochs < 0:
            r.add(f"{prefix}warmup_epochs must be >= 0, got {self.warmup_epochs}")
        r.within("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        # torch refuses some of these only when the stage's optimizer is built (stage 2:
        # after stage 1), and a negative weight decay or poly power not at all
        r.within("momentum", self.momentum, 0.0, 1.0, closed=False)
        if self.weight_decay < 0:
            r.add(f"{prefix}weight_decay must be >= 0, got {self.weight_decay}")
        numbers = all(isinstance(b, int | float) and not isinstance(b, bool) for b in self.betas)
        # (OmegaConf takes a list as an item: [[0.9], 0.99] was a TypeError traceback)
        if len(self.betas) != 2 or not numbers or not all(0.0 <= b < 1.0 for b in self.betas):
            r.add(f"{prefix}betas must be two values in [0, 1), got {list(self.betas)}")
        r.positive("poly_power", self.poly_power)
        return r.problems


@dataclass
class StageConfig:
    max_epochs: int | None = None
    """Epochs of this stage (None: trainer.max_epochs)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule of this stage."""

    def problems(self, prefix: str) -> list[str]:
        r = _Rules(prefix)
        r.positive("max_epochs", self.max_epochs)
        return r.problems + self.optim.problems(f"{prefix}optim.")


@dataclass
class Stage2Config(StageConfig):
    jobs: int = 1
    """Stage-2 jobs: the sub-nets are split into this many groups, balanced by their
    clusters' training images, each trained by its own Lightning fit (a process of
    launcher=local, an array task of launcher=slurm). 1: one fit in the training process."""
    subnets: list[int] | None = None
    """Train only these sub-nets (cluster ids); None: every sub-net not finished yet."""
    group: int | None = None
    """Set by the launchers: this process trains only group ``group`` (0-based) of the
    ``jobs`` balanced groups of ``subnets``."""
    epoch_size: str = "largest"
    """Batches each sub-net takes per stage-2 epoch. largest: the largest cluster's
    (smaller clusters pass over their images more than once). mean: the average
    cluster's, so that a stage-2 epoch puts as many images through the K sub-nets as
    the training split holds, as a stage-1 epoch does (larger clusters see a fresh
    random part of their images each epoch)."""
    negatives: float = 0.0
    """Teach each sub-net to say "not mine": its training set also takes images of
    the other clusters' identities nearest its centroid, this many per image of its
    own (0.25: one in five of its images), labelled with one extra class. At test
    time that class's probability is taken from the sub-net's identities under
    route.decision=moe. 0: no such class (the paper)."""
    activation_checkpointing: bool = False
    """Recompute each sub-net's forward pass in the backward pass instead of keeping its
    activations: a training step then holds one sub-net's activations at a time instead
    of those of every sub-net the process trains (with ``data.batch_size`` images each),
    for one more forward pass per sub-net (about a third more stage-2 compute). The
    weights trained are the same. For K sub-nets per job on a GPU (docs/TRAINING.md)."""

    def problems(self, prefix: str) -> list[str]:
        r = _Rules(prefix)
        r.positive("jobs", self.jobs)
        r.choice("epoch_size", self.epoch_size, ("largest", "mean"))
        r.within("negatives", self.negatives, 0.0, 10.0)
        if self.group is not None and not 0 <= self.group < self.jobs:
            r.add(f"{prefix}group={self.group} must be in [0, {prefix}jobs={self.jobs})")
        if self.subnets is not None:
            if not self.subnets:
                r.add(f"{prefix}subnets is empty: name at least one sub-net, or null for all")
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in self.subnets):
                # OmegaConf takes a list as an item: [[0]] was a TypeError traceback
                r.add(f"{prefix}subnets: each item is a sub-net's number, got {self.subnets}")
            elif len(set(self.subnets)) != len(self.subnets):
                r.add(f"{prefix}subnets={self.subnets} names a sub-net twice")
        return super().problems(prefix) + r.problems


@dataclass
class LauncherConfig:
    name: str = "local"
    """local: stage-2 jobs run as processes of this machine; slurm: the run is submitted
    as SLURM jobs through submitit (stage 1 and clustering, the stage-2 array, assembly).
    ``launcher=slurm`` on the command line is short for ``launcher.name=slurm``."""
    parallel: int = 1
    """launcher=local: stage-2 jobs running at once."""

    def problems(self) -> list[str]:
        r = _Rules("launcher.")
        r.choice("name", self.name, ("local", "slurm"))
        r.positive("parallel", self.parallel)
        return r.problems


@dataclass
class SlurmConfig:
    partition: str | None = None
    """SLURM partition (None: the cluster's default)."""
    time_min: int = 1440
    """Time limit of each job in minutes; a job that reaches it is requeued and resumes."""
    nodes: int = 1
    """Nodes per job (stage 1 and each stage-2 job): multi-node DDP through srun."""
    gpus_per_node: int = 1
    """GPUs per node; one task per GPU (Lightning's SLURM environment starts no
    processes), but the assembly job, one task whose evaluation starts a torchrun
    process per GPU."""
    cpus_per_task: int = 8
    """CPU cores per task (data loading workers); per GPU in the assembly job."""
    mem_gb: int | None = None
    """Memory per node in GB (None: the partition's default)."""
    array_parallelism: int = 64
    """Stage-2 array tasks running at once."""
    account: str | None = None
    """Account to charge (sbatch --account)."""
    qos: str | None = None
    """Quality of service (sbatch --qos)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each job (module load, source .venv/bin/activate)."""
    additional: dict[str, Any] = field(default_factory=dict)
    """Other sbatch options, e.g. {constraint: a100, exclude: node12}."""

    def problems(self) -> list[str]:
        r = _Rules("slurm.")
        for name in ("time_min", "nodes", "cpus_per_task", "mem_gb", "array_parallelism"):
            r.positive(name, getattr(self, name))
        if self.gpus_per_node < 0:
            r.add(f"slurm.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        # OmegaConf takes a mapping as an item of a list[str]: `- echo node: $(hostname)`
        # is one, which submitit failed on at submission, after the run folder was made
        others = [line for line in self.setup if not isinstance(line, str)]
        if others:
            shown = repr(others[0])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            r.add(
                f"slurm.setup: each item is a shell line, got {shown}: YAML reads a line "
                "holding ': ' as a mapping; quote the line"
            )
        return r.problems


STAGES = ("all", "1", "cluster", "2", "assemble")
"""What ``stage=`` runs: everything missing, stage 1, the clustering unit, stage 2
(unfinished or named sub-nets), or the assembly of finished sub-nets (method=single:
of the finished stage 1) into results."""


FITTED_ROUTE = ("router_temperature", "subnet_temperature", "generalist_weight")
"""The ``route`` numbers of ``decision=moe`` fitted on the validation split, together
(``calibration.json``, :class:`~facecluster.inference.decision.MoeParams`)."""


@dataclass
class RouteConfig:
    top_m: int = 1
    """Clusters a face is routed to (nearest class means); their sub-nets run."""
    decision: str = "moe"
    """Decision unit: moe (the cluster's probability times the mixture of its sub-net's and
    its class means' probabilities, fitted on the validation split) or linear (alpha)."""
    router_temperature: float | None = None
    """moe: temperature of the class-mean softmax (None: fitted on the validation split)."""
    subnet_temperature: float | None = None
    """moe: temperature of each sub-net's softmax (None: fitted on the validation split)."""
    generalist_weight: float | None = None
    """moe: weight of the class means' prediction inside a cluster (None: fitted)."""
    calibration_faces: int = 10000
    """moe: validation faces the three numbers above are fitted on, a seeded sample when
    the split has more. Each face costs 40 temperatures x every identity's exponential
    (0.27 s of one CPU thread at 2M identities, computed from a measured 130 ns per
    identity): WebFace42M's whole validation split would take 156 hours, for three
    numbers (docs/EVALUATION.md)."""
    alpha: float = 0.0
    """decision=linear: score = (1 - alpha) * sub-net cosine + alpha * class-mean similarity."""
    index: str = "flat"
    """Search over the class means: flat (exact, every class mean, no faiss), or a faiss
    index: clusters (inverted lists = the clustering's clusters, route.ivf_nprobe nearest
    searched), ivf or hnsw."""
    ivf_nlist: int | None = None
    """IVF lists (None: about 4 * sqrt(identities))."""
    ivf_nprobe: int = 16
    """IVF lists (clusters, for index=clusters) searched per query."""
    ivf_codes: str = "flat"
    """What IVF lists hold (ivf, clusters): flat (float32) or sq8 (8-bit codes)."""
    lists_per_cluster: int = 1
    """index=clusters: lists each cluster is split into (k-means inside the cluster)."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    hnsw_ef_search: int = 256
    """HNSW candidates kept per search (more: slower, closer to exact; docs/SCALE.md)."""
    neighbours: int = 64
    """Class means an approximate index (clusters, ivf, hnsw) retrieves per query to rank
    the clusters (at least top_m * 8 are used); flat compares every class mean."""

    def problems(self) -> list[str]:
        r = _Rules("route.")
        r.choice("index", self.index, ("flat", "clusters", "ivf", "hnsw"))
        r.choice("ivf_codes", self.ivf_codes, ("flat", "sq8"))
        r.choice("decision", self.decision, ("moe", "linear"))
        r.positive("top_m", self.top_m)
        r.within("alpha", self.alpha, 0.0, 1.0)
        r.positive("calibration_faces", self.calibration_faces)
        r.positive("router_temperature", self.router_temperature)
        r.positive("subnet_temperature", self.subnet_temperature)
        if self.generalist_weight is not None:
            r.within("generalist_weight", self.generalist_weight, 0.0, 1.0)
        fitted = FITTED_ROUTE
        given = [name for name in fitted if getattr(self, name) is not None]
        if given and len(given) < len(fitted):  # they are fitted together, or all given
            r.add(
                f"route.{', route.'.join(given)} set without route."
                f"{', route.'.join(n for n in fitted if n not in given)}: set all three, or "
                "none to fit them on the validation split"
            )
        names = ("ivf_nlist", "ivf_nprobe", "hnsw_m", "hnsw_ef_search", "neighbours")
        for name in (*names, "lists_per_cluster"):
            r.positive(name, getattr(self, name))
        return r.problems

    def check_identities(self, identities: int) -> None:
        """ConfigError for settings the run's ``identities`` cannot serve, decided once
        their count is known (after the data scan, or from the run folder): an IVF index
        trains its lists on the class means, and faiss refused more lists than class
        means in the evaluation after both stages had trained."""
        if self.index == "ivf" and self.ivf_nlist is not None and self.ivf_nlist > identities:
            raise ConfigError(
                f"route.ivf_nlist={self.ivf_nlist} lists for route.index=ivf, but the run "
                f"has {identities} identities (faiss trains each list on class means): "
                f"use route.ivf_nlist <= {identities}, or null for about 4 * sqrt(identities)"
            )


def route_problems(route: Any) -> list[str]:
    """What is wrong with ``route`` settings that come from elsewhere than a config (an
    export's, a run's ``calibration.json``, the API's ``route=``), by :class:`RouteConfig`'s
    rules: each key one of its own, of its type, within its range (the missing ones take
    their defaults). A NaN temperature read from a file answered every face wrongly
    without a word; a string, a traceback at the first face."""
    if not isinstance(route, dict):
        return [f"route settings must be a mapping of key to value, got {str(route)[:40]}"]
    known = [f.name for f in fields(RouteConfig)]
    unknown = [key for key in route if key not in known]
    if unknown:
        return [
            f"route.{key}: no such setting{_suggest(str(key), known, 'route.')}" for key in unknown
        ]
    try:
        section = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RouteConfig), route))
    except OmegaConfBaseException as e:
        message = str(getattr(e, "msg", e)).splitlines()[0]
        return [f"route.{getattr(e, 'full_key', '')}: {message}"]
    found = [  # OmegaConf reads "0.05" as 0.05, but the caller keeps the given value
        f"route.{key}={value!r} is text, not a number"
        for key, value in route.items()
        if isinstance(value, str) and not isinstance(getattr(section, key), str)
    ]
    found += section.problems()
    named = {re.match(r"route\.\w+", problem)[0] for problem in found}
    return found + [p for p in _not_finite(section, "route.") if p.split()[0] not in named]


@dataclass
class EvalConfig:
    batch_size: int = 256
    """Batch size of the accuracy passes and of the throughput measurement."""
    timing_batches: int = 3
    """Timed passes per predictor over the one timing batch (the same seeded test faces
    for every predictor), interleaved across predictors, after one warm-up pass each;
    latency uses 20 calls on one image. The table shows the median."""
    device: str = "auto"
    """Where evaluation runs: auto (the GPU when there is one), cpu, cuda, cuda:N."""
    plots: bool = True
    """Write the top_m / alpha / class-mean plots (PNG, and W&B images with logger=wandb)."""
    sweeps: bool = True
    """Score and time the top_m and the generalist weight (or alpha) sweeps of a
    two-stage run: they answer in the table's one pass over the test split and reuse
    its embeddings, so they cost their decision-unit work per face and their throughput
    measurement (docs/EVALUATION.md); false: the table's rows alone."""
    after_training: bool = True
    """train.py ends by evaluating the run it trained (evaluate.py does it later otherwise)."""

    def problems(self) -> list[str]:
        r = _Rules("eval.")
        r.positive("batch_size", self.batch_size)
        r.positive("timing_batches", self.timing_batches)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            r.add(
                f"eval.device={self.device!r}: use auto, cpu, cuda or cuda:N "
                "(trainer.accelerator spells the GPU 'gpu'; torch devices spell it 'cuda')"
            )
        return r.problems


WANDB_PROJECT_FORBIDDEN = "/\\#?%:"
"""Characters W&B refuses in a project name (wandb's own check, at ``wandb.init``)."""


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

    def project_problems(self) -> list[str]:
        """W&B's rules for a project name: checked where W&B is logged to
        (``check_wandb_server``), not at every config load (a CSV-logged run's saved
        ``team/project`` would stop its resume)."""
        found = []
        bad = sorted({c for c in str(self.project) if c in WANDB_PROJECT_FORBIDDEN})
        if bad:
            found.append(
                f"wandb.project={self.project!r}: a W&B project name cannot hold "
                f"{' '.join(bad)} (W&B's rule; the team goes in wandb.entity)"
            )
        if len(str(self.project)) > 128:
            found.append(
                f"wandb.project: at most 128 characters (W&B's rule), got {len(self.project)}"
            )
        return found

    def problems(self) -> list[str]:
        r = _Rules("wandb.")
        if self.mode is not None:
            r.choice("mode", self.mode, ("online", "offline", "disabled"))
        # wandb refused them when stage 1's fit started, after the data scan
        for tag in self.tags:
            if not isinstance(tag, str):  # a mapping ([{a: 1}]) passed as an item
                r.add(f"wandb.tags: each tag is text, got {tag!r}")
            elif not 1 <= len(str(tag)) <= 64:
                r.add(f"wandb.tags: each tag is 1 to 64 characters (W&B's rule), got {tag!r}")
        return r.problems


# Trainer arguments facecluster sets itself, per stage.
RESERVED_TRAINER_KEYS = ("callbacks", "logger", "default_root_dir", "enable_checkpointing")

REMOVED_TRAINER_ARGS = {
    "gpus": "trainer.accelerator=gpu trainer.devices=N",
    "num_processes": "trainer.accelerator=cpu trainer.devices=N",
    "tpu_cores": "trainer.accelerator=tpu trainer.devices=N",
    "auto_select_gpus": "trainer.devices=auto",
    "resume_from_checkpoint": "resume=<run folder or checkpoint>",
    "replace_sampler_ddp": "trainer.use_distributed_sampler",
}
"""Lightning 1.x Trainer arguments that 2.0 removed, with what replaces them (the
closest name by spelling was wrong: ``gpus`` suggested ``plugins``)."""


def invalid(problems: list[str]) -> ConfigError:
    """The error that refuses a config for ``problems``, one per line."""
    return ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


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
    imports: list[str] = field(default_factory=list)
    """Python modules imported before the rest of the config is checked, such as one of
    yours whose ``register_backbone`` adds a backbone (docs/CONFIG.md); by name, from
    where this Python imports (installed, or on PYTHONPATH). The run keeps them: its
    resume, stage-2 jobs, evaluation and export import them too."""
    data: DataConfig = field(default_factory=DataConfig)
    """The images (a folder or a .rec), their split and loaders (docs/DATA.md)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone: stage 1's, and each sub-net's, warm-started from it."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The margin head of stage 1 and of each sub-net."""
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    """How identities are grouped into the sub-nets' clusters."""
    stage1: StageConfig = field(default_factory=StageConfig)
    """Stage 1: the backbone with one margin head over all identities."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2: K sub-nets, each warm-started from the stage-1 backbone."""
    stage: str = "all"
    """all (every missing step, in order), 1, cluster, 2 or assemble (docs/TRAINING.md)."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Where stage-2 jobs run: local processes or SLURM (docs/TRAINING.md)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """launcher=slurm: the resources of each job."""
    trainer: dict[str, Any] = field(default_factory=lambda: {"accelerator": "auto", "devices": 1})
    """Any lightning.Trainer argument, applied to both stages; trainer.max_epochs is the
    epochs of each stage that has no stageN.max_epochs of its own."""
    route: RouteConfig = field(default_factory=RouteConfig)
    """Routed inference: the router and the final decision unit."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluate.py and the table at the end of train.py."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases, with logger=wandb."""

    # ------------------------------------------------------------------ rules

    def problems(self) -> list[str]:
        """Every problem of this config (each section's, then those across sections)."""
        r = _Rules("")
        r.choice("method", self.method, ("clustered", "random", "single"))
        r.choice("logger", self.logger, ("wandb", "csv", "none"))
        r.choice("stage", self.stage, STAGES)
        if not 0 <= self.seed < 2**32:  # Lightning seeds numpy, whose seeds are 32-bit
            r.add(f"seed must be in [0, 2**32 - 1] = [0, 4294967295], got {self.seed}")
        name = self.run_name
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name):
            # ".." wrote the run's files into output_dir's parent, among the user's own
            r.add(f"run_name must be one folder's name (no '/', not '.' or '..'), got {name!r}")
        elif name is not None and len(os.fsencode(name)) > 255:  # "File name too long"
            r.add(f"run_name is {len(os.fsencode(name))} bytes long: a folder's name takes 255")
        elif name is not None and not self.resume and (why := name_problem(name)):
            # a blank folder or one whose name holds a line break, that a shell or a
            # listing of output_dir shows as nothing or as two names (a walkthrough); a
            # resume's run_name is its folder's, whatever it is
            r.add(f"run_name={name!r} {why}: {NAME_RULE}")
        elif name == CACHE_FOLDER:  # the run's files among the kept splits (cache_dir)
            r.add(f"run_name={name!r} is the folder of output_dir's cache: choose another name")
        _empty(r, "output_dir", self.output_dir, "name the folder the runs go in (default: runs)")
        _empty(
            r,
            "resume",
            self.resume,
            "name the run folder or checkpoint to continue, or leave resume out to start a new run",
        )
        found = r.problems
        for section in (self.data, self.model, self.head, self.clustering, self.launcher):
            found += section.problems()
        found += self.stage1.problems("stage1.") + self.stage2.problems("stage2.")
        for section in (self.route, self.eval, self.wandb, self.slurm):
            found += section.problems()
        # a NaN or inf is said once, as that (it also failed "> 0", "in [0, 1]" or a sum's
        # bound): the problems that name its key are left out
        not_finite = _not_finite(self)
        named = [re.compile(rf"(?<![\w.]){re.escape(p.split()[0])}\b") for p in not_finite]
        found = [p for p in found + self._across_sections() if not any(n.search(p) for n in named)]
        return found + not_finite + self._trainer_problems()

    def _across_sections(self) -> list[str]:
        found = []
        k = self.clustering.num_clusters
        # method=single has no clusters: their count bounds nothing (max_classes=2 was
        # refused against the default 4 clusters), nor does a count refused itself
        # (num_clusters=-1 was three errors)
        if self.two_stage and k >= 1 and self.route.top_m > k:
            found.append(f"route.top_m={self.route.top_m} is more than clustering.num_clusters={k}")
        numbers = [s for s in self.stage2.subnets or () if isinstance(s, int)]  # others: said
        bad = [s for s in numbers if s < 0 or (k >= 1 and s >= k)]
        if self.two_stage and bad:
            found.append(f"stage2.subnets: {bad} are not sub-nets of clustering.num_clusters={k}")
        if self.two_stage and k >= 1 and self.stage2.jobs > k:
            found.append(f"stage2.jobs={self.stage2.jobs} is more than clustering.num_clusters={k}")
        if not self.two_stage and self.stage in ("cluster", "2"):  # assemble: stage 1's
            found.append(f"stage={self.stage}: method=single has stage 1 only")
        if self.method == "clustered" and self.clustering.method == "random":
            found.append(
                "method=clustered with clustering.method=random: a random partition is the "
                "ISM baseline, method=random; k-means clusters are clustering.method=kmeans"
            )
        if self.method == "random" and self.clustering.method == "balanced":
            found.append(
                "method=random partitions at random: clustering.method=balanced contradicts it"
            )
        if self.method == "random" and self.clustering.features != "means":
            found.append(
                f"method=random partitions at random: clustering.features="
                f"{self.clustering.features} (what k-means groups) contradicts it"
            )
        if self.method == "random" and self.clustering.overlap > 0:
            found.append(
                f"method=random partitions at random: clustering.overlap="
                f"{self.clustering.overlap} (identities near a boundary) contradicts it"
            )
        if self.two_stage and self.data.max_classes is not None and self.data.max_classes < k:
            found.append(
                f"data.max_classes={self.data.max_classes} is smaller than "
                f"clustering.num_clusters={k}: every cluster needs identities"
            )
        trainer_epochs = self.trainer.get("max_epochs")
        if trainer_epochs not in (None, -1) and not (_whole(trainer_epochs) and trainer_epochs > 0):
            found.append(f"trainer.max_epochs must be a whole number > 0, got {trainer_epochs!r}")
        route = self.route
        fitted = (route.router_temperature, route.subnet_temperature, route.generalist_weight)
        if (
            self.two_stage
            and self.data.val_fraction == 0
            and route.decision == "moe"
            and (None in fitted)
        ):
            found.append(
                "data.val_fraction=0 leaves route.decision=moe no validation faces to fit "
                "route.router_temperature, route.subnet_temperature and "
                "route.generalist_weight on: give those three, or keep a validation split"
            )
        unset = [n for n in ("stage1", "stage2") if getattr(self, n).max_epochs is None]
        if trainer_epochs == -1 and unset:
            # Lightning's "no limit": a stage would never end, and stage 2 never start
            found.append(
                f"trainer.max_epochs=-1 would train {' and '.join(unset)} without end: give "
                f"trainer.max_epochs a count, or {' and '.join(n + '.max_epochs' for n in unset)}"
            )
        elif trainer_epochs is None:
            found += [
                f"{n}.max_epochs or trainer.max_epochs must be set (a -c file replaces "
                "configs/default.yaml, which sets them: -c configs/default.yaml first builds "
                "on it)"
                for n in unset
            ]
        if trainer_epochs is not None and None not in (
            self.stage1.max_epochs,
            self.stage2.max_epochs,
        ):
            found.append(
                f"trainer.max_epochs={trainer_epochs} would be ignored: "
                f"stage1.max_epochs={self.stage1.max_epochs} and stage2.max_epochs="
                f"{self.stage2.max_epochs} are set; set those instead and drop "
                "trainer.max_epochs (trainer.max_epochs=null), or null them "
                "(stage1.max_epochs=null stage2.max_epochs=null) to use trainer.max_epochs"
            )
        return found

    def training_problems(self) -> list[str]:
        """What a command that trains refuses (``pipeline.train``), and evaluation and
        export of a run saved with it do not:

        - ``trainer.max_time``: Lightning ends a fit at it as if it were done, so the stage
          would be recorded finished (stage 2 warm-started from a half-trained backbone,
          the missing epochs refused to any resume);
        - for a new run, a warm-up longer than its stage: the learning rate only ramps
          up, never reaches its peak nor decays (``lr_factor``). A run saved with one is
          still resumed (a resume may not change a trained stage's ``optim``). Checked
          against the stage's epochs, what is known before the data is read (a binding
          ``trainer.max_steps`` ends a stage sooner, by a count of steps per epoch not
          known yet)."""
        found = []
        if self.trainer.get("max_time") is not None:
            found.append(
                f"trainer.max_time={self.trainer['max_time']} is not supported: a stage it "
                "cut short would be recorded as finished. Stop the run instead (SIGTERM or "
                "Ctrl-C, or the job's time limit under launcher=slurm) and continue it with "
                "resume=<run folder>"
            )
        if self.resume:
            return found
        for n in (1, 2) if self.two_stage else (1,):
            warmup = self.stage_config(n).optim.warmup_epochs
            counted = (n,) if self.two_stage else (1, 2)  # single: both stages' epochs
            source = self.epochs_source(n)
            # epochs not a count (unset, -1): refused above, with their own message
            if warmup > 0 and all(self._epochs_known(m) for m in counted):
                epochs = self.stage_epochs(n)
                # longer, not equal: a one-epoch try-out keeps the default 1-epoch warm-up
                if warmup > epochs:
                    found.append(
                        f"stage{n}.optim.warmup_epochs={warmup:g} is longer than stage {n}'s "
                        f"{epochs} epoch{'s' * (epochs != 1)} ({source}): its learning rate "
                        "would only ramp up, never reach its peak nor decay; shorten the "
                        "warm-up or train more epochs"
                    )
        return found

    def _epochs_known(self, n: int) -> bool:
        """Whether stage ``n``'s epochs are a count (its own, else trainer.max_epochs)."""
        epochs = self.stage_config(n).max_epochs
        if epochs is None:
            epochs = self.trainer.get("max_epochs")
        return _whole(epochs) and epochs > 0

    def _trainer_problems(self) -> list[str]:
        found = []
        strategy = self.trainer.get("strategy")
        # Lightning takes a strategy's name in any case (DDP_SPAWN is ddp_spawn)
        if isinstance(strategy, str) and strategy.lower().startswith(UNSUPPORTED_STRATEGIES):
            found.append(
                f"trainer.strategy={strategy!r}: the margin heads are sharded across "
                "processes (Partial FC), which only ddp supports, one process per device "
                "started by Lightning, torchrun or srun: use trainer.strategy=ddp"
            )
        # values that train nothing: stage 1 "finished" without a checkpoint, and stage 2,
        # which starts from it, then stopped with a FileNotFoundError (the run stuck)
        t = self.trainer
        limit = t.get("limit_train_batches")
        if _number(limit) and limit == 0:
            found.append(
                f"trainer.limit_train_batches={limit} trains no batch, so stage 1 would end "
                "without the checkpoint stage 2 starts from: use a count > 0 or a fraction "
                "in (0, 1]"
            )
        limit = t.get("limit_test_batches")
        if _number(limit) and limit == 0:  # trainer.test() gave [] and an IndexError
            found.append(
                f"trainer.limit_test_batches={limit} tests nothing, and each stage ends with "
                "its test (the held-out accuracy in results.json): use a count > 0 or a "
                "fraction in (0, 1]"
            )
        overfit = t.get("overfit_batches")
        if _number(overfit) and overfit != 0:  # Lightning swaps the train sampler
            found.append(
                f"trainer.overfit_batches={overfit}: stage 2's sampler serves each sub-net "
                "its own cluster's batches and cannot be replaced by Lightning's (stage 2 "
                "failed after stage 1 had trained): to train on a few batches use "
                "trainer.limit_train_batches=N"
            )
        if _whole(t.get("max_steps")) and t["max_steps"] == 0:
            found.append(
                "trainer.max_steps=0 trains no step, so stage 1 would end without the "
                "checkpoint stage 2 starts from: use a count > 0, or -1 for no limit"
            )
        fast = t.get("fast_dev_run")
        if fast is True or (_whole(fast) and fast > 0):
            fast = "true" if fast is True else fast  # as written
            found.append(
                f"trainer.fast_dev_run={fast} saves no checkpoint, so stage 2 could not start "
                "from stage 1: for a quick run use configs/smoke.yaml, or "
                "trainer.limit_train_batches=N with stage1.max_epochs=1 stage2.max_epochs=1"
            )
        clip = t.get("gradient_clip_val")
        if _number(clip) and not clip >= 0:  # NaN too
            found.append(
                f"trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got {clip}"
            )
        # counts and switches Lightning takes unchecked: a string or a zero passed the
        # Trainer and failed at the fit, after the run folder was made (a ZeroDivisionError
        # from check_val_every_n_epoch=0), or was taken as true (sync_batchnorm=abc)
        for key, least in TRAINER_COUNTS.items():
            value = t.get(key)
            if value is not None and not (_whole(value) and value >= least):
                found.append(f"trainer.{key} must be a whole number >= {least}, got {value!r}")
        for key in TRAINER_SWITCHES:
            value = t.get(key)
            if value is not None and not isinstance(value, bool):
                found.append(f"trainer.{key} must be true or false, got {value!r}")
        # a string here was named only inside Lightning's TypeError, after every trainer
        # setting ("'<' not supported between instances of 'str' and 'int'")
        steps = t.get("max_steps")
        if steps is not None and not (_whole(steps) and steps >= -1):
            found.append(
                f"trainer.max_steps must be a whole number >= -1 (-1: no limit), got {steps!r}"
            )
        for key in TRAINER_FRACTIONS:
            value = t.get(key)
            whole = _whole(value) and value >= 0
            if value is not None and not (whole or (isinstance(value, float) and 0 <= value <= 1)):
                found.append(
                    f"trainer.{key} must be a count (a whole number >= 0) or a fraction in "
                    f"[0, 1], got {value!r}"
                )
        # batches (0: a ZeroDivisionError at the fit), a fraction of an epoch, or a time
        # ("00:00:30:00", {minutes: 30}), which Lightning parses itself
        every = t.get("val_check_interval")
        batches = _whole(every) and every >= 1
        fraction = isinstance(every, float) and 0 < every <= 1
        if every is not None and not (batches or fraction or isinstance(every, str | dict)):
            found.append(
                "trainer.val_check_interval must be a count of batches (a whole number >= 1), "
                f"a fraction of an epoch in (0, 1], or a time ('00:00:30:00'), got {every!r}"
            )
        # Lightning's import only for a key that Lightning 2.6 does not take
        valid = TRAINER_ARGS if TRAINER_ARGS.issuperset(self.trainer) else _trainer_args()
        for key in self.trainer:
            if key in RESERVED_TRAINER_KEYS:
                found.append(f"trainer.{key} is set by facecluster itself (see docs/CONFIG.md)")
            elif key in REMOVED_TRAINER_ARGS:
                found.append(
                    f"trainer.{key} is a Lightning 1.x argument that Lightning 2 removed: "
                    f"use {REMOVED_TRAINER_ARGS[key]}"
                )
            elif key not in valid:
                found.append(
                    f"unknown Trainer argument 'trainer.{key}'" + _suggest(key, valid, "trainer.")
                )
        return found

    def validate(self) -> Config:
        """Raise every problem as one ConfigError; returns self."""
        if found := self.problems():
            raise invalid(found)
        return self

    # ------------------------------------------------------------ derived values

    @property
    def two_stage(self) -> bool:
        """True for the clustered and random methods (sub-nets); False for single."""
        return self.method != "single"

    @property
    def assembles(self) -> bool:
        """True when this command ends the run: it assembles the results (and then
        evaluates, with ``eval.after_training``); not stage=1/cluster or a stage-2 job."""
        return self.stage in ("all", "assemble") or (
            self.stage == "2" and self.stage2.group is None
        )

    def starts_local_jobs(self, jobs: int | None = None) -> bool:
        """Whether this command trains stage 2 as local jobs it starts (``launcher=local``,
        more than one job, not itself a job). ``jobs``: the jobs a resume's plan holds
        (``stage2.jobs`` when None)."""
        jobs = self.stage2.jobs if jobs is None else jobs
        return (
            self.launcher.name == "local"
            and self.two_stage
            and self.stage in ("all", "2")
            and jobs > 1
            and self.stage2.group is None
        )

    def stage_config(self, n: int) -> StageConfig:
        return self.stage1 if n == 1 else self.stage2

    def stage_epochs(self, n: int) -> int:
        """Epochs of stage ``n``: its own max_epochs, else trainer.max_epochs.

        With method=single there is no stage 2: stage 1 trains for both stages' epochs,
        so the single-model baseline gets the same total epochs as the two-stage method.
        """
        epochs = int(self.stage_config(n).max_epochs or self.trainer["max_epochs"])
        if not self.two_stage and n == 1:
            epochs += int(self.stage2.max_epochs or self.trainer["max_epochs"])
        return epochs

    def epochs_source(self, n: int) -> str:
        """The setting :meth:`stage_epochs` takes stage ``n``'s epochs from, as a message
        names it."""
        if not self.two_stage:
            return "stage 1 + stage 2 epochs: method=single"
        own = self.stage_config(n).max_epochs is not None
        return f"stage{n}.max_epochs" if own else "trainer.max_epochs"

    def cache_dir(self) -> Path:
        """``output_dir/.cache``: what the runs here may reuse instead of recomputing (the
        label pass over a ``.rec`` without identity records, the split)."""
        return Path(self.output_dir).expanduser().resolve() / CACHE_FOLDER

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (stored in checkpoints and in the run folder), its
        values as they are: resolved when the config was loaded (a ``${`` left in one is
        text, given as ``\\${``; resolving it again failed once the run had started)."""
        # not through OmegaConf, which read a text's ${ as an interpolation again (an
        # unclosed one, output_dir='runs\${x', stopped the run at config.yaml)
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """A YAML file that loads as this config (``config.yaml``): a ``${`` in a value is
        written ``\\${``, text as given, not an interpolation."""
        return _quote_none(OmegaConf.to_yaml(_literal(self.to_dict())))

    def run_settings(self) -> Config:
        """This config without what one command runs now (``stage``, ``stage2.subnets``,
        ``stage2.group``, ``resume``), nor its folder's name (``run_name``: a resume takes
        it from the folder): what the run folder keeps for later resumes (its
        ``config.yaml``, which ``-c`` starts a new run from, resumed or not). Its data
        paths are absolute: a relative ``data.root`` was read from the project root by a
        resume from another working dir, and the same folder written absolute was refused."""
        stage2 = dataclasses.replace(self.stage2, subnets=None, group=None)
        data = dataclasses.replace(
            self.data,
            root=os.path.abspath(self.data.resolved_root()),
            verification=[os.path.abspath(p) for p in self.data.verification_paths()],
        )
        weights = self.model.weights  # read again by a resume before stage 1's checkpoint
        model = dataclasses.replace(
            self.model,
            weights=None if weights is None else os.path.abspath(os.path.expanduser(weights)),
        )
        return dataclasses.replace(
            self, stage="all", stage2=stage2, data=data, model=model, resume=None, run_name=None
        )

    def with_overrides(self, overrides: list[str] | tuple) -> Config:
        """This config with ``key=value`` overrides applied, validated (both stages'
        epochs among them replace ``trainer.max_epochs``, as on a new run's command line)."""
        merged = OmegaConf.merge(OmegaConf.structured(Config), _literal(self.to_dict()))
        if overrides:
            _epochs_given(merged, list(overrides))
        return _to_config(_merge_overrides(merged, list(overrides)))


def _plain(values: Any) -> Any:
    """``values`` with tuples as lists (as a config file writes them)."""
    if isinstance(values, dict):
        return {key: _plain(value) for key, value in values.items()}
    if isinstance(values, list | tuple):
        return [_plain(value) for value in values]
    return values


def _quote_none(text: str) -> str:
    """OmegaConf's YAML ``text`` with each text value ``None`` quoted, which OmegaConf
    writes plain: a config file's plain ``None`` means null outside text keys, and is
    refused there (``model.kwargs.x='None'``'s run could not be resumed)."""
    spans = []
    nodes = [yaml.compose(text, Loader=yaml.SafeLoader)]  # marks count characters
    while nodes:
        node = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            nodes += [value for _, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            nodes += node.value
        elif isinstance(node, yaml.ScalarNode) and node.style is None and node.value == "None":
            spans.append((node.start_mark.index, node.end_mark.index))
    for start, end in sorted(spans, reverse=True):
        text = text[:start] + "'None'" + text[end:]
    return text


def _literal(values: Any) -> Any:
    """``values`` (a loaded config's plain values) with every ``${`` in a text escaped,
    for OmegaConf to take them as text again: they were resolved when loaded."""
    if isinstance(values, str):
        return values.replace("${", "\\${")
    if isinstance(values, dict):
        return {key: _literal(value) for key, value in values.items()}
    if isinstance(values, list | tuple):
        return [_literal(value) for value in values]
    return values


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


def _dotted(value: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping (``{"project": "x"}`` -> ``["project"]``)."""
    if not isinstance(value, Mapping):
        return [prefix.rstrip(".")] if prefix else []
    return [k for key, v in value.items() for k in _dotted(v, f"{prefix}{key}.")]


def _where(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    return f" (in '{key}')" if key else ""


FOREIGN_KEYS = {
    "defaults": "Hydra's defaults lists are not read here; config files are composed with "
    "-c, later ones winning (-c configs/default.yaml -c configs/method/random.yaml)",
    "experiment": "an experiment is a config file, given with -c "
    "(-c configs/experiment/lfw423.yaml)",
    "ckpt_path": "resume=<run folder or .ckpt> continues a run",
    "resume_from_checkpoint": "resume=<run folder or .ckpt> continues a run",
}
"""Keys of Hydra's and Lightning's command lines, with what facecluster takes instead."""


def _merge(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    """Merge with messages that name the key and suggest valid ones."""
    for key, given in _switches_given_others(Config, other):  # OmegaConf took 2 for true
        raise ConfigError(f"{source}: {key} must be true or false, got {given!r}")
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key
        elsewhere = FOREIGN_KEYS.get(key.split(".")[0])
        hint = f": {elsewhere}" if elsewhere else _suggest(key, _all_keys(Config))
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}") from None
    except ValidationError as e:
        if e.full_key:
            msg = str(e.msg).splitlines()[0]
            if "is not a ListConfig" in msg or "is not a TupleConfig" in msg:
                # OmegaConf's "AnyNode is not a ListConfig, TupleConfig, list, or tuple"
                msg = f"it takes a list, as {e.full_key}=[a,b]"
            elif "to Dict[" in msg:  # trainer=gpu: "Cannot assign str to Dict[str, Any]"
                msg = (
                    f"it takes named values, as {e.full_key}.<name>=value or "
                    f"{e.full_key}={{name: value}}"
                )
            elif "'DictConfig'" in msg:  # logger.project=x, seed.a=1: a key under a value
                tree = other if isinstance(other, DictConfig) else OmegaConf.create(other)
                given = OmegaConf.select(tree, e.full_key)
                inner = _dotted(
                    OmegaConf.to_container(given) if isinstance(given, DictConfig) else {}
                )
                if not inner:  # seed={}: an empty section given
                    msg = f"{e.full_key} is a value, given an empty section {{}}"
                else:  # keys of the same name elsewhere (wandb.project), else none
                    tried = f"{e.full_key}.{inner[0]}"
                    leaf = tried.rsplit(".", 1)[-1]
                    same = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == leaf]
                    hint = f"; did you mean: {', '.join(same[:3])}?" if same else ""
                    msg = f"{e.full_key} is a value, not a section (no {tried}){hint}"
            raise ConfigError(f"{source}: wrong type for '{e.full_key}': {msg}") from None
        for key, section, given in _sections_given_values(Config, other):
            # "data=3", "stage1: {optim: sgd}": OmegaConf names the class, not the key
            leaves = ", ".join(f.name for f in fields(section))
            raise ConfigError(
                f"{source}: '{key}' is a section, given the value {given!r}: give its "
                f"keys instead ({leaves}), as {key}.<key>=value"
            ) from None
        # a tuple of the wrong length, or of items of the wrong type (whose message
        # OmegaConf leaves a template: "Value '$VALUE' of type '$VALUE_TYPE' could not")
        msg = re.sub(r"Value '\$VALUE' of type '\$VALUE_TYPE'", "an item", str(e).splitlines()[0])
        raise ConfigError(f"{source}: wrong type: {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError:  # "Cannot merge incompatible container types", naming no key
        for key in _lists_given_items(base, other):
            raise ConfigError(
                f"{source}: '{key}' takes a whole list, as {key}=[a,b]: an item cannot be "
                f"set by its index ({key}.0=...)"
            ) from None
        for key, takes in _containers_given_otherwise(base, other):  # model.kwargs=[1]
            example = f"{key}={{name: value}}" if takes == "mapping" else f"{key}=[a,b]"
            raise ConfigError(f"{source}: '{key}' takes a {takes}, as {example}") from None
        raise


def _lists_given_items(base: Any, values: Any, prefix: str = "") -> Iterator[str]:
    """The keys of ``base`` that hold a list where ``values`` gives a mapping
    (``wandb.tags.0=x``: OmegaConf's TypeError named no key)."""
    if not isinstance(base, DictConfig) or not isinstance(values, (dict, DictConfig)):
        return
    for key, value in values.items():
        if key not in base:
            continue
        node = base[key]  # a list's, a tuple's or a section's own config object
        if isinstance(node, Sequence) and isinstance(value, (dict, DictConfig)):
            yield f"{prefix}{key}"
        elif isinstance(node, DictConfig):
            yield from _lists_given_items(node, value, f"{prefix}{key}.")


def _sections_given_values(
    schema: type, values: Any, prefix: str = ""
) -> Iterator[tuple[str, type, Any]]:
    """Each section of ``schema`` (a nested dataclass) that ``values`` gives a plain
    value: its dotted key, its dataclass and the value."""
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=False)
    if not isinstance(values, dict):
        return
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if not is_dataclass(default) or values.get(f.name) is None:
            continue
        given = values[f.name]
        if isinstance(given, dict):
            yield from _sections_given_values(type(default), given, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", type(default), given


def _switches_given_others(
    schema: type, values: Any, prefix: str = ""
) -> Iterator[tuple[str, Any]]:
    """Each true-or-false key of ``schema`` that ``values`` gives something else (a
    number, a word), with that value: OmegaConf took ``eval.after_training=2`` for true
    and ``0`` for false, where the trainer's switches are refused it."""
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=False)
    if not isinstance(values, dict):
        return
    for f in fields(schema):
        if f.name not in values:
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        given = values[f.name]
        if is_dataclass(default):
            yield from _switches_given_others(type(default), given, f"{prefix}{f.name}.")
        elif f.type == "bool" and given is not None and not isinstance(given, bool):
            if not (isinstance(given, str) and given.startswith("${")):  # interpolation
                yield f"{prefix}{f.name}", given


def _containers_given_otherwise(base: DictConfig, other: DictConfig | dict) -> Iterator[tuple]:
    """``(key, "mapping" or "list")`` of each key of a section whose value in ``base``
    is a mapping given a list, or the reverse: what OmegaConf's "Cannot merge
    incompatible container types" does not name."""
    tree = OmegaConf.to_container(other) if isinstance(other, DictConfig) else other
    for section, values in (tree or {}).items():
        if not isinstance(values, dict) or not isinstance(base.get(section), DictConfig):
            continue
        for key, value in values.items():
            current = base[section].get(key)
            if isinstance(current, DictConfig) and isinstance(value, list):
                yield f"{section}.{key}", "mapping"
            elif isinstance(current, ListConfig) and isinstance(value, dict):
                yield f"{section}.{key}", "list"


WHOLE_MAPPINGS = ("model.kwargs", "head.kwargs")
"""Free-form argument mappings that a command line's ``key={...}`` replaces whole
(``head.kwargs={}`` clears the arguments a run's config.yaml keeps for its head, before
a resume gives the sub-nets another); sections merge key by key."""


def _merge_overrides(base: DictConfig, overrides: list[str]) -> DictConfig:
    """:func:`_merge` of command-line overrides; an error that names no key is raised
    again for the override that fails on its own, which it names."""
    try:
        merged = _merge(base, parse_overrides(overrides), "command line")
    except ConfigError:
        for override in overrides:
            _merge(base, parse_overrides([override]), f"command line, {override}")
        raise
    keys = [o.partition("=")[0].strip() for o in overrides]
    for key in WHOLE_MAPPINGS:  # its last whole value, and its keys given after it
        if key not in keys:
            continue
        last = max(i for i, k in enumerate(keys) if k == key)
        after = zip(overrides[last:], keys[last:], strict=True)
        given = [o for o, k in after if k == key or k.startswith(key + ".")]
        OmegaConf.update(merged, key, OmegaConf.select(parse_overrides(given), key), merge=False)
    return merged


MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_modules(names: Sequence[str], key: str = "imports") -> None:
    """Import each module of ``names`` (what registers a backbone of the user's own).

    Raises:
        ConfigError: naming ``key[i]``: not a module name, not importable, or its import
            failed (the exception and the line of the user's file that raised it).
    """
    for i, name in enumerate(names):
        given = f"{key}[{i}]={name!r}"
        if not isinstance(name, str) or not MODULE_NAME.fullmatch(name):
            raise ConfigError(f"{given} is not a module name (such as mypackage.backbones)")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"{given} cannot be imported ({e}): it must be importable by this Python "
                "(installed, or its folder on PYTHONPATH)"
            ) from None
        except Exception as e:  # the user's module raised: say where, in one line
            frames = traceback.extract_tb(e.__traceback__)
            ours = str(Path(__file__).resolve().parent)  # the last frame outside facecluster
            frame = next((f for f in reversed(frames) if not f.filename.startswith(ours)), None)
            frame = frame or frames[-1]
            raise ConfigError(
                f"{given}: importing it failed at {frame.filename}:{frame.lineno}: "
                f"{type(e).__name__}: {e}"
            ) from None
    _share_import_roots(names)


def _share_import_roots(names: Sequence[str]) -> None:
    """Put the folder each of ``names`` was imported from on ``PYTHONPATH``, for the
    run's other processes (stage-2 jobs run ``python -m facecluster.cli``): a module
    beside ``train.py``, found through the script's folder, was imported by the first
    process and not by the jobs, which failed after stage 1. Installed modules are
    found anyway and are left out."""
    if not names:  # every config load of a run without imports: nothing to look up
        return
    import site
    import sys

    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    given = os.environ.get("PYTHONPATH", "")
    paths = given.split(os.pathsep) if given else []
    for name in names:
        top = sys.modules.get(name.split(".")[0])
        file = getattr(top, "__file__", None)
        if not file:  # a namespace package: no one folder
            continue
        root = Path(file).resolve().parent
        root = root.parent if Path(file).name == "__init__.py" else root
        if str(root) not in installed and str(root) not in paths:
            paths.append(str(root))
    if os.pathsep.join(paths) != given:
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def _to_config(merged: DictConfig) -> Config:
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # an interpolation to a key that is not there
        hint = ""
        if isinstance(e, InterpolationResolutionError):  # a path with "${" in its name
            hint = "; a '${' meant as text is written '\\${' (quoted, in a shell)"
        raise ConfigError(str(e).splitlines()[0] + _where(e) + hint) from None
    assert isinstance(cfg, Config)
    import_modules(cfg.imports)
    cfg.trainer = dict(cfg.trainer)
    if cfg.method == "random" and cfg.clustering.method == "kmeans":  # the default's
        # the ISM baseline partitions at random: its config.yaml said kmeans
        cfg.clustering.method = "random"
    return cfg.validate()


def _string_keys(
    schema: type, prefix: str = "", types: tuple[str, ...] = ("str", "str | None")
) -> list[str]:
    """The dotted keys of a dataclass schema whose values are strings (or null); with
    ``types=TEXT_LISTS``, those whose values are lists of strings."""
    keys = []
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.extend(_string_keys(type(default), prefix + f.name + ".", types))
        elif f.type in types:
            keys.append(prefix + f.name)
    return keys


TEXT_LISTS = ("list[str]", "list[str] | None")


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` strings (Hydra-style dotlist) to a config; values are YAML-typed,
    except for string keys, which take the text as written (``run_name=1e3`` is the
    name ``1e3``, not ``1000.0``; ``resume=/runs/a #2`` keeps its ``#2``) but for one
    pair of quotes around it (``run_name='my run'``, as Hydra reads it); YAML's null
    (``null``, ``~``, ``Null``, ``NULL``) still unsets an optional one. Values YAML reads
    otherwise than they look are refused (:func:`_refuse_yaml_surprises`)."""
    for override in overrides:  # Hydra's prefixes: a generic message named no fix
        key = override.partition("=")[0]
        if not override.isascii():
            # a file or folder name's bytes that are not UTF-8, kept by Python as
            # surrogates: config.yaml cannot hold them, nor torch.load open such a path
            # (data.root failed at the config's save once the run folder was made,
            # run_name once stage 1 had trained: a review)
            try:
                override.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(
                    f"command line, {ascii(override)}: holds bytes that are not UTF-8 (a "
                    "file or folder name of this machine's); a run's config.yaml cannot "
                    "hold them: rename it"
                ) from None
        if key.startswith("+") and "=" in override:
            raise ConfigError(
                f"command line, {override}: overrides take no '+' (every key of the schema "
                f"is there already, and trainer.* takes any Trainer argument): write "
                f"{override.lstrip('+')}"
            )
        if key.startswith("~"):
            unset = (
                f"to unset an optional key, write {key[1:]}=null"
                if _optional(key[1:]) is not False
                else f"{key[1:]} is not optional: give it a value"
            )
            raise ConfigError(f"command line, {override}: overrides take no '~'; {unset}")
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    # launcher=slurm selects the launcher, as a config group would
    overrides = [f"launcher.name={o[9:]}" if o.startswith("launcher=") else o for o in overrides]
    strings = set(_string_keys(Config))
    merged = OmegaConf.create({})
    for override in overrides:  # in order: a key given twice keeps its last value
        key, _, value = override.partition("=")
        where = f"command line, {override}"
        if key in strings:
            _refuse_yaml_surprises(where, value, text=True)
        elif value.strip():  # its items and a section's keys too (wandb.tags=[010])
            with contextlib.suppress(yaml.YAMLError):  # from_dotlist names it, below
                node = yaml.compose(value, Loader=_YAML_LOADER)
                _refuse_yaml_surprises_in(
                    node, lambda *_, where=where: where, key + ".", none_is_text=False
                )
        if key == "logger" and value in YAML_NULLS:  # "Incompatible value 'None' for ..."
            raise ConfigError(f"{where}: no logger is logger=none")
        if key in strings and value in YAML_NULLS and _optional(key):
            value = "null"  # as a number key reads them (wandb.entity=~ was the text ~)
        try:
            if key in strings and value != "null" and (value.strip() or key in _SAID_EMPTY):
                OmegaConf.update(merged, key, command_line_text(value), merge=True)
            elif not value.strip():  # YAML's null (data.max_classes= unset it, silently),
                # and a text key's empty string (slurm.partition=: the default partition)
                raise ConfigError(
                    f"{where}: no value (give one; an optional key is unset with {key}=null)"
                )
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except yaml.YAMLError as e:  # "data.verification=[a.bin": no closing bracket
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"{where}: the value is not valid YAML ({problem}); quote an override with "
                "spaces or brackets as one shell word"
            ) from None
        except OmegaConfBaseException as e:  # an unclosed ${ (a traceback), a null key
            hint = ""
            if isinstance(e, GrammarParseError):
                hint = "; a '${' meant as text is written '\\${' (quoted, in a shell)"
            raise ConfigError(f"{where}: {str(e).splitlines()[0]}{hint}") from None
    return merged


def command_line_text(value: str) -> str:
    """A text key's command-line value as the key takes it: as written, but for one pair
    of quotes around it, as Hydra reads them (``run_name='my run'`` is ``my run``)."""
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _optional(key: str) -> bool | None:
    """Whether the schema's ``key`` may be null (None: no such key, or under a mapping)."""
    schema: Any = Config
    *sections, leaf = key.split(".")
    for name in sections:
        schema = typing.get_type_hints(schema).get(name) if is_dataclass(schema) else None
    hint = typing.get_type_hints(schema).get(leaf) if is_dataclass(schema) else None
    return None if hint is None else type(None) in typing.get_args(hint)


YAML_NULLS = ("null", "Null", "NULL", "~")
"""What YAML reads as null: a string key's override takes them so too."""


def _refuse_yaml_surprises(where: str, value: str, text: bool) -> None:
    """Plain values YAML 1.1 (OmegaConf's) reads otherwise than they look, refused
    where they were taken without a word (``where``: the override, or the file, line
    and key): ``None`` (text, where a Python user means null), and for a key that is
    not text (``text``), ``010`` (octal: 8) and ``2:00:00`` (base 60: 7200, which
    ``slurm.time_min``, in minutes, took for 5 days). Quoted, each is text."""
    quoted = "\"key='...'\" in a shell, 'text' in a file"
    if value == "None":
        raise ConfigError(
            f"{where}: YAML's null is written null (an optional key is unset with null; "
            f"no logger is logger=none); None would be the text 'None' (quote it, as "
            f"{quoted}, to mean that)"
        )
    if text:
        return
    if re.fullmatch(r"[-+]?0[0-7_]+", value):
        raise ConfigError(
            f"{where}: YAML reads a number with a leading 0 as octal "
            f"({int(value.replace('_', ''), 8)}): write it without the 0 (or quote it as "
            f"text, {quoted})"
        )
    # base 60: a whole number from 1 (00:00:30:00 is text), or any with a fraction
    if re.fullmatch(
        r"[-+]?([1-9][0-9_]*(:[0-5]?[0-9])+|[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*)", value
    ):
        raise ConfigError(
            f"{where}: YAML reads {value} as a number in base 60: write the number itself "
            f"(slurm.time_min is in minutes), or quote a time as text ({quoted})"
        )


def _refuse_yaml_surprises_in(
    node: yaml.Node,
    where: Callable[[str, yaml.ScalarNode], str],
    prefix: str = "",
    none_is_text: bool = True,
) -> None:
    """:func:`_refuse_yaml_surprises` over the plain values of ``node`` (a config file's
    composed YAML, or a command-line value under the key ``prefix``), each named by
    ``where(key, scalar)``. A text key's value and a text list's item that YAML reads as
    a number or a truth value written otherwise (``run_name: 010`` was the name ``8``,
    ``wandb.tags: [yes]`` the tag ``True``) are refused too. With ``none_is_text``
    (a file), a text key's ``None`` is the text: a run's ``config.yaml`` wrote it so."""
    strings = set(_string_keys(Config))
    lists = set(_string_keys(Config, types=TEXT_LISTS))
    nodes: list[tuple[str, yaml.Node, bool]] = [(prefix, node, False)]
    while nodes:
        key, node, item = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            nodes += [(f"{key}{name.value}.", value, False) for name, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            nodes += [(key, value, True) for value in node.value]
        elif isinstance(node, yaml.ScalarNode) and not node.style:  # plain (libyaml: "")
            key = key.rstrip(".")
            text = key in (lists if item else strings)
            here = where(key, node)
            if not text:
                _refuse_yaml_surprises(here, node.value, text=False)
            elif node.value == "None":
                if not none_is_text:
                    _refuse_yaml_surprises(here, node.value, text=True)
            else:
                _refuse_text_read_otherwise(here, node.value)


def _refuse_text_read_otherwise(where: str, value: str) -> None:
    """A text's plain ``value`` that YAML reads as a number or a truth value whose text
    differs (``010``: 8, ``1e3``: 1000.0, ``yes``: True), refused: the text key took
    that text, not the one written."""
    try:
        read = OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"]  # type: ignore[index]
    except Exception:  # not a value on its own (a folded multi-line text): as written
        return
    if isinstance(read, bool | int | float) and str(read) != value:
        raise ConfigError(
            f"{where}: YAML reads {value} as the {type(read).__name__} {read!r}, which a text "
            f"key takes as {str(read)!r}: quote it to keep it as written "
            "(\"key='...'\" in a shell, 'text' in a file)"
        )


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""OmegaConf's own YAML parser (libyaml where PyYAML has it: it takes a tab before a
comment, which PyYAML's Python scanner refuses)."""


def text_override(key: str, value: str | Path) -> str:
    """``key=value`` that reads as the text ``value`` whatever it holds (a run folder
    named ``None``, ``~``, ``010`` or with a ``${``), for the overrides facecluster
    composes itself."""
    return f"{key}='{str(value).replace('${', chr(92) + '${')}'"


def load_config(
    path: str | Path | list[str | Path] | tuple | None = None, overrides: list[str] | tuple = ()
) -> Config:
    """Load and validate a config.

    Args:
        path: optional YAML file, or several merged in order (later ones win); each
            lists only what differs from the schema defaults. Without one, the schema's
            defaults alone, which leave the stages' epochs unset: the command line starts
            from :func:`default_config` (the demo's ``configs/default.yaml``).
        overrides: ``key=value`` strings applied last.

    Returns:
        The validated, typed :class:`Config`.
    """
    merged = OmegaConf.structured(Config)
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    for given in map(Path, paths):
        # as data.root: from the working dir, else the project's (`facecluster train -c
        # configs/smoke.yaml` from another folder, as `facecluster --help` shows it)
        p = config_file(given)
        if p.is_dir():  # was "config file not found"
            raise ConfigError(f"config file {given} is a folder: name a YAML file in it")
        if not p.is_file():
            # `-c output_dir=x`: the file after -c left out, the next argument taken
            override = "=" in str(given) and given.suffix not in (".yaml", ".yml")
            hint = " (-c takes a YAML file, not a key=value override)" if override else ""
            named = Path("configs") / f"{given}.yaml"  # -c smoke, as Hydra's config name
            if not override and not given.suffix and config_file(named).is_file():
                hint = f" (did you mean -c {named}?)"
            raise ConfigError(f"config file not found: {given}{hint}")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # YAML syntax errors name line and column
            raise ConfigError(f"cannot parse {p}: {e}") from None
        if not isinstance(loaded, DictConfig):  # a list at the top: OmegaConf's TypeError
            raise ConfigError(f"{p}: a config file holds `key: value` lines, not a list")
        # text (a shell script, an arcface_torch .py config) is one YAML string, which
        # OmegaConf turns into {text: None}: "unknown config key 'echo hi'"
        try:
            composed = yaml.compose(p.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {p}: {e}") from None
        if loaded and not isinstance(composed, yaml.MappingNode):
            raise ConfigError(
                f"{p}: not a YAML mapping of config keys (`key: value` lines, as in configs/)"
            )
        if composed is not None:
            _refuse_yaml_surprises_in(
                composed,
                lambda key, node, p=p: f"{p}, line {node.start_mark.line + 1}, {key}: {node.value}",
            )
        merged = _merge(merged, loaded, str(p))
    if overrides:
        if paths:
            _epochs_given(merged, list(overrides))
        merged = _merge_overrides(merged, list(overrides))
    return _to_config(merged)


def _epochs_given(merged: DictConfig, overrides: list[str]) -> None:
    """Both stages' epochs among ``overrides``, not ``trainer.max_epochs``: the
    ``trainer.max_epochs`` of ``merged`` (a file's, smoke.yaml's 1, or a resumed run's)
    gives way, where it was refused as a value they would leave unused."""
    given = parse_overrides(overrides)
    if (
        OmegaConf.select(given, "trainer.max_epochs", default="unset") == "unset"
        and None
        not in [  # an interpolation (${...}) to a key outside them: not known here
            OmegaConf.select(given, f"stage{i}.max_epochs", throw_on_resolution_failure=False)
            for i in (1, 2)
        ]
        and merged.trainer.get("max_epochs") is not None
    ):
        merged.trainer.max_epochs = None


def config_from_dict(values: dict[str, Any], source: str) -> Config:
    """A Config from plain nested dicts (a checkpoint's copy), validated."""
    return _to_config(_merge(OmegaConf.structured(Config), _literal(values), source))
