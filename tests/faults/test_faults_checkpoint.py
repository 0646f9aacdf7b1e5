"""Fault injection: a crash while a checkpoint is written never leaves a broken last.ckpt."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from facecluster.checkpoint_io import AtomicCheckpointIO, NonFiniteCheckpointError
from facecluster.config import load_config
from facecluster.pipeline import train
from facecluster.run import RunFolder
from tests.conftest import SMOKE, smoke_overrides

pytestmark = pytest.mark.faults

real_save = torch.save


class Crash(Exception):
    """Stands for the process dying in the middle of torch.save."""


def half_then_crash(obj, f, *args, **kwargs):
    """Write the first half of the real bytes to ``f``, then die."""
    import io

    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    raise Crash("killed halfway through torch.save")


def test_crash_during_save_keeps_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "state_dict": {"w": torch.ones(1000)}}, path)
    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(Crash):
        io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.zeros(1000)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["epoch"] == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp left


def test_disk_full_during_save_keeps_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "state_dict": {}}, path)

    def enospc(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(OSError, match=r"last\.ckpt not written .*previous file there is unchanged"):
        io.save_checkpoint({"epoch": 1, "state_dict": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class FullDisk:
    """A file whose writes fail as a full disk's do once ``room`` bytes are written."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def filling_the_disk(room: int, name: str = ""):
    """torch.save, writing through :class:`FullDisk` into a file whose name holds ``name``."""

    def save(obj, f, *a, **k):
        where = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else ""
        return real_save(obj, FullDisk(f, room) if name in where else f, *a, **k)

    return save


def test_a_full_disk_in_torchs_own_writer_is_named_as_one(tmp_path, monkeypatch, capsys):
    # torch's zip writer turns the full disk's OSError into "RuntimeError: [enforce fail
    # at inline_container.cc:672] . unexpected pos 173888 vs 173784", the OSError only
    # as its context: a 60-line traceback ended on that, with no resume command (a
    # review filled a tmpfs mid-run)
    from facecluster.cli import train_main
    from facecluster.io import atomic_torch_save

    path = tmp_path / "clusters.pt"
    atomic_torch_save({"epoch": 0}, path)
    monkeypatch.setattr(torch, "save", filling_the_disk(1000))
    with pytest.raises(OSError) as full:
        atomic_torch_save({"w": torch.zeros(10_000)}, path)
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(path)
    assert "No space left on device" in str(full.value) and "MiB free there" in str(full.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path) == {"epoch": 0} and [p.name for p in tmp_path.iterdir()] == [path.name]
    # in a run: one line naming the checkpoint, then the command that continues it
    monkeypatch.setattr(torch, "save", filling_the_disk(1000, "last.ckpt"))
    overrides = smoke_overrides(tmp_path, "logger=none", "trainer.max_epochs=1")
    assert train_main(["-c", str(SMOKE), *overrides]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected pos" not in err, err[-3000:]
    assert "error: checkpoint " in err, err[-3000:]
    assert "not written (No space left on device" in err
    assert "once the disk has space: continue the run" in err
    assert err.rstrip().endswith(f"python train.py resume={tmp_path / 'run'}")
    monkeypatch.setattr(torch, "save", real_save)
    assert train_main([f"resume={tmp_path / 'run'}", "eval.after_training=false"]) == 0


def test_a_full_disk_names_the_file_each_write_was_for(tmp_path, monkeypatch, capsys):
    # A full disk met at a write's fsync or close, or in a temporary file beside its
    # target, said only "No space left on device" in 73 of 104 training failures of a
    # full-disk review (run.json, stage summaries, clusters.pt, sub-nets, eval tables),
    # and in every failure of pack, identify --out and evaluate.py
    from facecluster.builders import stopped_run
    from facecluster.cli import train_main
    from facecluster.io import atomic_file, replacing_together

    real_fsync = os.fsync
    full = OSError(errno.ENOSPC, "No space left on device")

    def no_space(fd):
        raise full

    folder = tmp_path / "w"
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as e, atomic_file(folder / "stage1.json") as f:
        f.write(b"{}")
    assert e.value.filename == str(folder / "stage1.json") and "MiB free there" in str(e.value)
    tables = [folder / "results.md", folder / "results.csv"]
    with pytest.raises(OSError) as e, replacing_together(*tables) as temps:
        for tmp in temps:
            tmp.write_text("x")
    assert e.value.filename == str(tables[0]) and "MiB free there" in str(e.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(OSError) as e, replacing_together(*tables) as temps:
        temps[0].write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device", str(temps[1]))
    assert e.value.filename == str(tables[1])  # the file it wrote, not its temporary one
    assert list(folder.iterdir()) == []  # no temporary file left
    run = RunFolder(tmp_path / "locked")

    def write_full(self, *args, **kwargs):
        raise full

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", write_full)
        with pytest.raises(OSError) as e, run.stage1_lock():
            pass
    assert e.value.filename == str(run.stage1_lock_path)  # not its hidden record
    assert not run.stage1_lock_path.exists()
    # a copy's error (shutil: W&B's media files) names its source first: the file it
    # could not write is named (it sent users to free space in /tmp)
    copy = OSError(errno.ENOSPC, "No space left on device", "/tmp/t.json", None, "/r/w.json")
    assert stopped_run(copy).message == "/r/w.json: No space left on device"

    # in a run: stage 1's summary, one line naming it, then how to continue
    def summary_full(fd):
        if "stage1.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise full
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", summary_full)
    overrides = smoke_overrides(tmp_path, "logger=none", "eval.after_training=false")
    assert train_main(["-c", str(SMOKE), *overrides]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'run' / 'stage1.json'}: No space left on device, " in err
    assert "once the disk has space: continue the run" in err and "Traceback" not in err


def test_a_local_checkpoint_is_read_memory_mapped(tmp_path):
    # a resume under DDP: each rank keeps only its shard of a head, so it should read
    # only those pages, not the whole gathered head and its optimizer state
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"head.weight": torch.arange(4096.0)}, "epoch": 3}, path)
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(
        loaded["state_dict"]["head.weight"][:3], torch.arange(3.0)
    )
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert str(path) in maps, "the file is mapped, not read whole"


def test_nan_weights_are_never_written(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "state_dict": {"a": torch.ones(3)}}, path)
    bad = {"epoch": 1, "state_dict": {"a": torch.tensor([1.0, float("nan")]), "n": torch.ones(2)}}
    with pytest.raises(NonFiniteCheckpointError, match=r"not writing .*last\.ckpt.*\ba\b"):
        io.save_checkpoint(bad, path)
    assert torch.load(path)["epoch"] == 0


def test_a_temporary_file_left_by_a_killed_write_goes_at_the_next_write(tmp_path):
    # kill -9 before the rename left ".last.ckpt.XXXX.tmp", as large as the checkpoint,
    # for good (a storage review: 268 KB on a smoke run, up to 8 GB for stage 1 at 2M
    # identities); the next write of that file, the resume's, removes it
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    left = [tmp_path / ".last.ckpt.k1ll3d.tmp", tmp_path / ".last.ckpt.0th3r.tmp"]
    others = [tmp_path / ".subnet0.pt.k1ll3d.tmp", tmp_path / "last.ckpt.tmp"]
    for file in left + others:
        file.write_bytes(b"half a checkpoint")
    io.save_checkpoint({"epoch": 1, "state_dict": {"a": torch.ones(3)}}, path)
    assert torch.load(path)["epoch"] == 1
    assert sorted(tmp_path.iterdir()) == sorted([path, *others])  # another file's are its own


class CrashOnSave(L.Callback):
    """Make torch.save die halfway when stage 1 writes last.ckpt at the end of epoch 1."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.stage == 1 and trainer.current_epoch == 1:

            def save(obj, f, *a, **k):
                # AtomicCheckpointIO writes to an fd of ".last.ckpt.XXXX.tmp": find its name.
                name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else ""
                if ".last.ckpt." in name:
                    half_then_crash(obj, f, *a, **k)
                return real_save(obj, f, *a, **k)

            self.monkeypatch.setattr(torch, "save", save)


def test_crash_while_saving_last_ckpt_in_a_real_run_then_resume(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "trainer.max_epochs=2"))
    with pytest.raises(Crash):
        train(cfg, callbacks=[CrashOnSave(monkeypatch)])
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "run" / "stage1" / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0, "last.ckpt is still epoch 0's complete checkpoint"
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    result = train(RunFolder.config_for_resume(str(tmp_path / "run")))
    assert (result.run_dir / "results.json").is_file()


def test_a_saved_file_keeps_its_permissions_or_takes_the_umask(tmp_path):
    # every checkpoint, clusters.pt and exported identifier.pt was made 0644 whatever
    # the umask, and a file made private (chmod 600) readable by all at its next save:
    # an export holds class means of people's faces
    from facecluster.io import atomic_torch_save, replacing

    path = tmp_path / "identifier.pt"
    previous = os.umask(0o077)
    try:
        atomic_torch_save({"a": torch.zeros(1)}, path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o640)
    atomic_torch_save({"a": torch.ones(1)}, path)
    assert path.stat().st_mode & 0o777 == 0o640
    with replacing(path) as tmp:  # config.yaml, records, tables, a pack's files
        tmp.write_bytes(b"new")
    assert path.stat().st_mode & 0o777 == 0o640
    # a cache of output_dir/.cache, which every user's runs read, takes the umask of the
    # process that writes it: one written under umask 077 and rewritten by another user
    # (who could not read it) stayed 0600, and each user in turn made it again
    from facecluster.io import atomic_file

    cache = tmp_path / "split-0123.npz"
    cache.write_bytes(b"another user's")
    cache.chmod(0o600)
    previous = os.umask(0o002)
    try:
        with atomic_file(cache, shared=True) as f:
            f.write(b"new")
    finally:
        os.umask(previous)
    assert cache.stat().st_mode & 0o777 == 0o664
