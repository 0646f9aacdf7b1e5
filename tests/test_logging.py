"""W&B without a key or network: offline, no hang, metrics on disk for `wandb sync`."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import struct
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import pytest
import wandb
import yaml

from facecluster.config import ConfigError, load_config
from facecluster.evaluation import evaluate_runs
from facecluster.loggers import RunCSVLogger, build_logger, wandb_mode
from facecluster.pipeline import train
from facecluster.run import RunFolder, job_name
from tests.conftest import SMOKE, smoke_overrides


def test_no_api_key_means_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    mode, reason = wandb_mode(load_config(SMOKE))
    assert mode == "offline" and "no W&B API key" in reason


def test_key_without_network_means_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    nowhere = lambda: "http://127.0.0.1:9"  # noqa: E731 (nothing listens)
    monkeypatch.setattr("facecluster.loggers._default_base_url", nowhere)
    mode, reason = wandb_mode(load_config(SMOKE))
    assert mode == "offline" and "unreachable" in reason


def test_a_self_hosted_server_is_the_one_asked(monkeypatch, tmp_path):
    # WANDB_BASE_URL: the key and the reachability are the user's server's; both were
    # asked of api.wandb.ai, so a self-hosted server's runs went offline
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    key = "  login user\n  password " + "x" * 40 + "\n"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        # wandb keeps the key under host:port, as `wandb login` writes it
        netrc.write_text(f"machine 127.0.0.1:{port}\n{key}")
        assert wandb_mode(load_config(SMOKE))[0] == "online"
        # a key for another port or for W&B's own server is not this server's: wandb
        # would find none and stop the run (or prompt), where offline was meant
        netrc.write_text(f"machine 127.0.0.1:{port + 1}\n{key}machine api.wandb.ai\n{key}")
        assert wandb_mode(load_config(SMOKE))[0] == "offline"
    netrc.write_text(f"machine 127.0.0.1:9\n{key}")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens
    mode, reason = wandb_mode(load_config(SMOKE))
    assert mode == "offline" and "127.0.0.1:9 is unreachable" in reason
    # a URL wandb would refuse is refused before the run folder is made
    for url in ("http://127.0.0.1:port", "127.0.0.1:8080"):
        monkeypatch.setenv("WANDB_BASE_URL", url)
        with pytest.raises(ConfigError, match=f"WANDB_BASE_URL='{url}'"):
            train(load_config(SMOKE, smoke_overrides(tmp_path, "logger=wandb")))
        assert not (tmp_path / "run").exists()


def test_a_wandb_mode_that_cannot_log_is_refused_before_the_data_scan(monkeypatch, tmp_path):
    # W&B online without a key, a WANDB_MODE wandb does not take, a tag over 64
    # characters: wandb refused each when stage 1's fit started, after the data scan
    # (minutes on a .rec), leaving a run folder (a review of late errors)
    from facecluster.loggers import _wandb_server, check_wandb_server

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "online")
    scanned = []
    monkeypatch.setattr("facecluster.pipeline.build_datamodule", lambda *a: scanned.append(a))
    wandb = smoke_overrides(tmp_path, "logger=wandb")
    with pytest.raises(ConfigError, match="WANDB_MODE=online logs to W&B, but there is no API"):
        train(load_config(SMOKE, wandb))
    assert not scanned and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="wandb.mode=online logs to W&B, but there is no API"):
        check_wandb_server(load_config(SMOKE, [*wandb, "wandb.mode=online"]))
    # set empty, or beside a wandb.mode (wandb reads it all the same: its pydantic
    # traceback at the fit, after the scan, and from evaluate.py after the evaluation)
    for bad in ("bogus", ""):
        monkeypatch.setenv("WANDB_MODE", bad)
        for mode in ([], ["wandb.mode=offline"]):
            with pytest.raises(ConfigError, match=rf"WANDB_MODE={bad!r} is not a W&B mode"):
                check_wandb_server(load_config(SMOKE, [*wandb, *mode]))
    # wandb not installed: Lightning's ModuleNotFoundError came at the fit
    with monkeypatch.context() as m:
        m.setattr("importlib.util.find_spec", lambda name, *a: None)
        with pytest.raises(ConfigError, match=r"logger=wandb needs the wandb package: pip"):
            check_wandb_server(load_config(SMOKE, wandb))
    # a project name W&B refuses: at the start, not at the fit; a CSV-logged run's
    # saved one still loads (its resume and evaluation)
    with pytest.raises(ConfigError, match=r"wandb.project='a/b': a W&B project name cannot"):
        check_wandb_server(load_config(SMOKE, [*wandb, "wandb.project=a/b"]))
    with pytest.raises(ConfigError, match=r"wandb.project: at most 128 characters .*got 129"):
        check_wandb_server(load_config(SMOKE, [*wandb, f"wandb.project={'p' * 129}"]))
    assert not load_config(SMOKE, [*wandb, f"wandb.project={'p' * 128}"]).wandb.project_problems()
    load_config(SMOKE, ["logger=csv", "wandb.project=a/b"])
    for fine in ("offline", "disabled", "dryrun"):
        monkeypatch.setenv("WANDB_MODE", fine)
        check_wandb_server(load_config(SMOKE, wandb))
    # wherever wandb finds a key, online goes on (a review: these were refused):
    # NETRC with a ~, an empty NETRC, ~/_netrc, an identity token file, WANDB_API_KEY
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("facecluster.loggers._reachable", lambda *a, **k: True)
    # the key under W&B's own server as the installed wandb names it (0.31: not
    # api.wandb.ai, which was asked, so `wandb login`'s key was not found)
    from wandb.sdk.wandb_settings import Settings

    own = urlparse(Settings().base_url).netloc
    assert _wandb_server()[2] == own
    entry = f"machine {own}\n  login user\n  password " + "x" * 40 + "\n"
    for netrc, env in (("wb.netrc", "~/wb.netrc"), (".netrc", ""), ("_netrc", None)):
        (tmp_path / netrc).write_text(entry)
        (tmp_path / netrc).chmod(0o600)
        if env is None:
            monkeypatch.delenv("NETRC")
        else:
            monkeypatch.setenv("NETRC", env)
        check_wandb_server(load_config(SMOKE, wandb))
        (tmp_path / netrc).unlink()
    with pytest.raises(ConfigError, match="no API key"):
        check_wandb_server(load_config(SMOKE, wandb))
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    check_wandb_server(load_config(SMOKE, wandb))
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_wandb_server(load_config(SMOKE, wandb))
    # online asked, with a key, but the server unreachable: wandb.init retried for about
    # 100 s, then a traceback, the run folder left behind (a walkthrough)
    monkeypatch.setattr("facecluster.loggers._reachable", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"WANDB_MODE=online logs to W&B, but \S+:\d+ is unr"):
        check_wandb_server(load_config(SMOKE, wandb))
    monkeypatch.delenv("WANDB_MODE")
    check_wandb_server(load_config(SMOKE, wandb))  # not asked: it logs offline
    with pytest.raises(ConfigError, match="wandb.tags: each tag is 1 to 64 characters"):
        load_config(SMOKE, ["wandb.tags=[" + "x" * 70 + "]"])
    assert load_config(SMOKE, ["wandb.tags=[" + "x" * 64 + "]"]).wandb.tags == ["x" * 64]


def test_a_wandb_without_its_netrc_reader_finds_the_key_in_netrc_or_dot_netrc(
    monkeypatch, tmp_path
):
    # the fallback for a wandb whose netrc reader moved: NETRC, else ~/.netrc, read
    # with the standard library; a missing, malformed or passwordless entry is no key
    import sys

    from facecluster.loggers import _has_wandb_key

    monkeypatch.setitem(sys.modules, "wandb.sdk.lib.wbauth.wbnetrc", None)  # ImportError
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC")
    netrc = tmp_path / ".netrc"
    assert not _has_wandb_key("wandb.example:443")  # no file
    for text, found in (
        ("machine wandb.example:443\n  login user\n  password " + "x" * 40 + "\n", True),
        ("machine other.example\n  login user\n  password " + "x" * 40 + "\n", False),
        ("machine wandb.example:443\n  login user\n", False),  # no password
        ("machine wandb.example:443 login\n", False),  # malformed
    ):
        netrc.write_text(text)
        netrc.chmod(0o600)
        assert _has_wandb_key("wandb.example:443") is found, text
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))  # NETRC first
    assert not _has_wandb_key("wandb.example:443")
    (tmp_path / "elsewhere").write_text("machine wandb.example:443 login u password p\n")
    assert _has_wandb_key("wandb.example:443")


def test_explicit_mode_wins(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(load_config(SMOKE, ["wandb.mode=disabled"]))[0] == "disabled"


def test_csv_and_none_loggers(tmp_path):
    cfg = load_config(SMOKE, ["logger=csv"])
    assert isinstance(build_logger(cfg, tmp_path, "id"), RunCSVLogger)
    assert build_logger(dataclasses.replace(cfg, logger="none"), tmp_path, "id") is None


@pytest.mark.slow
def test_wandb_offline_run_writes_both_stages_to_disk(monkeypatch, tmp_path, capfd):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SILENT")  # what a user sees
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    # W&B reads WANDB_SILENT once a process: a silent W&B run of another test in this
    # worker would keep this one silent too (the suite's order varies with its workers)
    wandb.teardown()
    result = train(load_config(SMOKE, smoke_overrides(tmp_path, "logger=wandb")))
    said = capfd.readouterr().err
    assert "wandb: Tracking run" in said  # W&B's banner, where the run starts
    # Lightning passed anonymous=None, which W&B answered with a warning at every run
    assert "anonymous" not in said
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one W&B run for both stages"
    assert list(runs[0].glob("*.wandb")), "the run's data is on disk for `wandb sync`"
    assert _exit_codes(runs[0]) == [0], "W&B shows the run finished"
    # W&B's summary keeps a name's last value: stage 2 logged its sub-nets' accuracy
    # (each face sent to its own cluster's sub-net) as test/acc, over stage 1's
    history = _history(runs[0])
    assert history["test/acc"] == [pytest.approx(result.results["stage1"]["accuracy"])]
    assert history["test/acc_subnets"] == [pytest.approx(result.results["subnets_oracle_accuracy"])]
    assert "train/loss_subnets" in history and "val/acc_subnets" in history
    # the config is the run's: each stage's hyper-parameters (optim, head...) under one
    # name each left stage 2's in W&B's config, stage1.optim.lr=0.1 shown as 0.05
    config = _config(runs[0])
    assert set(config) - {"_wandb"} == {"config"}
    assert config["config"] == yaml.safe_load((result.run_dir / "config.yaml").read_text())

    # the evaluation's figures as numbers, which W&B's runs table compares runs by
    evaluate_runs([result.run_dir])
    # silently: a second banner and summary (35 lines) came between the evaluation's
    # heading and its table
    assert "wandb:" not in capfd.readouterr().err
    rows = json.loads((result.run_dir / "eval" / "results.json").read_text())["rows"]
    later = _history(max((result.run_dir / "wandb").glob("offline-run-*")))
    for row in rows:
        name = re.sub(r"[^a-z0-9]+", "_", row["model"].lower()).strip("_")
        assert later[f"eval/{name}/top1"] == [pytest.approx(row["top1"])], name
        assert later[f"eval/{name}/macro_f1"] == [pytest.approx(row["f1"])], name


def _history(offline_run: Path) -> dict[str, list]:
    """Each key an offline W&B run logged, with its values in order."""
    found: dict[str, list] = {}
    for record in _records(offline_run):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                found.setdefault(key, []).append(json.loads(item.value_json))
    return found


def _config(offline_run: Path) -> dict:
    """An offline W&B run's config, its updates applied in order."""
    found: dict = {}
    for record in _records(offline_run):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                found[key] = json.loads(item.value_json)
    return found


def _exit_codes(offline_run: Path) -> list[int]:
    """The exit codes of an offline W&B run's exit records."""
    return [
        r.exit.exit_code for r in _records(offline_run) if r.WhichOneof("record_type") == "exit"
    ]


def _records(offline_run: Path) -> list:
    """The records of an offline W&B run, read from its ``.wandb`` file (LevelDB's log
    format: a 7-byte file header, then 32 KiB blocks of records, each a 7-byte header
    (crc, length, type) and data; a protobuf Record may span several: types 1 full, 2
    first, 3 middle, 4 last)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    # wandb's service process writes the file after finish() returns: its teardown,
    # which a command's exit runs too, waits until it is written (read at once, the
    # exit record was missing once, on a loaded machine)
    wandb.teardown()
    [path] = offline_run.glob("*.wandb")
    data, pos, part, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(part))
            part = b""
    return records


class _Fails(L.Callback):
    """Stage 1 ends at its second batch: by an error, or by SIGTERM (scancel, a
    preemption), which Lightning turns into a SystemExit of no code."""

    def __init__(self, how: str):
        self.how = how

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 1:
            if self.how == "error":
                raise RuntimeError("a failure in stage 1")
            os.kill(os.getpid(), signal.SIGTERM)  # the next batch stops the fit


@pytest.mark.parametrize(("how", "code"), [("error", 1), ("sigterm", 143)])
def test_a_run_that_fails_is_shown_failed_in_wandb(how, code, monkeypatch, tmp_path):
    # its W&B run was finished as a success: the dashboard showed a failed run finished
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "logger=wandb"))
    with pytest.raises(RuntimeError if how == "error" else SIGTERMException):
        train(cfg, [_Fails(how)])
    [run] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert _exit_codes(run) == [code]


def test_a_later_command_of_the_run_adds_to_its_csv_log(tmp_path):
    # resume=, stage= commands and retried jobs each open the run's logger again:
    # Lightning's CSV writer deleted metrics.csv then; the rows logged before stay
    cfg = load_config(SMOKE, ["logger=csv"])
    first = build_logger(cfg, tmp_path, "id")
    first.log_metrics({"train/loss": 1.0}, step=10)
    first.save()
    resumed = build_logger(cfg, tmp_path, "id")
    resumed.log_metrics({"train/loss": 0.9, "val/acc": 0.5}, step=20)  # a new column
    resumed.save()
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert rows == ["step,train/loss,val/acc", "10,1.0,", "20,0.9,0.5"]


def test_a_resume_replaces_the_rows_of_the_steps_it_redoes(tmp_path):
    # killed at step 30 after a checkpoint at step 20: the resume logs 20 onwards again,
    # and the file then holds each step once, the rows before 20 kept
    cfg = load_config(SMOKE, ["logger=csv"])
    first = build_logger(cfg, tmp_path, "id")
    for step in (10, 20, 30):
        first.log_metrics({"train/loss": step / 10}, step=step)
    first.log_metrics({"test/acc": 0.7}, step=20)  # another metric at the first step: kept
    first.save()
    resumed = build_logger(cfg, tmp_path, "id")
    resumed.log_metrics({"train/loss": 0.5}, step=20)
    resumed.save()
    resumed.log_metrics({"train/loss": 0.4}, step=30)
    resumed.save()  # a later save of the same command keeps its own rows
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert rows == ["step,test/acc,train/loss", "10,,1.0", "20,0.7,", "20,,0.5", "30,,0.4"]


@pytest.mark.slow
def test_retraining_named_subnets_keeps_the_others_csv_history(tmp_path):
    # stage2.subnets=[0] in the main process logged into the run's metrics.csv at the
    # first training's steps, and the resumed writer dropped those rows as redone: the
    # history of sub-nets 1 and 2, which were not retrained, was lost
    run = train(load_config(SMOKE, smoke_overrides(tmp_path, "logger=csv"))).run_dir
    log = run / "csv" / "metrics.csv"

    def filled(path, column):
        with open(path, newline="") as f:
            return sum(1 for row in csv.DictReader(f) if row.get(column))

    before = {k: filled(log, f"train/loss_subnet{k}") for k in (0, 1, 2)}
    assert min(before.values()) > 0
    train(RunFolder.config_for_resume(str(run), ["stage=2", "stage2.subnets=[0]"]))
    assert {k: filled(log, f"train/loss_subnet{k}") for k in (1, 2)} == {1: before[1], 2: before[2]}
    own = run / "csv" / job_name([0]) / "metrics.csv"
    assert filled(own, "train/loss_subnet0") > 0 and filled(own, "train/loss_subnet1") == 0


def test_the_server_wandb_login_host_chose_is_the_one_asked(monkeypatch, tmp_path):
    # `wandb login --host` writes base_url to wandb's global settings file, which wandb
    # logs to: its key (kept under that host) was not found, so runs went offline
    from facecluster.loggers import _wandb_server, check_wandb_server

    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = tmp_path / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.example.org:8443\n")
    assert _wandb_server() == ("wandb.example.org", 8443, "wandb.example.org:8443")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "elsewhere"))  # wandb's own name
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "settings").write_text("[default]\nbase_url = http://wb.lab\n")
    assert _wandb_server() == ("wb.lab", 80, "wb.lab")

    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    netrc.write_text("machine wb.lab\n  login user\n  password " + "x" * 40 + "\n")
    asked = []
    monkeypatch.setattr("facecluster.loggers._reachable", lambda *a, **k: asked.append(a) or 1)
    wandb = smoke_overrides(tmp_path, "logger=wandb", "wandb.mode=online")
    check_wandb_server(load_config(SMOKE, wandb))
    assert asked == [(("wb.lab", 80),)]
    assert wandb_mode(load_config(SMOKE))[0] == "online"


def test_a_server_that_does_not_answer_as_wandb_stops_the_run_in_one_line(
    monkeypatch, tmp_path, capsys
):
    # the start-up check connects (TCP) only: a WANDB_BASE_URL mistyped to a server
    # that answers 404 ended in wandb's CommError traceback at stage 1's fit
    import wandb
    from wandb.errors import CommError

    from facecluster import cli

    def refused(*args, **kwargs):
        raise CommError("Failed to get resume status for run x: returned error 404")

    monkeypatch.setattr(wandb, "init", refused)
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example:81")
    args = ["-c", str(SMOKE), *smoke_overrides(tmp_path, "logger=wandb", "wandb.mode=offline")]
    assert cli.train_main(args) == 1
    err = capsys.readouterr().err
    assert "error: W&B at http://wandb.example:81 (WANDB_BASE_URL) refused the run or did" in err
    assert "Traceback" not in err and "python train.py resume=" in err, err


def test_an_offline_wandb_run_says_where_it_is_written_under_either_name(
    monkeypatch, tmp_path, caplog
):
    # WANDB_MODE=dryrun (wandb's older name for offline) wrote offline without the line
    # that names the folder and the `wandb sync` command
    for mode in ("offline", "dryrun"):
        monkeypatch.setenv("WANDB_MODE", mode)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            build_logger(load_config(SMOKE, ["logger=wandb"]), tmp_path, "id")
        assert f"W&B offline (WANDB_MODE): the run is written to {tmp_path / 'wandb'}" in (
            caplog.text
        ), mode


def test_training_bars_into_a_file_are_written_every_30_seconds_and_at_their_end(monkeypatch):
    # every batch wrote the bar into a SLURM job's output file: 220 carriage returns for
    # a one-minute smoke run, hundreds of thousands for a day of training
    import sys
    import time

    from facecluster.callbacks import progress

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = progress.StderrProgressBar()
    written = []
    for step in range(1, 101):  # a step a second
        now[0] += 1
        if bar._should_update(step, 100):
            written.append(step)
    assert written == [1, 31, 61, 91, 100]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: every step
    bar = progress.StderrProgressBar()
    assert all(bar._should_update(step, 100) for step in range(1, 101))


def test_a_throttled_epoch_bar_ends_at_the_batch_training_reached(monkeypatch):
    # trainer.max_steps (or a stop) ended an epoch at batch 7 of 33 and the bar, last
    # written 30 s before, said 0/33 in every line after (a review of the diff)
    import io

    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    from facecluster.callbacks import progress

    bar = progress.StderrProgressBar()
    written = io.StringIO()
    bar.train_progress_bar = Tqdm(total=33, file=written)
    bar._seen = 7
    order = []
    monkeypatch.setattr(TQDMProgressBar, "on_train_epoch_end", lambda *a: order.append("bar"))
    monkeypatch.setattr(TQDMProgressBar, "on_train_end", lambda *a: order.append("end"))
    bar.on_train_epoch_end(None, None)
    assert bar.train_progress_bar.n == 7 and "7/33" in written.getvalue()
    assert order == ["bar"]  # after the catch-up: Lightning's postfix shows 7/33 too
    bar._seen = 9
    bar.on_train_end(None, None)
    assert bar.train_progress_bar.n == 9 and order == ["bar", "end"]


def test_a_fit_stopped_by_an_error_closes_its_bars_where_training_reached(capsys):
    # bars left open were written again, stale, when collected: after the error, at
    # exit, or in a later fit's output (the suite's log had four of them per run)
    import io
    from types import SimpleNamespace

    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    from facecluster.callbacks import progress

    bar = progress.StderrProgressBar()
    written = io.StringIO()
    bar.train_progress_bar = Tqdm(total=33, file=written)
    bar.val_progress_bar = Tqdm(total=5, file=written, position=1, leave=False)
    bar._seen = 7
    bar.on_exception(SimpleNamespace(progress_bar_callback=bar), None, RuntimeError())
    assert bar.train_progress_bar.disable and bar.val_progress_bar.disable  # closed
    assert written.getvalue().endswith("\n") and "7/33" in written.getvalue().split("\r")[-1]
    assert capsys.readouterr().err == ""  # the epoch bar's close ended the line
    # an error before any epoch bar (the sanity check's): the line is ended all the same
    bar = progress.StderrProgressBar()
    bar.val_progress_bar = Tqdm(total=5, file=io.StringIO(), leave=False)
    bar.on_exception(SimpleNamespace(progress_bar_callback=bar), None, RuntimeError())
    assert bar.val_progress_bar.disable and capsys.readouterr().err == "\n"


def test_an_evaluation_that_fails_marks_its_wandb_run_failed(monkeypatch, tmp_path):
    # the evaluation reopens the training's W&B run: an error or a Ctrl-C in it must
    # leave the run failed on the dashboard (W&B shows a run finished at exit code 0)
    import wandb

    from facecluster.loggers import wandb_run

    finished = []

    class Run:
        def finish(self, exit_code=None):
            finished.append(exit_code)

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    cfg = load_config(SMOKE, ["logger=wandb", "wandb.mode=offline"])
    with wandb_run(cfg, tmp_path, "abc123"):
        pass
    for error in (RuntimeError("a broken image"), KeyboardInterrupt()):
        with pytest.raises(type(error)), wandb_run(cfg, tmp_path, "abc123"):
            raise error
    assert finished == [0, 1, 130]
