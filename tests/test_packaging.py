"""The wheel: what an installed facecluster (no checkout, no train.py) holds and does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import DEMO

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel pip builds from the checkout, unpacked as pip installs it. Built from a
    copy: setuptools builds in the tree's build/, and a file left there by an earlier
    build would be in the wheel whatever pyproject.toml says."""
    source = tmp_path_factory.mktemp("source") / "facecluster"
    left_out = ("build", "dist", "*.egg-info", ".*", "__pycache__", "datasets")
    ignored = ("runs", "wandb", "exports", "lightning_logs")  # .gitignore's run outputs
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*left_out, *ignored))
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(dist), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("facecluster-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_an_installed_package_reads_its_configs_and_says_where_the_demo_is(installed, tmp_path):
    # `facecluster train` of an installed wheel said "config file not found:
    # .../site-packages/configs/default.yaml", and `-c configs/smoke.yaml` (its own
    # help's example) "config file not found" (a packaging review)
    shipped = {
        p.relative_to(installed / "facecluster").as_posix() for p in installed.rglob("*.yaml")
    }
    assert shipped == {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert list(installed.glob("facecluster-*.dist-info/licenses/LICENSE"))
    where = _run(installed, tmp_path, "-c", "import facecluster.callbacks as c; print(c.__file__)")
    assert where.stdout.startswith(str(installed)), where.stderr  # not the checkout's

    faces = tmp_path / "faces"  # 6 of the demo's identities: a shorter run
    faces.mkdir()
    for source in sorted(p for p in DEMO.iterdir() if p.is_dir())[:6]:
        os.symlink(source, faces / source.name)
    method = _run(
        installed,
        tmp_path,
        "-c",
        "from facecluster.config import load_config; "
        "print(load_config(['configs/smoke.yaml', 'configs/method/random.yaml']).method)",
    )
    assert method.stdout == "random\n", method.stderr
    # another package's configs/ in site-packages is not facecluster's (it was read)
    (installed / "configs").mkdir()
    (installed / "configs" / "smoke.yaml").write_text("not: facecluster's\n")
    # DEPLOYMENT.md's command, its data set filled in
    trained = _run(
        installed, tmp_path, "-m", "facecluster.cli", "train", "-c", "configs/smoke.yaml",
        f"data.root={faces}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = (p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    assert (run / "eval" / "results.md").is_file() and "routed" in trained.stdout

    help_text = _run(installed, tmp_path, "-m", "facecluster.cli", "train", "--help").stdout
    assert "(default: configs/default.yaml)" in help_text
    demo = _run(installed, tmp_path, "-m", "facecluster.cli", "train", "logger=none")
    assert demo.returncode == 2 and demo.stderr.startswith(
        "error: data.root='datasets/lfw-demo/images' does not exist (looked for in "
        f"{tmp_path}) (the bundled demo set comes with a checkout of "
        "facecluster's repository, not with the installed package): give an image folder"
    ), demo.stderr
