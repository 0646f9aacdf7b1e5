"""Experiment loggers: W&B (default), CSV or none, one continuous run for both stages.

Lightning logs ``trainer/global_step`` from each Trainer, so a second ``fit``
would restart the x-axis at 0 (and W&B drops steps older than its last one). The
loggers here add the steps already taken by stage 1 as an offset, so both stages
form one continuous run. W&B with no API key, or with a key but no network,
would otherwise hang for minutes at start: the mode is decided up front.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import netrc
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from facecluster.config import Config, ConfigError
from facecluster.io import replacing

WANDB_HOST = ("api.wandb.ai", 443)
"""W&B's server where the installed wandb's settings cannot be read (:func:`_default_base_url`)."""


class _StepOffset:
    """Adds ``step_offset`` to every logged step (set to stage 1's steps for stage 2)."""

    step_offset: int = 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + self.step_offset)


class RunWandbLogger(_StepOffset, WandbLogger):
    """WandbLogger whose step axis continues across the two stages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning passes wandb.init anonymous=None, which wandb 0.19+ answers with
        # "The anonymous setting has no effect and will be removed" at every run. Its
        # init arguments are private (no public way to leave one out): a release that
        # renames them brings the warning back, never an error
        init = getattr(self, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous", "") is None:
            del init["anonymous"]


if not hasattr(ExperimentWriter, "_check_log_dir_exists"):  # pragma: no cover
    # renamed by a Lightning release, the override below would never run, and Lightning's
    # own would delete a resumed run's metrics.csv: silently
    raise ImportError(
        "lightning's ExperimentWriter has no _check_log_dir_exists: this Lightning release "
        "is not supported by facecluster's CSV logger (see pyproject.toml for the range)"
    )


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not
    deleted: a resume, each ``stage=`` command and a retried stage-2 job add their rows
    to what the run logged before (its columns read back first, so a new column
    rewrites the file with every row kept). Before this command's first save, the rows
    it logs again are dropped: every row after its first step, and at that step the rows
    of the metrics it logs there (a resume redoes the steps after its checkpoint, a
    retried job its stage), so each step is in the file once, as last logged."""

    _continued = False

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def save(self) -> None:
        if self.metrics and not self._continued and self._fs.isfile(self.metrics_file_path):
            self._drop_redone()
        self._continued = self._continued or bool(self.metrics)
        super().save()

    def _drop_redone(self) -> None:
        """Rewrite ``metrics.csv`` (atomically) without the rows this command logs again:
        every row after its first step, and at that step the rows of the metrics it logs
        there (stage 1's last rows, its test accuracy and the clustering's, share their
        step with stage 2's first, and stay)."""
        first = min(int(m["step"]) for m in self.metrics)
        again = {k for m in self.metrics if int(m["step"]) == first for k in m}
        again -= {"step", "epoch"}

        def redone(row: dict[str, str]) -> bool:
            step = int(row["step"]) if row.get("step") else -1
            return step > first or (step == first and any(row.get(k) for k in again))

        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            keys = reader.fieldnames or []
        kept = [row for row in rows if not redone(row)]
        if len(kept) == len(rows):
            return
        with replacing(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(kept)


class RunCSVLogger(_StepOffset, CSVLogger):
    """CSVLogger whose step column continues across the two stages and across the
    commands of a run (a resumed epoch's steps once, as the resume logged them)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _default_base_url() -> str:
    """The W&B server the installed wandb logs to without ``WANDB_BASE_URL``: the
    ``base_url`` of its settings files (``wandb login --host`` writes the global one,
    ``$WANDB_CONFIG_DIR/settings`` or ``~/.config/wandb/settings``), read as wandb's setup
    reads them, else its own default (wandb 0.31: ``https://api.forge.coreweave.com``,
    where ``api.wandb.ai`` was asked before, and `wandb login`'s key under the new name
    was not found)."""
    try:
        from wandb.env import CONFIG_DIR
        from wandb.sdk.wandb_settings import Settings

        settings = Settings(quiet=True)  # no "Loading settings from ..." line
        folder = Path(os.environ.get(CONFIG_DIR) or "~/.config/wandb").expanduser()
        settings.settings_system = str(folder / "settings")
        settings.update_from_system_settings()  # a file it cannot parse: its own message
        return str(settings.base_url)
    except Exception:  # another wandb layout, or settings it refuses: its own error later
        return f"https://{WANDB_HOST[0]}"


def _wandb_server() -> tuple[str, int, str]:
    """The W&B server's host, port and ``host[:port]`` as written (the name wandb keeps
    its key under in ``.netrc``): ``WANDB_BASE_URL`` (a self-hosted server), else W&B's
    own, as the installed wandb names it."""
    base = os.environ.get("WANDB_BASE_URL")
    if not base:
        url = urlparse(_default_base_url())
        if not url.hostname:
            return (*WANDB_HOST, WANDB_HOST[0])
        return url.hostname, url.port or (80 if url.scheme == "http" else 443), url.netloc
    url = urlparse(base)
    if url.scheme not in ("http", "https") or not url.hostname:  # wandb.init refuses it
        raise ConfigError(f"WANDB_BASE_URL={base!r}: give the server as http(s)://host[:port]")
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError as e:  # a port that is not a number, or past 65535
        raise ConfigError(f"WANDB_BASE_URL={base!r}: {e}") from None
    return url.hostname, port, url.netloc


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
"""The modes ``WANDB_MODE`` may name (wandb's own list; ``wandb.mode`` takes the first
three)."""


def check_wandb_server(cfg: Config) -> None:
    """With ``logger=wandb``, refuse before the run folder is made (and the data scan)
    what wandb would refuse only when stage 1's fit starts (:func:`build_logger`): wandb
    not installed, a project name W&B refuses, a ``WANDB_BASE_URL`` or ``WANDB_MODE``
    it does not take, and W&B online without an API key for the server (wandb's
    UsageError, after minutes of scanning a ``.rec``)."""
    if cfg.logger != "wandb":
        return
    if importlib.util.find_spec("wandb") is None:  # Lightning's error came at the fit
        raise ConfigError(
            "logger=wandb needs the wandb package: pip install 'wandb>=0.17', or log with "
            "logger=csv (or none)"
        )
    if problems := cfg.wandb.project_problems():
        raise ConfigError("; ".join(problems))
    host, port, netloc = _wandb_server()
    env = os.environ.get("WANDB_MODE")
    # wandb reads it whatever mode it is given: one set empty failed at the fit too
    if env is not None and env not in WANDB_MODES:
        raise ConfigError(
            f"WANDB_MODE={env!r} is not a W&B mode ({', '.join(WANDB_MODES)}), and wandb "
            "reads it whatever wandb.mode says: unset it (facecluster then decides), or set "
            "it to one of those"
        )
    mode, why = _chosen_mode(cfg) or (None, "")
    if mode in ("online", "shared", "run") and not _has_wandb_key(netloc):
        raise ConfigError(
            f"{why}={mode} logs to W&B, but there is no API key for {netloc}: set "
            "WANDB_API_KEY or run `wandb login`, or log offline (wandb.mode=offline; "
            "`wandb sync` uploads it later)"
        )
    if mode in ("online", "shared", "run") and not _reachable((host, port)):
        # wandb.init retried for about 100 s, then a traceback, the run folder left
        raise ConfigError(
            f"{why}={mode} logs to W&B, but {host}:{port} is unreachable (a 3-second "
            "check): log offline (wandb.mode=offline; `wandb sync` uploads it later), or "
            "leave the mode unset and facecluster logs offline when the server is unreachable"
        )


def _has_wandb_key(netloc: str) -> bool:
    """Whether wandb would find credentials for the server ``netloc``:
    ``WANDB_API_KEY``, an identity token file (``WANDB_IDENTITY_TOKEN_FILE``), or a key
    in the netrc file wandb reads, found by wandb's own lookup (``NETRC`` with a ``~``,
    an empty ``NETRC`` taken as unset, ``~/_netrc``; a reading of our own refused those
    setups, which wandb accepts)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    url = os.environ.get("WANDB_BASE_URL") or f"https://{netloc}"
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
    except ImportError:  # a wandb without that module: ``NETRC`` or ``~/.netrc`` alone
        path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
        try:
            found = netrc.netrc(path).authenticators(netloc)
        except (OSError, netrc.NetrcParseError):
            return False
        return bool(found and found[2])
    try:
        return read_netrc_auth(host=url) is not None
    except Exception:  # a key wandb finds malformed: its own error names it, at the fit
        return True


def _reachable(host: tuple[str, int], timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _chosen_mode(cfg: Config) -> tuple[str, str] | None:
    """The W&B mode the user chose and where: ``wandb.mode``, else ``WANDB_MODE``."""
    if cfg.wandb.mode:
        return cfg.wandb.mode, "wandb.mode"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    return None


def wandb_mode(cfg: Config) -> tuple[str, str]:
    """The W&B mode to use and why: the user's choice (:func:`_chosen_mode`), else
    decided."""
    if chosen := _chosen_mode(cfg):
        return chosen
    host, port, netloc = _wandb_server()
    if not _has_wandb_key(netloc):
        return "offline", f"no W&B API key for {netloc} (set WANDB_API_KEY or run `wandb login`)"
    if not _reachable((host, port)):
        return "offline", f"{host}:{port} is unreachable"
    return "online", "API key found and W&B reachable"


def build_logger(cfg: Config, run_dir: Path, run_id: str, job: str | None = None) -> Logger | None:
    """The run's logger; ``run_id`` names the W&B run so a resume continues it.

    A stage-2 job (``job``: its name) logs to a run of its own, ``<run_id>-<job>``,
    in the W&B group of the run folder's name (CSV: ``csv/<job>/metrics.csv``), so
    concurrent jobs never write to one run.
    """
    if cfg.logger == "none":
        return None
    if cfg.logger == "csv":
        return RunCSVLogger(save_dir=str(run_dir), name="csv", version=job or "")
    mode, reason = wandb_mode(cfg)
    if mode in ("offline", "dryrun"):  # dryrun: wandb's older name for offline
        rank_zero_info(
            f"W&B offline ({reason}): the run is written to {run_dir / 'wandb'}; "
            f"upload it later with `wandb sync {run_dir / 'wandb'}/offline-run-*`"
        )
    return RunWandbLogger(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=f"{run_dir.name}/{job}" if job else run_dir.name,
        id=f"{run_id}-{job}" if job else run_id,
        group=run_dir.name,
        resume="allow",
        save_dir=str(run_dir),
        mode=mode,
        tags=list(cfg.wandb.tags),
    )


def exit_code(error: BaseException | None) -> int:
    """The exit status a command ends with when ``error`` leaves it (None: it returned).

    W&B marks a run finished at 0 and failed otherwise: a run ended by an error, by
    Ctrl-C (Lightning turns it into ``SystemExit(1)``) or by SIGTERM (143) must not
    look finished on the dashboard. Lightning's SIGTERM stop carries no code: 143."""
    if error is None:
        return 0
    if isinstance(error, SIGTERMException) and error.code is None:
        return 128 + signal.SIGTERM  # Lightning's stop on SIGTERM, as train.py exits
    if isinstance(error, SystemExit):
        code = error.code
        return code if isinstance(code, int) else int(code is not None)
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 1


@contextlib.contextmanager
def finish_logger(logger: Logger | None) -> Iterator[None]:
    """Always finish the W&B run of a training run, on error too (rank 0 owns it),
    with the command's exit status (a failed run is shown failed)."""
    error = None
    try:
        yield
    except BaseException as e:
        error = e
        raise
    finally:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:  # only where the run was started (rank 0)
                wandb.finish(exit_code=exit_code(error))


@contextlib.contextmanager
def wandb_run(cfg: Config, run_dir: Path, run_id: str) -> Iterator[Any]:
    """The W&B run of a finished training run, reopened to add to it (evaluation)."""
    import wandb

    mode, _ = wandb_mode(cfg)
    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        # the training's banner and summary were printed already: a second set of
        # about 35 lines came between the evaluation's heading and its table
        settings=wandb.Settings(silent=True),
    )
    error = None
    try:
        yield run
    except BaseException as e:
        error = e
        raise
    finally:
        run.finish(exit_code=exit_code(error))
