"""Shared fixtures: the real smoke config, shrunk further, writing into tmp_path."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

# One torch (OpenMP) thread per process, set before torch is imported here and
# inherited by every subprocess a test starts: `make test` runs a worker per core
# (pytest-xdist) and a DDP test two ranks, and torch's default of a thread per core
# oversubscribed them: on 2 cores the suite took 17 min with two workers, 7:44 with
# one thread each (2026-11-30). A value set by the user wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from facecluster.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
DEMO = ROOT / "datasets" / "lfw-demo" / "images"
SHARED_LFW = ROOT.parent / "shared" / "datasets" / "lfw-112" / "images"
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
"""What a test parametrized by device runs on: the CPU, and a CUDA device where there is one."""


def start_train_py(*args: str, own_group: bool = False) -> subprocess.Popen:
    """``python train.py ARGS`` started from the repository root, for a test that signals
    it: its output captured as text, without this shell's ``FACECLUSTER_`` variables;
    ``own_group``: in a process group of its own (its DDP ranks, its DataLoader
    workers), for ``os.killpg``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACECLUSTER_")}
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_group,
    )


def run_script(script: str, *args: str) -> None:
    """``python <script> <args>`` from the repository root, in this process: the script's
    ``main()`` with ``sys.argv`` set, what its ``if __name__ == "__main__"`` block calls.
    For a script's later calls in a test whose first call ran it as written: a fresh
    interpreter costs about 9 s here (importing torch and Lightning), most of a call.
    Its ``SystemExit`` (a refusal, ``argparse``'s errors) reaches the caller."""
    module = load_script(script)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with mock.patch.object(sys, "argv", [script, *args]):
            module.main()
    finally:
        os.chdir(cwd)


def run_documented(command: str, folder: Path, links: tuple[str, ...] = ("train.py", "configs")):
    """A documented ``python ...`` command as written, in ``folder`` (its relative paths,
    ``runs/`` among them, land there), with ``links`` to the repository's files; the
    completed process (output captured)."""
    import subprocess

    for name in links:
        (folder / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k != "FACECLUSTER_RUN_DIR"}
    argv = [sys.executable, *command.split()[1:]]
    return subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=480)


def load_script(script: str) -> ModuleType:
    """A script of the repository (``bench/results.py``) as a module, for its functions."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKER_SECONDS = {
    "test_ddp.py": 362,
    "test_jobs.py": 240,
    "test_performance.py": 224,
    "test_deploy.py": 136,
    "test_resume.py": 119,
    "test_pipeline.py": 100,
    "test_inference.py": 94,
    "test_verification.py": 93,
    "test_faults_kill.py": 88,
    "test_modules.py": 61,
    "test_recordio.py": 59,
    "test_backbones.py": 57,
    "test_faults_bad_images.py": 51,
    "test_docs.py": 44,
    "test_config.py": 34,
    "test_packaging.py": 32,
    "test_partial_fc.py": 26,
    "test_decision.py": 22,
}
"""Seconds each file's tests took (setup included) with two xdist workers on 2 cores
(2026-12-08, AVX2 AMD EPYC, 1,929 s of the two workers' 1,053 s each; files under
20 s left out). `make test` hands whole files to its two workers (``--dist
loadfile``), the next file to the first worker free, in the order below: the longest
first, then the others by their number of tests. xdist's own order (the most tests
first) started test_ddp.py (15 tests, the longest) among the last, and it ran alone
while the other core idled."""


def pytest_collection_modifyitems(config, items):
    """Files in :data:`WORKER_SECONDS`'s order, each file's tests in their own order
    (``make test`` passes ``--no-loadscope-reorder`` so that xdist keeps it)."""
    tests = {}
    for item in items:
        tests[item.path] = tests.get(item.path, 0) + 1
    items.sort(
        key=lambda item: (-WORKER_SECONDS.get(item.path.name, 0), -tests[item.path], str(item.path))
    )


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch, tmp_path_factory):
    """Tests never talk to W&B: no key, offline unless a test says otherwise. wandb's
    own files (its debug logs, artifact staging, settings) go to the session's
    temporary folder, not the user's home (a flakiness review found hundreds left in
    ``~/.cache/wandb`` and ``~/.local/share/wandb``), and a key in the user's
    ``~/.netrc`` is not read. No run folder or job marker leaks from one test into the
    next (RunFolder.create sets the first for DDP ranks; monkeypatch restores only what
    it changed itself)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    home = tmp_path_factory.getbasetemp() / "wandb-home"
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("NETRC", str(home / "no-netrc"))
    for name in ("FACECLUSTER_RUN_DIR", "FACECLUSTER_JOB"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # restored to absent after the test, whoever set it


def smoke_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """configs/smoke.yaml made smaller still: 12 identities, few batches."""
    return [
        f"output_dir={tmp_path}",
        "run_name=run",
        "data.max_classes=12",
        "data.batch_size=8",
        "clustering.num_clusters=3",
        *extra,
    ]


@pytest.fixture
def smoke_cfg(tmp_path):
    """A factory: the smoke config with extra overrides."""

    def make(*extra: str):
        return load_config(SMOKE, smoke_overrides(tmp_path, *extra))

    return make


def make_ijb(root: Path, people: int = 12, seed: int = 0, target: str = "IJBC") -> Path:
    """An IJB release's layout (``root/meta``, ``root/loose_crop``) made from real LFW
    faces: each person's first image placed three times in larger photos, each time by
    another rotation, scale and shift, with its five points moved alike (plus half a
    pixel of noise). Template 2p + 1 holds the first photo; template 2p + 2 the other
    two, as two frames of one media. Pairs: each person's two templates (same), and
    each first template against the next three people's second ones (not). 1:N (with
    12 people): the first templates of people 0-3 are the gallery G1 (IJB-B: S1), of
    4-7 G2, and every second template a probe (subject 100 + p); people 8-11 are in
    neither gallery."""
    import numpy as np
    import simplejpeg

    from facecluster.data.ijb import REFERENCE
    from facecluster.data.images import decode_image

    rng = np.random.default_rng(seed)
    folders = sorted(SHARED_LFW.iterdir())
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    points, faces, pairs = [], [], []
    search = {"gallery1": [], "gallery2": [], "probes": []}
    for p, folder in enumerate(folders[:people]):
        first = min(folder.glob("*.jpg"))
        for template, sources in ((2 * p + 1, [first]), (2 * p + 2, [first, first])):
            for source in sources:
                angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(1.1, 1.6)
                rotation = scale * np.array(
                    [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
                )
                crop = decode_image(str(source))
                # the photo: the crop turned and scaled about its centre, the centre put
                # near the photo's, black around it
                centre = np.array(crop.shape[1::-1]) / 2 - 0.5
                shift = np.array([150, 130]) + rng.uniform(-20, 20, 2) - rotation @ centre
                matrix = np.c_[rotation, shift]
                photo = _warped(crop, matrix, (300, 260))
                name = f"{template}_{len(points)}_{source.stem}.jpg"
                (root / "loose_crop" / name).write_bytes(simplejpeg.encode_jpeg(photo, 95))
                moved = REFERENCE @ rotation.T + shift + rng.normal(0, 0.5, (5, 2))
                score = rng.uniform(0.6, 1.0)
                points.append(
                    " ".join([name, *(f"{v:.3f}" for v in moved.ravel()), f"{score:.4f}"])
                )
                faces.append(f"{name} {template} {1000 + template}")
                kind = "probes" if template % 2 == 0 else ("gallery1", "gallery2", None)[p // 4]
                if kind:
                    search[kind].append(f"{template},{100 + p},loose_crop/{name}")
        pairs.append(f"{2 * p + 1} {2 * p + 2} 1")
        pairs += [f"{2 * p + 1} {2 * ((p + q) % people) + 2} 0" for q in (1, 2, 3)]
    t = target.lower()
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    names = {"gallery1": "1N_gallery_G1", "gallery2": "1N_gallery_G2", "probes": "1N_probe_mixed"}
    if target == "IJBB":
        names.update(gallery1="1N_gallery_S1", gallery2="1N_gallery_S2")
    for kind, rows in search.items():
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME"
        (root / "meta" / f"{t}_{names[kind]}.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def _warped(image, matrix, size):
    """``image`` (uint8 [H, W, 3]) moved by the 2 x 3 ``matrix`` into a black
    ``size`` (width, height) photo: bilinear, as make_ijb needs and nothing more."""
    import numpy as np
    import torch.nn.functional as F

    width, height = size
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    points = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ inverse.T
    h, w = image.shape[:2]
    grid = torch.from_numpy(points / [(w - 1) / 2, (h - 1) / 2] - 1)[None]
    out = F.grid_sample(image.permute(2, 0, 1)[None].double(), grid, align_corners=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())
