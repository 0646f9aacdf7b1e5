"""Disk faults at start: an output folder that cannot be written, a disk too full."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple

import pytest

from facecluster.config import ConfigError, load_config
from facecluster.pipeline import train
from tests.conftest import SMOKE, smoke_overrides

pytestmark = pytest.mark.faults


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("file", r"output_dir=\S+/not-a-folder is a file: name a folder"),
        ("under-file", r"output_dir=\S+/not-a-folder/runs lies under a file \(\S+/not-a-folder\)"),
        ("proc", r"output_dir=/proc/facecluster-runs: /proc cannot be written \(read-only"),
    ],
    ids=["file", "under-file", "proc"],
)
def test_unwritable_output_dir_fails_at_start_naming_it(tmp_path, monkeypatch, where, said):
    # Tests run as root, where chmod does not stop writes: use a file where a folder
    # is expected, and a read-only kernel filesystem.
    if where == "proc":
        out = "/proc/facecluster-runs"
    else:
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("x")
        out = blocker / "runs" if where == "under-file" else blocker
        # a file is refused before the data scan (minutes over a large set), which
        # was the first to find it
        monkeypatch.setattr("facecluster.pipeline.build_datamodule", _no_scan)
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, f"output_dir={out}"))
    with pytest.raises(ConfigError, match=said):
        train(cfg)
    assert not any(tmp_path.rglob("*.ckpt"))


def test_an_output_dir_this_user_may_not_write_is_refused_before_the_scan(tmp_path, monkeypatch):
    # root writes anywhere: a refused file stands in for another user's view (os.access
    # said yes where a write failed, as under NFS's root squash)
    import facecluster.io

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(facecluster.io.tempfile, "TemporaryFile", refused)
    monkeypatch.setattr("facecluster.pipeline.build_datamodule", _no_scan)
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, f"output_dir={tmp_path}/runs/new"))
    said = rf"output_dir={tmp_path}/runs/new: {tmp_path} cannot be written \(read-only, or no"
    said += r" permission: making a file there failed, Permission denied\)"
    with pytest.raises(ConfigError, match=said):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def _no_scan(cfg):
    raise AssertionError("the data was scanned before output_dir was checked")


def test_too_little_free_space_fails_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    with pytest.raises(ConfigError, match=r"output_dir: .* 1 MiB free, .* need about \d+ MiB more"):
        train(cfg)
    assert not any(tmp_path.rglob("*.ckpt")), "nothing trained"


def test_the_free_space_check_counts_what_the_run_has_written(tmp_path, monkeypatch):
    # A resume, each stage-2 job and the assembly asked for the whole run's space
    # again, however much of it the run's own checkpoints already took.
    from facecluster.run import RunFolder, checkpoint_bytes_needed

    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = RunFolder.for_training(cfg)
    run.create()
    needed = checkpoint_bytes_needed(cfg, 10**6, 100)
    checkpoint = run.path / "stage1" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    with open(checkpoint, "wb") as f:  # a sparse file: its size, not its blocks
        f.truncate(needed - 2**20)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 2**21))
    run.check_free_space(cfg, 10**6, 100)  # 1 MiB more needed, 2 MiB free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 2**19))
    with pytest.raises(ConfigError, match=r"has 0 MiB free, .* need about 1 MiB more"):
        run.check_free_space(cfg, 10**6, 100)


def test_the_free_space_check_survives_files_replaced_meanwhile(tmp_path, monkeypatch):
    # Every stage-2 job checks the space at its start while the others write the run
    # folder: a temporary file replaced into place between two looks at it (is it a
    # file, its size) stopped the start with FileNotFoundError (a review saw it after
    # 487 starts beside a job rewriting subnets.json). One look at each file now.
    import os

    from facecluster.run import RunFolder

    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = RunFolder.for_training(cfg)
    run.create()
    gone = run.path / "stage2" / ".subnets.json.123-ab.tmp.json"
    gone.parent.mkdir(parents=True)
    gone.write_text("{}")
    real = os.stat

    def stat(path, *args, **kwargs):
        found = real(path, *args, **kwargs)
        if str(path) == str(gone):
            gone.unlink()  # replaced into place by another job right after this look
        return found

    monkeypatch.setattr(os, "stat", stat)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**11))
    run.check_free_space(cfg, 10**6, 100)


def _refused_in(monkeypatch, *folders):
    """Making a file in ``folders`` fails as for another user (tests run as root)."""
    import facecluster.io

    real = facecluster.io.tempfile.TemporaryFile

    def refused(*args, dir=None, **kwargs):
        if str(dir) in map(str, folders):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(facecluster.io.tempfile, "TemporaryFile", refused)


def test_another_users_run_is_refused_at_resume_before_the_scan(tmp_path, monkeypatch):
    # a run folder this user may read but not write: the resume scanned the data, then
    # failed with a PermissionError traceback at its config.yaml (a review, two users)
    from facecluster.run import RunFolder

    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = RunFolder.for_training(cfg)
    run.create(new=True)  # sets FACECLUSTER_RUN_DIR for its DDP ranks: not ours
    monkeypatch.setenv("FACECLUSTER_RUN_DIR", "")
    run.save_config(cfg)
    resume = RunFolder.config_for_resume(str(run.path))
    _refused_in(monkeypatch, run.path)
    monkeypatch.setattr("facecluster.pipeline.build_datamodule", _no_scan)
    with pytest.raises(ConfigError, match="this user cannot write the run folder"):
        train(resume)


def test_an_evaluation_refuses_a_wandb_folder_it_cannot_write(tmp_path, monkeypatch):
    # W&B fell back to a temporary folder, where `wandb sync <run>/wandb` found nothing
    from facecluster.evaluation import check_writable
    from facecluster.run import RunFolder

    run = RunFolder(tmp_path / "run")
    (run.path / "wandb").mkdir(parents=True)
    _refused_in(monkeypatch, run.path / "wandb")
    check_writable(run)  # logged online or not at all: not its concern
    with pytest.raises(ConfigError, match=r"run/wandb: the evaluation cannot write.*logger=none"):
        check_writable(run, wandb_offline=True)


def test_an_export_update_another_user_must_complete_says_so(tmp_path, monkeypatch):
    # the bare "[Errno 13] Permission denied: '<out>/.identifier.pt.<pid>-<hex>.tmp.pt'"
    # was all a user who may only read the export was told
    from facecluster import deploy

    out = tmp_path / "export"
    (out / deploy.UPDATE).mkdir(parents=True)

    def refused(out):
        raise PermissionError(13, "Permission denied", str(out / ".identifier.pt.1-ab.tmp.pt"))

    monkeypatch.setattr(deploy, "_finish_locked", refused)
    with pytest.raises(PermissionError, match="holds an update that an export or enrolment"):
        deploy.load_export(out)


def test_a_run_folder_this_user_cannot_enter_is_named_not_a_traceback(
    tmp_path, monkeypatch, capsys
):
    # another user's run made under umask 077 (its runs/ folder 0700 too): evaluate,
    # export and resume each ended in a PermissionError traceback at their first look
    # inside it (a review, two users)
    import os
    from pathlib import Path

    from facecluster import cli
    from facecluster.run import RunFolder

    alice = tmp_path / "alice"  # 0711: passed through, not listed
    theirs = alice / "runs"  # 0700
    run = theirs / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 1\n")
    real_stat, real_access = Path.stat, os.access

    def stat(path, **kwargs):  # root enters any folder: refused looks stand in
        if theirs in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, **kwargs)

    def access(path, mode):
        if Path(path) == theirs or (Path(path) == alice and mode & os.R_OK):
            return False
        return real_access(path, mode)

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(os, "access", access)
    said = f"this user cannot read it (Permission denied): {theirs}, owned by uid"
    with pytest.raises(ConfigError, match=rf"resume={run}: {run}: {re.escape(said)}"):
        RunFolder.config_for_resume(str(run))
    for command in (cli.evaluate_main, cli.export_main):
        args = [f"run={run}"] if command is cli.evaluate_main else [str(run), str(tmp_path / "e")]
        assert command(args) == 2
        assert said in capsys.readouterr().err
