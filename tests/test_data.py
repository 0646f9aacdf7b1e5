"""Tests for facecluster.data on real LFW face crops (datasets/lfw-demo/images)."""

from __future__ import annotations

import ast
import logging
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecluster.data import (
    IMAGE_EXTENSIONS,
    FaceDataModule,
    FaceFolder,
    FaceImageDataset,
    build_transforms,
    scan_image_folder,
    split_per_identity,
)
from facecluster.data.datamodule import ShuffleSampler, SubnetSteps
from facecluster.data.folder import Samples
from facecluster.data.images import decode_image, decode_jpeg_into
from facecluster.data.transforms import normalize_images
from tests.conftest import DEVICES

DEMO_ROOT = Path(__file__).resolve().parents[1] / "datasets" / "lfw-demo" / "images"
DATA_PKG = Path(__file__).resolve().parents[1] / "facecluster" / "data"


@pytest.fixture(autouse=True, scope="module")
def _demo_set_is_there() -> None:
    """datasets/lfw-demo is committed: without it every test here fails, saying so
    (they were all skipped, and a checkout without it passed)."""
    assert DEMO_ROOT.is_dir(), f"the committed demo images are missing at {DEMO_ROOT}"
    assert next(DEMO_ROOT.glob("*/*.jpg"), None), f"no demo image under {DEMO_ROOT}"


def _demo_jpegs(n: int) -> list[Path]:
    """The first n real JPEGs of the first demo identity."""
    first = sorted(p for p in DEMO_ROOT.iterdir() if p.is_dir())[0]
    files = sorted(first.glob("*.jpg"))[:n]
    assert len(files) == n
    return files


def _make_tree(root: Path, counts: dict[str, int]) -> Path:
    """Build root/<identity>/<k>.jpg with real JPEGs copied from the demo set."""
    source = _demo_jpegs(max(counts.values(), default=1))
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            shutil.copyfile(source[k], root / name / f"{name}_{k:04d}.jpg")
    return root


@pytest.fixture(scope="module")
def demo_folder() -> FaceFolder:
    return scan_image_folder(DEMO_ROOT, min_images_per_class=1)


@pytest.fixture()
def dm() -> FaceDataModule:
    # 6 identities, ~160 images: enough for real loaders, fast on 2 cores
    return FaceDataModule(str(DEMO_ROOT), batch_size=8, eval_batch_size=16, max_classes=6, seed=3)


# ---------------------------------------------------------------- scanning


def test_scan_demo_tree(demo_folder: FaceFolder) -> None:
    folders = sorted(
        p.name for p in DEMO_ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    assert demo_folder.class_names == folders
    assert len(demo_folder.class_names) == 158
    assert len(demo_folder.samples) == 4324
    assert demo_folder.samples == sorted(demo_folder.samples, key=lambda s: (s[1], s[0]))
    for path, label in demo_folder.samples[::97]:
        assert Path(path).parent.name == demo_folder.class_names[label]
        assert Path(path).suffix.lower() in IMAGE_EXTENSIONS
    counts = Counter(label for _, label in demo_folder.samples)
    assert min(counts.values()) >= 10 and max(counts.values()) == 530


def test_scan_only_counts_visible_image_files(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "data", {"alice": 2, "bob": 1})
    jpg = _demo_jpegs(1)[0]
    shutil.copyfile(jpg, root / "bob" / "UPPER.JPG")  # case-insensitive extension
    Image.open(jpg).save(root / "bob" / "x.png")
    shutil.copyfile(jpg, root / "bob" / ".hidden.jpg")  # hidden: ignored
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "bob" / "nested").mkdir()  # nested folders are not samples
    (root / ".cache").mkdir()
    shutil.copyfile(jpg, root / ".cache" / "a.jpg")  # hidden identity: ignored
    (root / "empty").mkdir()  # no images: not an identity
    shutil.copyfile(jpg, root / "stray.jpg")  # file at the root: not an identity

    folder = scan_image_folder(root)
    assert folder.class_names == ["alice", "bob"]
    bob = sorted(Path(p).name for p, label in folder.samples if label == 1)
    assert bob == sorted(["UPPER.JPG", "bob_0000.jpg", "x.png"])


def test_min_images_drops_identities_and_logs_names(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="facecluster.data.folder"):
        folder = scan_image_folder(DEMO_ROOT, min_images_per_class=40)
    all_counts = Counter(p.parent.name for p in DEMO_ROOT.glob("*/*.jpg"))
    dropped = sorted(n for n, c in all_counts.items() if c < 40)
    assert folder.class_names == sorted(n for n, c in all_counts.items() if c >= 40)
    assert dropped and not set(dropped) & set(folder.class_names)
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"Dropped {len(dropped)}" in message
    for name in dropped[:5]:
        assert name in message


def test_max_classes_keeps_first_after_filter(demo_folder: FaceFolder) -> None:
    full = scan_image_folder(DEMO_ROOT, min_images_per_class=40)
    limited = scan_image_folder(DEMO_ROOT, min_images_per_class=40, max_classes=3)
    assert limited.class_names == full.class_names[:3]
    assert limited.samples == [s for s in full.samples if s[1] < 3]
    assert scan_image_folder(DEMO_ROOT, max_classes=2).class_names == demo_folder.class_names[:2]


def test_missing_root_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "images"
    with pytest.raises(FileNotFoundError) as err:
        scan_image_folder(missing)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    with pytest.raises(FileNotFoundError, match=f"data.root='{missing}' does not exist"):
        FaceDataModule(str(missing)).setup()


def test_a_root_that_is_a_file_is_named_as_one(tmp_path: Path) -> None:
    # it was told "does not exist or is not a directory", though it exists
    image = _demo_jpegs(1)[0]
    with pytest.raises(NotADirectoryError, match=f"root '{image}' is a file, not an image fold"):
        FaceDataModule(str(image)).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a missing one, as before
        FaceDataModule(str(tmp_path / "missing.jpg")).setup()


def test_root_without_identities(tmp_path: Path, caplog) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    shutil.copyfile(_demo_jpegs(1)[0], root / "a.jpg")
    (root / "notes.txt").write_text("")
    (root / "empty_identity").mkdir()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as err:
        scan_image_folder(root)
    assert str(root) in str(err.value)
    # the images directly in the root are named as such, not as non-image files
    assert "1 image(s) directly in data.root, not in an identity sub-folder" in caplog.text
    assert "1 non-image file(s) are ignored" in caplog.text and "notes.txt" in caplog.text


def test_no_identity_reaches_min_images(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "data", {"alice": 3, "bob": 2})
    with pytest.raises(ValueError) as err:
        scan_image_folder(root, min_images_per_class=5)
    text = str(err.value)
    assert str(root) in text and "min_images_per_class=5" in text and "has 3" in text
    assert text.endswith("lower it, data.min_images_per_class=3")  # a fix to type
    # a run's own command (resume, evaluate, export) given other data: the fix is the
    # data, not the setting, which the run's checks then refused
    assert "Resuming, evaluating or exporting a run: point data.root at the data" in text


def test_samples_are_pairs_held_as_arrays() -> None:
    # a .rec's samples: keys and labels, each locator built when asked for
    records = Samples([0, 0, 1], keys=[5, 3, 9], rec="/d/train.rec")
    assert records == [("/d/train.rec#5", 0), ("/d/train.rec#3", 0), ("/d/train.rec#9", 1)]
    assert records[np.int64(2)] == ("/d/train.rec#9", 1) and records.source(1) == 3
    assert records[::2] == [records[0], records[2]] and list(records.locators)[1].endswith("#3")
    picked = records.take(np.array([2, 0])).relabel(np.array([4, 5]))
    assert picked == [("/d/train.rec#9", 4), ("/d/train.rec#5", 5)]
    assert picked.keys.tolist() == [9, 5]
    folder = Samples.of([("a.jpg", 1), ("b.jpg", 0)])
    assert folder.take([1]) == [("b.jpg", 0)] and folder.source(0) == "a.jpg"
    assert Samples.of(folder) is folder and folder != [("a.jpg", 1)]
    with pytest.raises(ValueError, match="one label per sample"):
        Samples([0], paths=["a", "b"])
    with pytest.raises(ValueError, match="either keys with rec, or paths"):
        Samples([0], keys=[1])


def test_folder_paths_come_back_as_written_and_workers_do_not_copy_them():
    """Image paths are one byte buffer: any name (accents, a non-UTF-8 byte kept as a
    surrogate escape) reads back as it was, and a forked DataLoader worker that reads
    every path makes no copy of them (a list of str: about 96 bytes a path)."""
    odd = b"/d/caf\xe9/1.jpg".decode("utf-8", "surrogateescape")
    names = ["/d/Zoë/1.jpg", odd, "/d/ä/2.jpg", "/d/b/3.jpg"]
    samples = Samples([0, 1, 2, 3], paths=names)
    assert list(samples.locators) == names and samples.source(1) == odd
    picked = samples.take(np.array([3, 1])).relabel(np.array([7, 8]))
    assert picked == [(names[3], 7), (odd, 8)] and picked.paths.buffer is samples.paths.buffer
    assert samples[1:3] == [(odd, 1), ("/d/ä/2.jpg", 2)]
    with pytest.raises(ValueError, match="NUL"):
        Samples([0, 1], paths=["a.jpg", "b\0.jpg"])
    rollup = Path("/proc/self/smaps_rollup")
    if not rollup.exists():
        pytest.skip("needs Linux's /proc/self/smaps_rollup")
    n = 200_000
    many = Samples(
        np.arange(n) // 20, paths=[f"/data/n{i // 20:06d}/{i:08d}.jpg" for i in range(n)]
    )

    def private_kb() -> int:
        lines = rollup.read_text().splitlines()
        return sum(int(line.split()[1]) for line in lines if line.startswith("Private_"))

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: one epoch's reads of every path
        before = private_kb()
        for i in range(n):
            many.source(i)
        os.write(write, str(private_kb() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    copied = int(os.read(read, 64)) * 1024
    assert copied / n < 10, f"a worker copied {copied / n:.0f} bytes per path read"


# ---------------------------------------------------------------- splitting


def test_split_deterministic_disjoint_covering(demo_folder: FaceFolder) -> None:
    a = split_per_identity(demo_folder, 0.1, 0.2, seed=7)
    b = split_per_identity(demo_folder, 0.1, 0.2, seed=7)
    c = split_per_identity(demo_folder, 0.1, 0.2, seed=8)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    assert a["test"].tolist() != c["test"].tolist()
    parts = [set(a[k]) for k in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(demo_folder.samples)
    assert set().union(*parts) == set(range(len(demo_folder.samples)))
    labels = {k: {demo_folder.samples[i][1] for i in a[k]} for k in a}
    everyone = set(range(len(demo_folder.class_names)))
    assert labels["train"] == labels["test"] == labels["val"] == everyone
    # per-identity counts follow n_x = max(1, round(n * x))
    counts = Counter(label for _, label in demo_folder.samples)
    test_counts = Counter(demo_folder.samples[i][1] for i in a["test"])
    val_counts = Counter(demo_folder.samples[i][1] for i in a["val"])
    for label, n in counts.items():
        assert test_counts[label] == max(1, round(n * 0.2))
        assert val_counts[label] == max(1, round(n * 0.1))


def test_split_of_identity_independent_of_other_identities() -> None:
    def by_path(folder: FaceFolder) -> dict[str, str]:
        split = split_per_identity(folder, 0.1, 0.2, seed=11)
        return {folder.samples[i][0]: name for name, idx in split.items() for i in idx}

    small = by_path(scan_image_folder(DEMO_ROOT, max_classes=4))
    large = by_path(scan_image_folder(DEMO_ROOT, max_classes=30))
    assert small and all(large[path] == where for path, where in small.items())


def test_split_zero_val_fraction(demo_folder: FaceFolder) -> None:
    split = split_per_identity(demo_folder, 0.0, 0.25, seed=1)
    assert split["val"].tolist() == []
    assert len(split["train"]) + len(split["test"]) == len(demo_folder.samples)


def test_split_too_few_images_names_identity(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "data", {"big_one": 10, "tiny_one": 2})
    folder = scan_image_folder(root)
    with pytest.raises(ValueError) as err:
        split_per_identity(folder, 0.1, 0.2, seed=0)
    text = str(err.value)
    assert "tiny_one" in text and "big_one" not in text
    assert "min_images_per_class" in text
    # the data module surfaces the same error at setup
    with pytest.raises(ValueError, match="tiny_one"):
        FaceDataModule(str(root), min_images_per_class=1).setup()
    # raising min_images_per_class, as the message says, fixes it
    FaceDataModule(str(root), min_images_per_class=3).setup()


@pytest.mark.parametrize(
    ("val", "test", "name"),
    [
        (-0.1, 0.2, "^val_fraction must be in"),
        (0.1, 1.0, "^test_fraction must be in"),
        (0.5, 0.5, r"^val_fraction \+ test_fraction must be < 1"),
    ],
)
def test_split_fraction_validation(
    demo_folder: FaceFolder, val: float, test: float, name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        split_per_identity(demo_folder, val, test, seed=0)


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [112, 64])
def test_transforms_shape_and_range(size: int) -> None:
    image = decode_image(str(_demo_jpegs(1)[0]))
    assert image.shape == (112, 112, 3) and image.dtype == torch.uint8
    for train in (True, False):
        out, mirror = build_transforms(size, train=train)(image)
        assert out.dtype == torch.uint8 and out.shape == (size, size, 3)
        assert isinstance(mirror, bool) and (train or not mirror)
        x = normalize_images(out[None])
        assert x.dtype == torch.float32 and x.shape == (1, 3, size, size)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert x.min() < -0.5 and x.max() > 0.5  # really normalised to [-1, 1], not [0, 1]
    assert normalize_images(x) is x, "float images are already normalised"
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\]"):
        normalize_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_decode_then_normalize_equals_pil_to_tensor_then_normalize() -> None:
    # The fast path (libjpeg-turbo to HWC, normalised on the device) must give the
    # old pipeline's values (PIL, ToTensor, Normalize, PIL resize) bit for bit.
    from torchvision import transforms as T

    def old(size):
        resize = T.Resize([size, size], antialias=True)
        return T.Compose([resize, T.ToTensor(), T.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])

    for path in _demo_jpegs(8):
        image = Image.open(path).convert("RGB")
        decoded = decode_image(str(path))
        assert torch.equal(decoded, torch.from_numpy(np.array(image)))
        assert torch.equal(decoded, decode_image(path.read_bytes()))
        for size in (112, 48):
            new = normalize_images(build_transforms(size, train=False)(decoded)[0][None])[0]
            assert torch.equal(new, old(size)(image)), size


def test_decode_image_formats_and_errors(tmp_path: Path) -> None:
    rgb = Image.open(_demo_jpegs(1)[0]).convert("RGB")
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")):
        path = tmp_path / f"{mode}.{fmt.lower()}"
        rgb.convert(mode).save(path, fmt)
        expected = np.array(Image.open(path).convert("RGB"))
        assert torch.equal(decode_image(str(path)), torch.from_numpy(expected)), mode
    truncated = _demo_jpegs(1)[0].read_bytes()[:1500]
    with pytest.raises(OSError, match="truncated"):
        decode_image(truncated)
    with pytest.raises(OSError):
        decode_image(b"<html>404 Not Found</html>")


def test_in_place_decode_takes_exactly_the_jpegs_it_decodes_like_decode_image(tmp_path) -> None:
    # the loaders' fast path: a JPEG of the slot's size in gray, YCbCr or RGB goes
    # straight into the slot with decode_image's pixels; anything else is refused
    # (False) and takes decode_image's path
    import io

    def encoded(image: Image.Image, **save) -> bytes:
        out = io.BytesIO()
        image.save(out, "JPEG", **save)
        return out.getvalue()

    out = np.zeros((112, 112, 3), np.uint8)
    for path in sorted(DEMO_ROOT.glob("*/*.jpg")):  # all 4,324 demo faces
        assert decode_jpeg_into(memoryview(path.read_bytes()), out), path
    rgb = Image.open(_demo_jpegs(1)[0]).convert("RGB")
    taken = {
        "baseline": encoded(rgb),
        "gray": encoded(rgb.convert("L")),
        "progressive": encoded(rgb, progressive=True),
        "exif and comment first": encoded(rgb, exif=b"Exif\0\0" + bytes(64), comment="x" * 300),
    }
    for name, data in taken.items():
        out[...] = 0
        assert decode_jpeg_into(data, out), name
        assert np.array_equal(out, decode_image(data).numpy()), name
    refused = {
        "CMYK": encoded(rgb.convert("CMYK")),
        "smaller": encoded(rgb.crop((0, 0, 112, 100))),
        "larger": encoded(rgb.resize((120, 112))),
        "truncated": taken["baseline"][:1500],
        "cut in its header": taken["baseline"][:30],
        "not a JPEG": b"\x89PNG\r\n\x1a\n" + bytes(64),
    }
    for name, data in refused.items():
        assert not decode_jpeg_into(data, out), name


def test_mirror_drawn_in_train_only_and_applied_by_normalize() -> None:
    from torchvision import transforms as T

    image = decode_image(str(_demo_jpegs(1)[0]))
    plain, mirror = build_transforms(112, train=False)(image)
    assert torch.equal(plain, image) and not mirror
    train = build_transforms(112, train=True)
    # one torch.rand(1) per image, as RandomHorizontalFlip draws it: seeded runs replay
    torch.manual_seed(3)
    draws = [bool(torch.rand(1) < 0.5) for _ in range(40)]
    torch.manual_seed(3)
    outs = [train(image) for _ in range(40)]
    assert [m for _, m in outs] == draws and 0 < sum(draws) < 40
    # normalize_images mirrors the drawn images: the old pipeline's values, bit for bit
    old = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    pil = Image.open(_demo_jpegs(1)[0]).convert("RGB")
    torch.manual_seed(3)
    expected = torch.stack([old(pil) for _ in range(40)])
    batch = torch.stack([x for x, _ in outs])
    assert torch.equal(normalize_images(batch, torch.tensor(draws)), expected)


# ---------------------------------------------------------------- data module


def test_setup_idempotent_and_properties(dm: FaceDataModule) -> None:
    assert dm.num_classes == 6  # implicit setup
    folder = dm._folder
    dm.setup("fit")
    dm.setup("test")
    assert dm._folder is folder
    assert dm.class_names == sorted(p.name for p in DEMO_ROOT.iterdir() if p.is_dir())[:6]
    for split in ("train", "val", "test"):
        labels = dm.split_labels(split)
        assert labels.dtype == torch.long and set(labels.tolist()) == set(range(6))
    with pytest.raises(ValueError):
        dm.split_labels("holdout")


def _image_index(dm: FaceDataModule) -> dict[bytes, int]:
    """Map the bytes of every train image (and its mirror) to its global label."""
    transform = build_transforms(dm.image_size, train=False)
    index = {}
    for path, label in dm.split_samples("train"):
        x, _ = transform(decode_image(path))
        index[x.numpy().tobytes()] = label
        index[x.flip(1).numpy().tobytes()] = label
    return index


def test_train_loader_before_clusters(dm: FaceDataModule) -> None:
    loader = dm.train_dataloader()
    assert not isinstance(loader.dataset, SubnetSteps)
    assert loader.generator is None
    # the stream of the run's seed and the epoch, whatever the global RNG holds
    assert isinstance(loader.sampler, ShuffleSampler) and loader.sampler.seed == dm.hparams.seed
    assert loader.drop_last
    n_train = len(dm.split_labels("train"))
    labels = torch.cat([y for _, y, _ in loader])
    assert len(labels) == (n_train // 8) * 8  # drop_last: never a ragged last batch
    assert set(labels.tolist()) <= set(range(6))
    assert dm.num_clusters is None


def test_one_loader_of_steps_after_connect_clusters(dm: FaceDataModule) -> None:
    # 6 identities -> 3 clusters; identity 4 is in clusters 1 and 2 (clustering.overlap)
    members = [torch.tensor([1, 3, 5]), torch.tensor([0, 4]), torch.tensor([2, 4])]
    dm.connect_clusters(members)
    assert dm.num_clusters == 3
    combined = dm.train_dataloader()
    # one loader, so one pool of num_workers workers for every sub-net, not one each
    assert isinstance(combined.dataset, SubnetSteps) and combined.batch_size is None
    assert combined.num_workers == dm.hparams.num_workers
    assert set(combined.dataset.datasets) == {0, 1, 2}
    train = Counter(dm.split_labels("train").tolist())
    expected = [sum(train[int(c)] for c in ids) for ids in members]
    assert dm.cluster_train_images() == expected and expected[2] > train[2]

    image_index = _image_index(dm)
    torch.manual_seed(0)
    n_steps = 0
    seen = {k: set() for k in range(3)}
    for batch in combined:
        assert set(batch) == {0, 1, 2}
        n_steps += 1
        for k, (images, labels, mirror) in batch.items():
            assert images.shape[1:] == (112, 112, 3) and len(images) > 1
            assert mirror.dtype == torch.bool and mirror.shape == labels.shape
            for image, label in zip(images, labels, strict=True):
                global_label = image_index[image.numpy().tobytes()]
                # the image belongs to this cluster, and carries its position there
                assert int(members[k][label]) == global_label
                seen[k].add(global_label)
    assert n_steps == len(combined) == dm.subnet_steps()
    assert 4 in seen[1] and 4 in seen[2]  # the shared identity trains both sub-nets


def test_negatives_add_the_nearest_outsiders_images_as_not_mine() -> None:
    # stage2.negatives=0.5: cluster 0 (identities 0, 1) also serves the images of the
    # outsiders nearest it, in the given order, half its own count (the identity that
    # crosses that count gives only what is lacking), each labelled 2 ("not mine", one
    # past its identities)
    dm = FaceDataModule(str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3, subnet_negatives=0.5)
    train = Counter(dm.split_labels("train").tolist())
    members = [torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5])]
    with pytest.raises(ValueError, match="needs every cluster's neighbours"):
        dm.connect_clusters(members)
    with pytest.raises(ValueError, match=r"neighbours\[0\] holds members of 0"):
        dm.connect_clusters(members, neighbours=[torch.tensor([1, 5]), torch.tensor([0, 1])])
    dm.connect_clusters(members, neighbours=[torch.tensor([5, 2, 3, 4]), torch.tensor([1, 0])])
    budget = round(0.5 * (train[0] + train[1]))
    taken = [5] if train[5] >= budget else [5, 2]
    own = train[0] + train[1]
    assert dm.cluster_train_images()[0] == own + budget < own + sum(train[c] for c in taken)
    image_index = _image_index(dm)
    labels = {}
    for step in dm.train_dataloader():
        images, local, _ = step[0]
        for image, label in zip(images, local.tolist(), strict=True):
            labels.setdefault(image_index[image.numpy().tobytes()], set()).add(label)
    assert labels[0] == {0} and labels[1] == {1}
    assert all(labels[c] == {2} for c in taken) and set(labels) <= {0, 1, *taken}
    assert dm._label_map(1)[np.arange(6)].tolist() == [4, 4, 0, 1, 2, 3]
    assert [int(dm._label_map(1)[c]) for c in range(6)] == [4, 4, 0, 1, 2, 3]  # one by one
    # a cluster with no outsiders (K=1, or every identity in two clusters) has none to
    # take: it crashed after stage 1, at every resume, once the budget was trimmed
    dm.connect_clusters([torch.arange(6)], neighbours=[torch.tensor([], dtype=torch.long)])
    assert dm.cluster_train_images() == [sum(train.values())]


def test_each_clusters_images_are_its_identities_train_images_in_split_order() -> None:
    # gathered from each identity's run of the label-sorted split; what a mask over
    # every training label gives, in the same order (the sub-nets' streams depend on it)
    dm = FaceDataModule(str(DEMO_ROOT), batch_size=4, max_classes=8, seed=5, subnet_negatives=0.3)
    members = [torch.tensor([0, 5, 6]), torch.tensor([1, 2, 6]), torch.tensor([3, 4, 7])]
    neighbours = [torch.tensor([7, 1, 2, 3, 4]), torch.tensor([0, 5, 3]), torch.tensor([6, 0])]
    dm.connect_clusters(members, neighbours=neighbours)
    train, labels = dm._split_indices("train"), dm.split_labels("train").numpy()
    label_of = dict(zip(train.tolist(), labels.tolist(), strict=True))
    for k, ids in enumerate(dm._cluster_ids):
        own = np.isin(labels, members[k].numpy())
        served = {label_of[i] for i in ids.tolist()}
        assert served >= set(members[k].tolist())
        # the nearest outsiders, in order, each one's first images, to 0.3 x its own
        mask, lacking = own.copy(), round(0.3 * int(own.sum()))
        for c in neighbours[k].tolist():
            first = np.flatnonzero(labels == c)[:lacking]
            mask[first] = True
            lacking -= len(first)
        assert lacking == 0 and int(mask.sum() - own.sum()) == round(0.3 * int(own.sum()))
        assert np.array_equal(ids, train[mask])


def test_subnet_datasets_share_the_split_instead_of_copying_it() -> None:
    # each sub-net's dataset counts broken files over the whole train split: one array
    # for all of them (K copies of Glint360K's 17M ids were 6 GB per process at K=64)
    dm = FaceDataModule(str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3)
    dm.connect_clusters([torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])])
    train = dm._split_indices("train")
    datasets = dm.train_dataloader().dataset.datasets.values()
    assert len(datasets) == 2
    for dataset in datasets:
        assert np.shares_memory(dataset._split_ids, train)


def test_mean_epoch_size_passes_the_train_split_once_per_epoch() -> None:
    # stage2.epoch_size=mean: K x steps x batch is the train split's size (full batches),
    # a large cluster sees a part of its images without repeats, each epoch another
    dm = FaceDataModule(
        str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3, subnet_epoch_size="mean"
    )
    members = [torch.arange(4), torch.tensor([4]), torch.tensor([5])]  # one large, two small
    dm.connect_clusters(members)
    images = dm.cluster_train_images()
    steps = dm.subnet_steps()
    assert steps == (sum(images) + 2) // 3 // 8 and steps < images[0] // 8
    largest = FaceDataModule(str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3)
    largest.connect_clusters(members)
    assert largest.subnet_steps() == images[0] // 8
    seen = []
    for epoch in range(2):
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(epoch)  # sets each sub-net's stream's epoch
        sampler = sampler.samplers[0]
        order = [i for i, _ in sampler]
        assert len(order) == steps * 8 == len(set(order))  # no image twice in an epoch
        seen.append(order)
    assert seen[0] != seen[1]
    with pytest.raises(ValueError, match="subnet_epoch_size must be one of largest, mean"):
        FaceDataModule(str(DEMO_ROOT), subnet_epoch_size="smallest")


def test_connect_clusters_validation(dm: FaceDataModule) -> None:
    good = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    with pytest.raises(ValueError, match=r"identities \[5\] are in no cluster"):
        dm.connect_clusters([torch.tensor([0, 1, 2]), torch.tensor([3, 4])])
    with pytest.raises(ValueError, match="cluster 1 has no identity"):
        dm.connect_clusters([torch.arange(6), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match=r"cluster 1's members must be in \[0, 6\)"):
        dm.connect_clusters([torch.tensor([0, 1, 2]), torch.tensor([3, 4, 6])])
    with pytest.raises(ValueError, match="cluster 0's members must be increasing"):
        dm.connect_clusters([torch.tensor([0, 2, 1]), torch.tensor([3, 4, 5])])
    with pytest.raises(ValueError, match="cluster 0's members must be increasing"):
        dm.connect_clusters([torch.tensor([0, 1, 1, 2]), torch.tensor([3, 4, 5])])
    with pytest.raises(ValueError, match="integer"):
        dm.connect_clusters([good[0].float(), good[1]])
    with pytest.raises(ValueError, match=r"subnets \[2\] are not clusters 0..1"):
        dm.connect_clusters(good, subnets=[2])
    assert dm.num_clusters is None  # failed calls leave the module untouched
    dm.connect_clusters(good)
    assert dm.num_clusters == 2


def test_eval_loaders_use_global_labels_in_order(dm: FaceDataModule) -> None:
    dm.connect_clusters([torch.arange(6)])
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        assert loader.batch_size == 16 and not loader.drop_last
        assert torch.equal(torch.cat([y for _, y in loader]), dm.split_labels(split))


def test_embedding_dataloader_shards(dm: FaceDataModule) -> None:
    train = dm.split_samples("train")
    full = dm.embedding_dataloader()
    shards = [dm.embedding_dataloader(rank=r, world_size=2) for r in range(2)]
    assert full.dataset.samples == train
    parts = [[loader.dataset.samples[i] for i in loader.sampler] for loader in shards]
    assert len(parts[0]) + len(parts[1]) == len(train)
    assert not set(parts[0]) & set(parts[1])
    assert sorted([*parts[0], *parts[1]]) == sorted(train)
    # eval transforms, no shuffle: a second pass gives identical tensors
    x1, y1 = next(iter(shards[1]))
    x2, y2 = next(iter(shards[1]))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # per-class sums over shards equal the single-process pass exactly (integer-valued check)
    sums = torch.zeros(6, dtype=torch.long)
    for loader in shards:
        for _, y in loader:
            sums += torch.bincount(y, minlength=6)
    assert torch.equal(sums, torch.bincount(dm.split_labels("train"), minlength=6))
    with pytest.raises(ValueError):
        dm.embedding_dataloader(rank=2, world_size=2)


def test_no_training_batch_of_size_one(tmp_path: Path) -> None:
    # alice 11 images -> 8 train; bob 14 -> 10 train; carol 3 -> 1 train
    root = _make_tree(tmp_path / "data", {"alice": 11, "bob": 14, "carol": 3})
    dm = FaceDataModule(
        str(root), batch_size=9, min_images_per_class=1, val_fraction=0.1, test_fraction=0.2
    )
    sizes = Counter(dm.split_labels("train").tolist())
    assert sizes == {0: 8, 1: 10, 2: 1}
    # whole split (19 > 9): drop_last, so 19 -> two batches of 9, never a lone sample
    assert [len(y) for _, y, _ in dm.train_dataloader()] == [9, 9]
    # cluster 0 = {alice} (8 <= 9): one batch of 8; cluster 1 = {bob, carol} (11 > 9): one of 9
    # (every sub-net gets as many batches as the largest cluster's full batches: 1 here)
    dm.connect_clusters([torch.tensor([0]), torch.tensor([1, 2])])
    steps = list(dm.train_dataloader())
    assert [len(step[0][1]) for step in steps] == [8]
    assert [len(step[1][1]) for step in steps] == [9]
    # a cluster with a single training image (a singleton k-means cluster) trains on
    # batches of 2, its image twice: refused, it stopped the run after stage 1, and no
    # resume could change the clustering
    dm.connect_clusters([torch.tensor([0, 1]), torch.tensor([2])])
    steps = list(dm.train_dataloader())
    assert [len(step[1][1]) for step in steps] == [2] * len(steps)
    assert all(step[1][1].tolist() == [0, 0] for step in steps)
    # and so does a cluster with fewer training images than processes (18 over 16)
    dm._world_size = lambda: 16
    assert {len(step[0][1]) for step in dm.train_dataloader()} == {2}


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        FaceDataModule(str(DEMO_ROOT), batch_size=1)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        FaceDataModule(str(DEMO_ROOT), test_fraction=1.2)


def test_dataset_label_map() -> None:
    samples = [(str(p), 2) for p in _demo_jpegs(2)]
    ds = FaceImageDataset(
        samples, build_transforms(64, train=False), label_map=torch.tensor([5, 6, 7])
    )
    image, label = ds[1]
    assert label == 7 and image.shape == (64, 64, 3)
    assert FaceImageDataset(samples, build_transforms(64, train=False))[0][1] == 2


def test_unseen_identities_never_train_and_serve_val_or_test() -> None:
    dm = FaceDataModule(str(DEMO_ROOT), max_classes=20, unseen_fraction=0.2, seed=3)
    val, test = dm.unseen_identities("val"), dm.unseen_identities("test")
    assert len(val) == len(test) == 2 and not set(val) & set(test)
    assert dm.num_classes == 16 and not set(dm.class_names) & set(val + test)
    assert all(Path(p).parent.name in dm.class_names for p, _ in dm.split_samples("train"))
    images, labels = next(iter(dm.unseen_dataloader("test")))
    assert (labels < 0).all() and images.dtype == torch.uint8
    # one negative label per unseen identity: a broken face is replaced by its own
    # person's (all were -1, and the replacement came from another identity)
    dataset = dm.unseen_dataloader("test").dataset
    names = [Path(dataset.samples.locator(i)).parent.name for i in range(len(dataset))]
    by_label = {}
    for name, label in zip(names, dataset.samples.labels.tolist(), strict=True):
        by_label.setdefault(label, set()).add(name)
    assert sorted(by_label) == [-2, -1] and all(len(n) == 1 for n in by_label.values())
    again = FaceDataModule(str(DEMO_ROOT), max_classes=20, unseen_fraction=0.2, seed=3)
    assert again.unseen_identities("val") == val and again.class_names == dm.class_names
    assert FaceDataModule(str(DEMO_ROOT), max_classes=20, seed=3).unseen_dataloader("test") is None
    with pytest.raises(ValueError, match="leaves 0 to train on"):
        FaceDataModule(str(DEMO_ROOT), max_classes=2, unseen_fraction=0.5).setup()


def test_a_split_is_kept_for_the_next_process_and_only_for_the_same_data(
    tmp_path, monkeypatch, caplog
) -> None:
    # every DDP rank, stage-2 job, evaluation and resume split the data again: 69 s at
    # 2M identities; the kept split is the one made again, or not used
    from facecluster.data import folder as folder_module

    cache = tmp_path / ".cache"

    def made(**settings) -> tuple[list[str], dict[str, list[str]], list[str]]:
        dm = FaceDataModule(str(DEMO_ROOT), max_classes=30, cache=str(cache), **settings)
        dm.setup()
        splits = {s: [p for p, _ in dm.split_samples(s)] for s in ("train", "val", "test")}
        return dm.class_names, splits, dm.unseen_identities("test")

    settings = {"unseen_fraction": 0.2, "seed": 3}
    first = made(**settings)
    (kept,) = cache.iterdir()
    assert kept.name.startswith("split-") and kept.name.endswith(".npz")
    with monkeypatch.context() as m:  # the kept split is used: nothing is drawn again
        m.setattr(folder_module, "_draw_unseen", lambda *a: pytest.fail("drawn again"))
        m.setattr(folder_module, "_split_codes", lambda *a: pytest.fail("split again"))
        assert made(**settings) == first
        # data.root as a training gives it (relative) and as its saved config does
        # (absolute): one split, whose paths only ordered it (a review: split again)
        m.chdir(DEMO_ROOT.parent)
        relative = FaceDataModule(DEMO_ROOT.name, max_classes=30, cache=str(cache), **settings)
        relative.setup()
        assert relative.unseen_identities("test") == first[2]
    uncached = FaceDataModule(str(DEMO_ROOT), max_classes=30, **settings)
    uncached.setup()
    assert uncached.class_names == first[0] and uncached.unseen_identities("test") == first[2]
    assert [p for p, _ in uncached.split_samples("val")] == first[1]["val"]
    # another seed, fraction or set of identities: its own split, not the kept one
    for other in ({"seed": 4}, {"val_fraction": 0.2}, {"unseen_fraction": 0.1}):
        changed = made(**{**settings, **other})
        assert changed != first
    changed = FaceDataModule(str(DEMO_ROOT), max_classes=29, cache=str(cache), **settings)
    changed.setup()
    assert changed.class_names != first[0]
    assert len(list(cache.iterdir())) == 5
    # a kept file that cannot be read, or does not fit, is made again, the same
    whole = kept.read_bytes()
    for damaged in (b"not a numpy file", whole[: len(whole) // 2], b""):
        kept.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert made(**settings) == first
        assert "unreadable" in caplog.text and str(kept) in caplog.text
    with kept.open("wb") as f:  # readable, but another data set's
        np.savez(f, drawn=np.array([0, 1, 2], dtype=np.int64), split_of=np.zeros(5, np.int8))
    with caplog.at_level("WARNING"):
        assert made(**settings) == first
    assert "unreadable" in caplog.text
    assert kept.read_bytes() == whole
    # a cache folder that cannot be written costs a warning, not the run
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    caplog.clear()
    with caplog.at_level("WARNING"):
        dm = FaceDataModule(str(DEMO_ROOT), max_classes=30, cache=str(blocked), **settings)
        dm.setup()
    assert dm.unseen_identities("test") == first[2] and "could not keep the split" in caplog.text


def test_data_package_does_not_import_models_or_clustering() -> None:
    for path in DATA_PKG.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                assert not name.startswith(("facecluster.models", "facecluster.clustering")), (
                    path,
                    name,
                )


def test_the_packer_starts_without_lightning_and_the_package_names_still_resolve() -> None:
    # facecluster pack --help took 10 s: the package imported its data module, and
    # with it Lightning, for a command that reads images and writes a .rec
    import subprocess
    import sys

    import facecluster
    import facecluster.data as data
    import facecluster.models as models

    # nor does the inference side (identify, enroll), nor `import facecluster`
    for module in ("facecluster.data.pack", "facecluster.inference", "facecluster"):
        code = f"import sys, {module}; print('lightning' in sys.modules)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.stdout.strip() == "False", (module, done.stderr[-2000:])
    for package in (data, models):  # each name still comes from the package
        for name in package.__all__:
            assert getattr(package, name) is not None, name
    assert data.FaceDataModule.__module__ == "facecluster.data.datamodule"
    # the Python API's names, from the packages (an ImportError for the first two: a
    # user had to find the modules that define them)
    assert models.BackboneSystem.__module__ == "facecluster.models.backbone_module"
    assert data.normalize_images.__module__ == "facecluster.data.transforms"
    assert data.load_faces.__module__ == "facecluster.data.transforms"
    from importlib.metadata import version

    assert facecluster.__version__ == version("facecluster")
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        data.NotAName  # noqa: B018


@pytest.mark.parametrize("device", DEVICES)
def test_decode_on_device_mixed_batch_and_a_broken_jpeg(device: str) -> None:
    # data.decode=device's decoder: JPEG bytes decoded in one call on the device (on the
    # CPU libjpeg-turbo's exact pixels; nvJPEG within a level on average), an image the
    # loader decoded itself copied as it is, a JPEG with a broken header reported, not
    # decoded
    from facecluster.data.images import EncodedImages, decode_on_device, device_decodable

    paths = _demo_jpegs(5)
    jpegs = [p.read_bytes() for p in paths]
    size = decode_image(jpegs[0]).shape[0]
    assert all(device_decodable(data, size) for data in jpegs)
    assert not device_decodable(jpegs[0], size // 2) and not device_decodable(b"GIF89a", size)
    broken = jpegs[4][:2] + bytes(200) + jpegs[4][-2:]  # start and end markers, nothing else
    items = [jpegs[0], jpegs[1], decode_image(jpegs[2]), jpegs[3], broken]
    images, bad = decode_on_device(
        EncodedImages(items, [0, 1, 2, 3, 4]), size, torch.device(device)
    )
    assert images.shape == (5, size, size, 3) and images.device.type == device
    assert list(bad) == [4] and isinstance(bad[4], OSError)  # the CPU decoder's own words
    for row in (0, 1, 2, 3):
        expected = decode_image(jpegs[row])
        got = images[row].cpu()
        if device == "cpu" or row == 2:
            assert torch.equal(got, expected), row
        else:
            assert (got.float() - expected.float()).abs().mean() < 1.0, row
    # normalize_images takes the decoder's channels-first batch without another copy
    assert normalize_images(images).shape == (5, 3, size, size)


def test_only_whole_baseline_jpegs_in_ycbcr_or_gray_go_to_the_device() -> None:
    # what nvJPEG might decode wrongly or slowly stays with the CPU decoder: a file cut
    # short (nvJPEG may fill it with grey without an error), a progressive JPEG (decoded
    # image by image there); trailing padding after the end marker is fine, and so are
    # gray JPEGs and a quality-9 one (its quantization table holds the bytes FF C2, the
    # progressive marker, which only the frame header may decide on)
    import io

    from facecluster.data.images import device_decodable

    data = _demo_jpegs(1)[0].read_bytes()
    size = decode_image(data).shape[0]
    assert device_decodable(data, size) and device_decodable(data + b"\0\0\n", size)
    assert not device_decodable(data[: len(data) // 2], size)
    image = Image.open(io.BytesIO(data))
    saved = {}
    for name, mode, options in [
        ("progressive", "RGB", {"progressive": True, "quality": 95}),
        ("gray", "L", {}),
        ("quality 9", "RGB", {"quality": 9}),
    ]:
        out = io.BytesIO()
        image.convert(mode).save(out, "JPEG", **options)
        saved[name] = out.getvalue()
        assert decode_image(saved[name]).shape == (size, size, 3), name
    assert not device_decodable(saved["progressive"], size)
    assert device_decodable(saved["gray"], size)
    assert b"\xff\xc2" in saved["quality 9"] and device_decodable(saved["quality 9"], size)


def test_device_decoder_failures_raise_and_refused_files_fall_back_to_the_cpu(
    monkeypatch, caplog
) -> None:
    # torchvision wraps its CUDA decoder's errors in RuntimeError: out of memory or a
    # missing nvJPEG must stop training, not turn every batch into CPU decodes; a file
    # the device refuses is decoded on the CPU instead, and that is said once
    import facecluster.data.images as images_module
    from facecluster.data.images import EncodedImages, decode_on_device

    jpegs = [p.read_bytes() for p in _demo_jpegs(3)]
    size = decode_image(jpegs[0]).shape[0]
    batch = EncodedImages(list(jpegs), [0, 1, 2])

    def failing(words):
        def decode(inputs, device):
            raise RuntimeError(f"Error while decoding JPEG images: {words}")

        return decode

    decoder = [  # the decoder's: nvJPEG statuses 1, 5, 6, 7, 8, out of memory, no nvJPEG
        "CUDA out of memory. Tried to allocate 2.00 MiB",
        "Failed to initialize nvjpeg with hardware backend: 6",
        "Failed to transfer jpeg to device: 5",
        "decode_jpegs_cuda: torchvision not compiled with nvJPEG support",
    ]
    trace = "\nException raised from decode at decode_jpegs_cuda.cpp:120 (cudaStreamSynchronize)"
    files = [  # a file's: statuses 3, 4, 10, or no decoder words outside the stack trace
        "Failed to parse jpeg stream: 2",
        "Failed to get image info: 3",
        "Failed to transfer jpeg to device: 10",
        "Failed to decode jpeg stream: 4" + trace,
        "Unknown chroma subsampling",
    ]
    for words in decoder:
        monkeypatch.setattr(images_module, "_decode_jpegs", failing(words))
        with pytest.raises(RuntimeError, match=words[:20]) as stopped:
            decode_on_device(batch, size, torch.device("cpu"))
        if "out of memory" not in words:  # torch's own error when that is what it is
            assert "data.decode=device: the cpu JPEG decoder failed" in str(stopped.value)
            assert "data.decode=cpu" in str(stopped.value)
    for words in files:
        monkeypatch.setattr(images_module, "_decode_jpegs", failing(words))
        monkeypatch.setattr(images_module, "_REFUSALS_SAID", False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="facecluster.data.images"):
            decoded, bad = decode_on_device(batch, size, torch.device("cpu"))
            decode_on_device(batch, size, torch.device("cpu"))
        assert not bad, words
        for row, data in enumerate(jpegs):
            assert torch.equal(decoded[row], decode_image(data)), (words, row)
        said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(said) == 1 and "refused 3 JPEG(s)" in said[0], (words, said)
    calls = []

    def batch_fails_then_memory_runs_out(inputs, device):  # a file, then the decoder
        calls.append(len(inputs))
        words = "Failed to decode batch: 3" if len(calls) == 1 else "CUDA out of memory"
        raise RuntimeError(f"Error while decoding JPEG images: {words}")

    monkeypatch.setattr(images_module, "_decode_jpegs", batch_fails_then_memory_runs_out)
    with pytest.raises(RuntimeError, match="out of memory"):
        decode_on_device(batch, size, torch.device("cpu"))
    assert calls == [3, 1]


def test_cuda_decode_runs_on_a_side_stream_that_the_current_stream_waits_for(monkeypatch):
    # The CUDA branch of the decode, on this CPU machine, with torch.cuda's stream API
    # and torchvision's decode_jpeg replaced by recorders: nvJPEG must run with a side
    # stream current (pytorch/vision#9606), one per device, reused; the current stream
    # must wait for it, and every output must be marked as used by the current stream.
    import contextlib

    import torchvision.io

    import facecluster.data.images as images_module

    events: list[tuple] = []

    class Stream:
        def __init__(self, device=None, name="side"):
            self.device, self.name = device, name
            events.append(("new", name, device))

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    class Output:
        def record_stream(self, stream):
            events.append(("record", stream.name))

    current_streams = {}
    active = []

    def current_stream(device=None):
        return current_streams.setdefault(device, Stream(device, "current"))

    @contextlib.contextmanager
    def stream(s):
        active.append(s)
        yield
        active.pop()

    def decode_jpeg(inputs, mode, device):
        events.append(("decode", active[-1].name if active else "current", str(device)))
        return [Output() for _ in inputs]

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(images_module, "_SIDE_STREAMS", {})
    inputs = [torch.zeros(4, dtype=torch.uint8)] * 2
    for _ in range(2):
        out = images_module._decode_jpegs(inputs, torch.device("cuda:1"))
        assert len(out) == 2
    side = [e for e in events if e[0] == "new" and e[1] == "side"]
    assert side == [("new", "side", 1)], events  # one side stream for device 1, reused
    calls = [e for e in events if e[0] != "new"]
    one_call = [
        ("decode", "side", "cuda:1"),
        ("wait", "current", "side"),
        ("record", "current"),
        ("record", "current"),
    ]
    assert calls == one_call * 2, calls


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resumed_ddp_stage1_loader_draws_the_epoch_it_continues_with(workers):
    # Lightning makes a resumed fit's first iterator before it calls set_epoch; with
    # workers the injected DistributedSampler had drawn epoch 0's order by then, so the
    # first resumed epoch of a DDP stage 1 trained on other batches than the
    # uninterrupted run. The datamodule's own sampler starts at the checkpoint's epoch.
    from types import SimpleNamespace

    def loader(epoch: int | None, rank: int):
        dm = FaceDataModule(
            str(DEMO_ROOT), batch_size=8, max_classes=6, seed=3, num_workers=workers
        )
        dm.setup("fit")
        cpu = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=cpu, current_epoch=2)
        if epoch is not None:
            dm.load_state_dict({"next_epoch": epoch})
        return dm, dm.train_dataloader()

    dm, resumed = loader(3, rank=1)
    assert isinstance(resumed.sampler, torch.utils.data.DistributedSampler)
    first = [labels.tolist() for _, labels, _ in resumed]  # iterated before any set_epoch
    _, fresh = loader(None, rank=1)
    fresh.sampler.set_epoch(3)  # the uninterrupted run, at its epoch 3
    assert first == [labels.tolist() for _, labels, _ in fresh]
    _, other = loader(3, rank=0)  # the other rank: the other half of the same order
    assert first != [labels.tolist() for _, labels, _ in other]
    assert dm.state_dict() == {"next_epoch": 3}  # what a checkpoint at epoch 2's end keeps


def test_stage1_streams_index_and_mirror_pairs_in_chunks_of_the_seed_and_epoch(monkeypatch):
    # Stage 1's stream: DistributedSampler's layout (a padded permutation, rank r taking
    # positions r, r + world...) of a generator seeded by (seed, epoch) through
    # SeedSequence, so that seed 43's first epoch is not seed 42's second (a seed sweep
    # trained one identity sequence shifted by an epoch, a review). Each index comes with
    # its mirror draw, from the same generator: neither the global RNG nor a worker's
    # decides anything (the worker count changed stage 1's weights, a review).
    from facecluster.data import datamodule as dm_module

    monkeypatch.setattr(dm_module, "_CHUNK", 7)  # several chunks, a partial last one
    data = list(range(23))

    def stream(world, rank, seed, epoch):
        sampler = ShuffleSampler(len(data), seed, rank, world)
        sampler.set_epoch(epoch)
        torch.manual_seed(rank + 100 * epoch)  # the global RNG anywhere: no matter
        pairs = list(sampler)
        assert len(pairs) == len(sampler) and all(type(m) is bool for _, m in pairs)
        return pairs

    for world in (1, 2, 3, 5, 30):  # 30: padded past a whole repeat of the data
        for epoch in (0, 4):
            ranks = [stream(world, rank, 11, epoch) for rank in range(world)]
            torch.manual_seed(7)
            assert ranks[0] == stream(world, 0, 11, epoch)  # a function of its arguments
            torch_layout = torch.utils.data.DistributedSampler(data, world, 0, seed=0)
            assert len(ranks[0]) == len(torch_layout)
            interleaved = [ranks[p % world][p // world][0] for p in range(world * len(ranks[0]))]
            first = interleaved[: len(data)]
            assert sorted(first) == data  # a permutation, padded with its first indices
            assert interleaved[len(data) :] == (first * 2)[: len(interleaved) - len(data)]
    assert stream(2, 0, 43, 0) != stream(2, 0, 42, 1)
    assert [i for i, _ in stream(1, 0, 42, 0)] != [i for i, _ in stream(1, 0, 42, 1)]
    mirrors = [m for _, m in stream(1, 0, 42, 0) + stream(1, 0, 42, 1)]
    assert 10 < sum(mirrors) < 36  # about half of 46
    torch.manual_seed(5)
    after = torch.rand(1)
    torch.manual_seed(5)
    list(ShuffleSampler(len(data), 42))
    assert torch.rand(1) == after  # the global RNG is not drawn from


@pytest.mark.parametrize("workers", [0, 1])
def test_an_evaluation_split_under_ddp_is_padded_with_faces_no_score_counts(workers):
    # Lightning's DistributedSampler pads a split to a multiple of the world size with
    # repeated faces, which val/acc, test/acc and the sub-nets' test counts counted
    # twice; the padding now comes labelled IGNORED
    from types import SimpleNamespace

    from facecluster.data import IGNORED, scored
    from facecluster.data.datamodule import EvalShardSampler

    assert [list(EvalShardSampler(5, r, 2)) for r in (0, 1)] == [[0, 2, 4], [1, 3, 5]]
    assert [len(EvalShardSampler(5, r, 3)) for r in (0, 1, 2)] == [2, 2, 2]
    dm = FaceDataModule(str(DEMO_ROOT), batch_size=8, eval_batch_size=4, max_classes=6, seed=3,
                        num_workers=workers)  # fmt: skip
    dm.setup("fit")
    expected = dm.split_labels("test").tolist()
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    seen = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, strategy=cpu)
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, EvalShardSampler)
        labels = torch.cat([labels for _, labels in loader])
        assert len(labels) == math.ceil(len(expected) / 3)
        seen += labels[scored(labels)].tolist()
        assert (labels[~scored(labels)] == IGNORED).all()
    assert len(expected) % 3 and sorted(seen) == sorted(expected)  # each face once


def test_a_folder_this_user_cannot_read_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    # a folder without read permission ended the run in a PermissionError traceback
    # (exit 1): from the scan of an identity folder, or, for data.root itself, naming
    # the train.rec the look for a RecordIO file could not stat; a link to such a folder
    # was "a broken or looping symlink", dropped
    from facecluster import cli
    from facecluster.data.folder import scan
    from tests.conftest import SMOKE

    root = _make_tree(tmp_path / "data", {"alice": 3, "bob": 3})
    scandir = os.scandir
    locked = {str(root / "bob"), str(root)}

    def refusing(path="."):
        if str(path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    locked.discard(str(root))
    with pytest.raises(ValueError, match=rf"cannot read {root / 'bob'} \(Permission denied\)"):
        scan(root)
    runs = tmp_path / "runs"
    assert cli.train_main(["-c", str(SMOKE), f"data.root={root}", f"output_dir={runs}"]) == 2
    err = capsys.readouterr().err
    assert f"error: data: data.root='{root}': cannot read {root / 'bob'}" in err, err
    assert "Traceback" not in err and not runs.exists()
    locked.add(str(root))
    with pytest.raises(ValueError, match=rf"cannot read the folder {root} \(Permission denied\)"):
        scan(root)


def test_a_data_root_one_level_too_high_names_the_folder_to_give(tmp_path):
    # a download unpacked as lfw/images/<identity>: "No identity sub-folders" and a
    # warning of nested folders, no word of where the identities are
    from facecluster.data.folder import scan

    _make_tree(tmp_path / "lfw" / "images", {"alice": 2, "bob": 2})
    with pytest.raises(ValueError, match=r"holds identity folders: data.root=\S+/lfw/images\?$"):
        scan(tmp_path / "lfw")


def test_a_link_to_a_folder_this_user_may_not_enter_is_not_called_broken():
    # it was warned of as "broken or looping" and its identity dropped without a word
    # of permissions (as root nothing refuses: a stand-in entry)
    import errno

    from facecluster.data.folder import _entry_kind

    class Link:
        path = "/data/linked"

        def __init__(self, error):
            self.error = error

        def is_dir(self):
            raise self.error

        def is_symlink(self):
            return True

    for error in (PermissionError(errno.EACCES, "denied"), PermissionError(errno.EPERM, "no")):
        with pytest.raises(PermissionError):
            _entry_kind(Link(error))
    assert _entry_kind(Link(OSError(errno.ELOOP, "loop"))) == "bad_link"
    assert _entry_kind(Link(OSError(errno.ENOENT, "gone"))) == "bad_link"
