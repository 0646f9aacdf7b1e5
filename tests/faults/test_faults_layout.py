"""Fault injection: a damaged folder layout, decided by the scan before any training."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from facecluster.data import scan_image_folder
from tests.conftest import DEMO

pytestmark = pytest.mark.faults


def _tree(root: Path) -> Path:
    src = sorted(DEMO.iterdir())[0]
    for name in ("alice", "bob"):
        (root / name).mkdir(parents=True)
        for f in sorted(src.glob("*.jpg"))[:3]:
            shutil.copyfile(f, root / name / f.name)
    return root


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_empty_identity_folders_and_non_image_files_are_named(tmp_path, caplog):
    root = _tree(tmp_path / "data")
    (root / "carol").mkdir()  # empty identity
    (root / "dave").mkdir()
    (root / "dave" / "notes.txt").write_text("no images here")
    (root / "alice" / "labels.csv").write_text("a,b")
    (root / "README.md").write_text("a stray file at the root")
    (root / "bob" / "more").mkdir()  # nested folder: not read
    with caplog.at_level(logging.WARNING):
        folder = scan_image_folder(root)
    assert folder.class_names == ["alice", "bob"]
    text = _warnings(caplog)
    assert "2 identity folder(s) hold no image files" in text
    assert str(root / "carol") in text and str(root / "dave") in text
    assert "3 non-image file(s)" in text
    for p in ("dave/notes.txt", "alice/labels.csv", "README.md"):
        assert str(root / p) in text
    assert str(root / "bob" / "more") in text


def test_symlink_loops_are_named_and_never_hang(tmp_path, caplog):
    root = _tree(tmp_path / "data")
    os.symlink(root / "loop", root / "loop")  # ELOOP on stat
    os.symlink(root / "alice" / "x.jpg", root / "alice" / "x.jpg")  # a looping "image"
    os.symlink(root / "gone", root / "bob" / "dangling.jpg")  # broken link
    os.symlink(root, root / "alice" / "up")  # points back up the tree: not descended into
    os.symlink(root, root / "again")  # an identity folder that is the root itself
    with caplog.at_level(logging.WARNING):
        folder = scan_image_folder(root)
    assert folder.class_names == ["alice", "bob"]
    assert len(folder.samples) == 6
    text = _warnings(caplog)
    assert "4 broken or looping symlink(s)" in text  # root/loop is also seen as again/loop
    for p in ("loop", "alice/x.jpg", "bob/dangling.jpg"):
        assert str(root / p) in text
    assert str(root / "again") in text  # reported as holding no images


def test_root_that_is_a_file_or_holds_nothing_fails_clearly(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="data.root=.*file' is a file, not a folder"):
        scan_image_folder(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="data.root=.*nowhere' does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError, match="No identity sub-folders containing images"):
        scan_image_folder(tmp_path / "empty")
