"""Fault injection: broken, odd and empty image files (facecluster.data)."""

from __future__ import annotations

import io
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from facecluster.builders import build_datamodule, module_args
from facecluster.config import ConfigError, load_config
from facecluster.data import BadImageError, FaceDataModule, FaceImageDataset, datamodule, load_rgb
from facecluster.data.images import IGNORED, decode_image, decode_on_device, scored
from facecluster.data.transforms import build_transforms, normalize_images
from facecluster.pipeline import train
from tests.conftest import DEMO, SMOKE, smoke_overrides

pytestmark = pytest.mark.faults


def _demo_jpegs(n: int) -> list[Path]:
    first = sorted(p for p in DEMO.iterdir() if p.is_dir())[0]
    return sorted(first.glob("*.jpg"))[:n]


def make_tree(root: Path, identities: int = 4, per_identity: int = 12) -> Path:
    """root/<id_k>/<n>.jpg: real identities (folders) copied from the demo set."""
    sources = sorted(p for p in DEMO.iterdir() if p.is_dir())[:identities]
    for k, src in enumerate(sources):
        (root / f"id_{k:02d}").mkdir(parents=True)
        for n, f in enumerate(sorted(src.glob("*.jpg"))[:per_identity]):
            shutil.copyfile(f, root / f"id_{k:02d}" / f"{n:04d}.jpg")
    return root


def truncate(path: Path) -> None:
    """Keep the first third of a JPEG: a download cut short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def drop_quantization_tables(path: Path) -> None:
    """Remove a JPEG's DQT segments: its header still reads (size, colorspace), so
    ``data.decode=device`` ships it, and every decoder fails on it."""
    import struct

    data = path.read_bytes()
    out, i = bytearray(data[:2]), 2
    while data[i + 1] != 0xDA:  # markers up to the start of scan
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if data[i + 1] != 0xDB:
            out += data[i : i + 2 + length]
        i += 2 + length
    path.write_bytes(bytes(out + data[i:]))


def _eval_tensor(path: Path) -> torch.Tensor:
    return build_transforms(32, train=False)(decode_image(str(path)))[0]


# ---------------------------------------------------------------- decoding


def test_odd_modes_and_sizes_become_8bit_rgb(tmp_path):
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((40, 30), 32896, dtype=np.uint16)).save(gray16)  # mid grey
    assert Image.open(gray16).mode in ("I", "I;16")  # 16-bit grey (Pillow < 10.3: "I")
    Image.new("CMYK", (50, 50), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (50, 50), 200).save(tmp_path / "gray.png")
    Image.new("RGBA", (50, 50), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("P", (50, 50)).save(tmp_path / "palette.png")
    Image.new("RGB", (3, 2), (255, 0, 0)).save(tmp_path / "tiny.png")
    Image.new("RGB", (2500, 1800), (0, 0, 255)).save(tmp_path / "huge.jpg")
    for path in sorted(tmp_path.iterdir()):
        image = load_rgb(str(path))
        assert image.mode == "RGB", path.name
        decoded = decode_image(str(path))
        assert torch.equal(decoded, torch.from_numpy(np.array(image))), path.name
        assert build_transforms(32, train=True)(decoded)[0].shape == (32, 32, 3), path.name
    # 16-bit: 32896/257 = 128, not clipped to white (PIL's plain convert gives 255)
    assert set(np.asarray(load_rgb(str(gray16))).ravel().tolist()) == {128}
    assert np.asarray(Image.open(gray16).convert("RGB")).min() == 255
    assert np.asarray(load_rgb(str(tmp_path / "cmyk.jpg")))[0, 0].tolist()[1] < 60  # magenta


@pytest.mark.parametrize(
    "pixels, expected",
    [
        (np.full((20, 20), 0.5, np.float32), [128]),  # float in [0, 1]: x 255
        (np.full((20, 20), 100.0, np.float32), [100]),  # float over 1: already 8-bit
        (np.array([[np.nan, 1.0]], np.float32), [0, 255]),  # NaN is black
        (np.full((20, 20), 200, np.int32), [200]),  # 32-bit integer, 8-bit data
        (np.full((20, 20), 32896, np.int32), [128]),  # 32-bit integer, 16-bit data
    ],
    ids=["F-unit", "F-8bit", "F-nan", "I-8bit", "I-16bit"],
)
def test_32_bit_grey_images_are_scaled_to_8_bit_not_clipped(tmp_path, pixels, expected):
    # TIFFs of mode F and I (scientific and some scanner exports): PIL's convert("RGB")
    # clips them at 255, which turns a [0, 1] float face black and a 16-bit one white
    path = tmp_path / "grey.tiff"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == ("F" if pixels.dtype == np.float32 else "I")
    assert np.unique(np.asarray(load_rgb(str(path)))).tolist() == expected
    assert np.unique(decode_image(str(path)).numpy()).tolist() == expected


def test_a_jpeg_of_a_subsampling_the_header_reader_lacks_is_decoded(tmp_path):
    # a fuzzing review: 4:4:1 chroma subsampling (cjpeg -sample 1x4,1x1,1x1), which
    # libjpeg-turbo and Pillow decode, stopped the loaders with simplejpeg's KeyError: 6
    from facecluster.data.images import device_decodable

    buffer = io.BytesIO()
    face = Image.open(_demo_jpegs(1)[0]).convert("RGB").resize((96, 96))
    face.save(buffer, "JPEG", subsampling=0)
    data = bytearray(buffer.getvalue())
    data[data.index(b"\xff\xc0") + 11] = 0x14  # the luma component sampled 1x4
    path = tmp_path / "441.jpg"
    path.write_bytes(bytes(data))
    assert torch.equal(decode_image(str(path)), torch.from_numpy(np.array(load_rgb(str(path)))))
    assert not device_decodable(bytes(data), 96)  # the CPU decodes it


# ---------------------------------------------------------------- lazy: skip / fail


def _broken_dataset(tmp_path, policy="skip", max_bad_fraction=0.5, train=True):
    good = _demo_jpegs(4)
    for i, f in enumerate(good):
        shutil.copyfile(f, tmp_path / f"{i}.jpg")
    truncate(tmp_path / "1.jpg")
    (tmp_path / "3.jpg").write_text("<html>404 Not Found</html>")  # text named .jpg
    samples = [(str(tmp_path / f"{i}.jpg"), 0) for i in range(4)]
    transform = build_transforms(32, train=train)
    return FaceImageDataset(
        samples, transform, on_bad_image=policy, max_bad_fraction=max_bad_fraction
    )


def test_skip_replaces_by_next_good_image_of_same_identity(tmp_path, caplog):
    ds = _broken_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="facecluster.data.images"):
        x1, y1, _ = ds[(1, False)]
        x3, y3, _ = ds[(3, False)]
        ds[1], ds[3]  # second reads: no second warning
    assert torch.equal(x1, _eval_tensor(tmp_path / "2.jpg")) and y1 == 0  # next good: 2
    assert torch.equal(x3, _eval_tensor(tmp_path / "0.jpg"))  # wraps around to 0
    assert len(ds) == 4
    logged = [r.getMessage() for r in caplog.records]
    for name in ("1.jpg", "3.jpg"):
        assert sum(str(tmp_path / name) in m for m in logged) == 1, logged
    assert ds.tracker.bad_paths() == [str(tmp_path / "1.jpg"), str(tmp_path / "3.jpg")]
    # an evaluation set leaves them out of its scores: a substitute, another face of the
    # identity, would be counted twice (a review)
    ds = _broken_dataset(tmp_path, train=False)
    assert [ds[i][1] for i in range(4)] == [0, IGNORED, 0, IGNORED]
    assert torch.equal(ds[2][0], _eval_tensor(tmp_path / "2.jpg"))


def test_fail_names_the_file(tmp_path):
    ds = _broken_dataset(tmp_path, policy="fail")
    ds[0]
    with pytest.raises(BadImageError, match=r"1\.jpg.*on_bad_image=fail"):
        ds[1]


def test_too_many_bad_images_stop_with_a_clear_message(tmp_path):
    ds = _broken_dataset(tmp_path, max_bad_fraction=0.3)  # 2 of 4 bad > 30%
    ds[1]  # 1 of 4: within the limit
    with pytest.raises(BadImageError, match=r"2 of 4 images .* data.max_bad_fraction=0.3"):
        ds[3]


def test_identity_with_no_readable_image_is_named(tmp_path):
    # a training set stops; an evaluation set leaves the face out (IGNORED, below)
    from facecluster.data import IGNORED

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = FaceImageDataset(
        [(str(tmp_path / "a.jpg"), 5)], build_transforms(8, True), max_bad_fraction=1.0
    )
    with pytest.raises(BadImageError, match=r"of the identity of \S+a.jpg \(label 5\) is undec"):
        ds[0]
    ds = FaceImageDataset(
        [(str(tmp_path / "a.jpg"), 5)], build_transforms(8, False), max_bad_fraction=1.0
    )
    image, label = ds[0]
    assert label == IGNORED and image.shape == (8, 8, 3) and not image.any()


@pytest.mark.parametrize("order", ["by label", "shuffled"])
def test_a_substitute_is_the_next_good_image_of_the_identity_in_any_sample_order(tmp_path, order):
    # samples sorted by label (folders, InsightFace .rec) are searched; a shuffled
    # im2rec file's are grouped: the same substitute either way, never another identity
    jpegs = _demo_jpegs(6)
    labels = [0, 0, 1, 1, 1, 2] if order == "by label" else [1, 0, 2, 1, 0, 1]
    for i, f in enumerate(jpegs):
        shutil.copyfile(f, tmp_path / f"{i}.jpg")
    broken = [i for i, y in enumerate(labels) if y == 1][1]  # the identity's second image
    truncate(tmp_path / f"{broken}.jpg")
    samples = [(str(tmp_path / f"{i}.jpg"), y) for i, y in enumerate(labels)]
    ds = FaceImageDataset(samples, build_transforms(32, train=True), max_bad_fraction=0.5)
    image, label, _ = ds[(broken, False)]
    following = [i for i, y in enumerate(labels) if y == 1][2]
    assert label == 1 and torch.equal(image, _eval_tensor(tmp_path / f"{following}.jpg"))


def test_a_broken_not_mine_image_is_replaced_by_another_outsiders(tmp_path):
    # stage2.negatives: the outsider that crosses a sub-net's budget gives its first
    # image only; when that one is broken, another outsider's image replaces it, as
    # stage 1 replaced it from the same identity (before, stage 2 stopped at every
    # resume: "every image of identity label 1 ... is undecodable")
    dm = FaceDataModule(
        str(make_tree(tmp_path / "tree", identities=3, per_identity=12)),
        batch_size=4, min_images_per_class=2, seed=0, subnet_negatives=0.15,
        max_bad_fraction=0.1,
    )  # fmt: skip
    train = dm.split_samples("train")
    first_of_1 = int(np.flatnonzero(train.labels == 1)[0])
    truncate(Path(train.locator(first_of_1)))
    for _ in dm.train_dataloader():  # stage 1: another image of identity 1 replaces it
        pass
    dm.connect_clusters(
        [torch.tensor([0]), torch.tensor([1, 2])],
        neighbours=[torch.tensor([1, 2]), torch.tensor([0])],
    )
    assert dm.cluster_train_images()[0] == int((train.labels == 0).sum()) + 1  # 1 negative
    dataset = dm.train_dataloader().dataset.datasets[0]
    position = int(np.flatnonzero(dataset.samples.labels == 1)[0])
    assert np.flatnonzero(dataset.samples.labels != 0).tolist() == [position]  # the one
    image, label, _ = dataset[position]
    assert label == 1  # "not mine": the head's last row
    second_of_1 = train.locator(int(np.flatnonzero(train.labels == 1)[1]))
    expected = build_transforms(dm.hparams.image_size, train=True)(decode_image(second_of_1))[0]
    assert torch.equal(image, expected)  # identity 1's next image, outside the sub-net's own
    for _ in dm.train_dataloader():  # a stage-2 epoch, under data.on_bad_image=skip
        pass
    # with every spare broken too, the sub-net's "not mine" class is named, not identity 1
    for j in range(len(dataset.reserve)):
        truncate(Path(dataset.reserve.samples.locator(j)))
    dataset.max_bad_fraction = dataset.reserve.max_bad_fraction = 1.0  # that limit aside
    with pytest.raises(BadImageError, match=r'every "not mine" image of this sub-net \(stage2'):
        dataset._substitute(position)


def test_workers_log_once_keep_batches_and_report_to_main_process(tmp_path):
    """Two epochs with 2 worker processes: each bad path is warned about once in all,
    every batch is full, and the main process sees the flags the workers set."""
    ds = _broken_dataset(tmp_path)
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=True, drop_last=True)
    # A file handler: forked workers inherit it (pytest's own capture stays in the worker).
    log = logging.getLogger("facecluster.data.images")
    handler = logging.FileHandler(tmp_path / "workers.log")
    log.addHandler(handler)
    try:
        for _ in range(2):
            sizes = [len(y) for _, y, _ in loader]
            assert sizes == [2, 2]
    finally:
        log.removeHandler(handler)
        handler.close()
    err = (tmp_path / "workers.log").read_text()
    lines = err.splitlines()
    for name in ("1.jpg", "3.jpg"):
        assert sum(str(tmp_path / name) in line for line in lines) == 1, err
    assert ds.tracker.count() == 2  # set in the workers, read here


def test_class_mean_shards_leave_a_broken_image_out_as_one_process_does(tmp_path):
    # Under DDP each rank embeds train[rank::world]. A broken image is left out of its
    # class mean (IGNORED), in any shard: the per-class sums reduced over ranks equal
    # the one-process sums, and count only the readable images (a substitute, another
    # image of the identity, had counted that image twice).
    root = make_tree(tmp_path / "data", identities=3, per_identity=12)
    dm = FaceDataModule(str(root), batch_size=4, min_images_per_class=5, max_bad_fraction=0.5)
    dm.setup()
    train = list(dm.split_samples("train"))
    broken = [path for i, (path, label) in enumerate(train) if label == 1 and i % 2 == 1]
    assert 2 <= len(broken) < sum(label == 1 for _, label in train)
    for path in broken:
        truncate(Path(path))

    def sums(loaders: list[DataLoader]) -> tuple[torch.Tensor, torch.Tensor]:
        total, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
        for loader in loaders:
            for images, labels in loader:
                keep = scored(labels)
                total.index_add_(0, labels[keep], images[keep].double().flatten(1).sum(1))
                count.index_add_(0, labels[keep], torch.ones_like(labels[keep]))
        return total, count

    shards = sums([dm.embedding_dataloader(rank, 2) for rank in (1, 0)])  # shard 1 first
    assert dm.bad_images() == sorted(broken)
    one = sums([dm.embedding_dataloader()])
    assert torch.equal(shards[0], one[0]) and torch.equal(shards[1], one[1])
    readable = torch.bincount(torch.tensor([y for _, y in train]), minlength=3)
    assert one[1].tolist() == (readable - torch.tensor([0, len(broken), 0])).tolist()


def _share_on_rank(rank: int, store: str, root: str, limit: float, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # made after the fork: each rank has its own flags, as under DDP
        dm = FaceDataModule(root, batch_size=4, min_images_per_class=5, max_bad_fraction=limit)
        for _ in dm.embedding_dataloader(rank, 2):  # this rank's shard of the train split
            pass
        found = dm.bad_images()
        try:
            dm.share_bad_images(torch.device("cpu"))
            error = None
        except BadImageError as e:
            error = str(e)
        out[rank] = {"found": found, "shared": dm.bad_images(), "error": error}
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ranks_share_broken_files_and_stop_together_on_the_whole_count(tmp_path):
    """Under DDP each rank reads its shard: at the epoch end every rank learns the files
    the others found, and max_bad_fraction counts them all, so each rank's own finds
    under the limit but their sum over it stops every rank."""
    import torch.multiprocessing as mp

    root = make_tree(tmp_path / "data", identities=3, per_identity=12)
    dm = FaceDataModule(str(root), batch_size=4, min_images_per_class=5)
    train = list(dm.split_samples("train"))
    # one broken file in each rank's shard (train[rank::2]), of different identities
    broken = [
        next(path for i, (path, label) in enumerate(train) if label == rank and i % 2 == rank)
        for rank in (0, 1)
    ]
    for path in broken:
        truncate(Path(path))
    limit = 1.5 / len(train)  # one broken file is under it, two are over it
    out = mp.Manager().dict()
    # a file store, not a port: a free port found here could be taken by another test
    # process before gloo binds it
    store = str(tmp_path / "store")
    mp.start_processes(
        _share_on_rank, args=(store, str(root), limit, out), nprocs=2, start_method="fork"
    )
    for rank in (0, 1):
        assert out[rank]["found"] == [broken[rank]]  # before: its own shard's only
        assert out[rank]["shared"] == sorted(broken)
        assert f"2 of {len(train)} images of the train split" in out[rank]["error"]


# ---------------------------------------------------------------- zero-byte: at the scan


def test_zero_byte_files_are_found_by_the_scan(tmp_path, caplog):
    root = make_tree(tmp_path / "data", identities=3, per_identity=12)
    empty = root / "id_01" / "0005.jpg"
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        dm = FaceDataModule(str(root), batch_size=4, min_images_per_class=5, max_bad_fraction=0.05)
        dm.setup()
    assert str(empty) not in [p for p, _ in dm._folder.samples]
    assert any(
        str(empty) in r.getMessage() and "zero-byte" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(ValueError, match=r"zero-byte .*0005\.jpg.*on_bad_image=fail"):
        FaceDataModule(str(root), batch_size=4, min_images_per_class=5, on_bad_image="fail").setup()
    for f in list((root / "id_02").iterdir())[:3]:
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"4 of 36 image files .* empty .*max_bad_fraction"):
        FaceDataModule(
            str(root), batch_size=4, min_images_per_class=5, max_bad_fraction=0.05
        ).setup()

    # an identity whose every file is empty (an interrupted copy) is not a folder that
    # "holds no image files": its 12 files count as zero-byte files
    for f in (root / "id_02").iterdir():
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"13 of 36 image files .* empty .*max_bad_fraction"):
        FaceDataModule(str(root), batch_size=4, min_images_per_class=5).setup()
    with pytest.raises(ValueError, match=r"13 zero-byte .*id_02.*on_bad_image=fail"):
        FaceDataModule(str(root), batch_size=4, min_images_per_class=5, on_bad_image="fail").setup()


def test_the_identities_kept_do_not_depend_on_which_files_a_copy_emptied(tmp_path, caplog):
    # identities were chosen on their readable files: one pushed under
    # min_images_per_class by its empty files was dropped, the files never named even
    # under on_bad_image=fail; empty folders past max_classes counted against the rest
    root = make_tree(tmp_path / "data", identities=3, per_identity=12)
    emptied = sorted((root / "id_01").iterdir())[:3]
    for f in emptied:
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"3 zero-byte .*id_01/0000\.jpg.*on_bad_image=fail"):
        FaceDataModule(
            str(root), batch_size=4, min_images_per_class=10, on_bad_image="fail"
        ).setup()
    with caplog.at_level(logging.WARNING):  # skip: left out, and the identity with them
        dm = FaceDataModule(str(root), batch_size=4, min_images_per_class=10, max_bad_fraction=0.2)
        dm.setup()
    assert dm.class_names == ["id_00", "id_02"]
    assert (
        "fewer than data.min_images_per_class=10 images without their zero-byte files: id_01"
        in caplog.text
    )
    assert "left out 3 zero-byte" in caplog.text
    # three emptied folders past max_classes are no part of a run of the first identity
    for k in range(3):
        (root / f"zz_{k}").mkdir()
        for n in range(12):
            (root / f"zz_{k}" / f"{n:04d}.jpg").write_bytes(b"")
    dm = FaceDataModule(str(root), batch_size=4, min_images_per_class=5, max_classes=1,
                        on_bad_image="fail")  # fmt: skip
    dm.setup()
    assert dm.class_names == ["id_00"]


def test_a_held_out_identitys_zero_byte_file_is_found_too(tmp_path):
    # data.unseen_fraction: the held-out identities' empty files were dropped from the
    # scan's list, so on_bad_image=fail passed a damaged copy without a word
    root = make_tree(tmp_path / "data", identities=4, per_identity=12)
    dm = FaceDataModule(str(root), batch_size=4, min_images_per_class=5, unseen_fraction=0.5)
    held = dm.unseen_identities("val")[0]
    empty = sorted((root / held).iterdir())[3]
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"zero-byte .*{held}.*on_bad_image=fail"):
        FaceDataModule(str(root), batch_size=4, min_images_per_class=5, unseen_fraction=0.5,
                       on_bad_image="fail").setup()  # fmt: skip
    # under skip it counts against every file of the scan, held-out ones included
    # (1 of 48, within 2.5%; against the 24 files left to train it was 1 of 24)
    FaceDataModule(str(root), batch_size=4, min_images_per_class=5, unseen_fraction=0.5,
                   max_bad_fraction=0.025).setup()  # fmt: skip


def test_config_keys_and_build_datamodule(tmp_path):
    root = make_tree(tmp_path / "data", identities=3, per_identity=12)
    (root / "id_00" / "0000.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.on_bad_image='ignore' is not one of skip, fail"):
        load_config(SMOKE, ["data.on_bad_image=ignore"])
    with pytest.raises(ConfigError, match="data.max_bad_fraction must be in"):
        load_config(SMOKE, ["data.max_bad_fraction=2"])
    cfg = load_config(
        SMOKE,
        [
            f"data.root={root}",
            "data.on_bad_image=fail",
            "data.min_images_per_class=5",
            "clustering.num_clusters=2",
            "data.max_classes=null",
        ],
    )
    with pytest.raises(ConfigError, match=r"0000\.jpg"):
        build_datamodule(cfg)


# ---------------------------------------------------------------- a whole run


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_run_with_broken_images_completes_and_reports(tmp_path, caplog, monkeypatch, decode):
    # data.decode=device: the JPEG without quantization tables (a valid header) reaches
    # the device as bytes, fails to decode there and is replaced and reported as the
    # loaders do it
    root = make_tree(tmp_path / "data", identities=6, per_identity=14)
    broken = [root / "id_00" / "0003.jpg", root / "id_02" / "0007.jpg"]
    drop_quantization_tables(broken[0])
    broken[1].write_text("not an image")
    (root / "id_04" / "0001.jpg").write_bytes(b"")
    on_device = []

    def spy(batch, size, device):
        images, bad = decode_on_device(batch, size, device)
        on_device.extend(batch.indices[i] for i in bad)
        return images, bad

    monkeypatch.setattr(datamodule, "decode_on_device", spy)
    overrides = [
        f"data.root={root}",
        "data.min_images_per_class=5",
        "data.max_bad_fraction=0.1",
        "clustering.num_clusters=2",
        f"data.decode={decode}",
    ]
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides))
    with (
        caplog.at_level(logging.WARNING, logger="facecluster.data"),
        caplog.at_level(logging.WARNING, logger="facecluster.callbacks"),
    ):
        result = train(cfg)
    assert (result.run_dir / "results.json").is_file()
    messages = [r.getMessage() for r in caplog.records]
    for path in broken:
        # Read in training, validation/test, the class-mean pass and stage 2: warned once.
        per_file = [m for m in messages if str(path) in m and "cannot decode" in m]
        assert len(per_file) == 1, messages
    assert any("zero-byte" in m and "id_04" in m for m in messages)
    assert any("undecodable image(s) so far" in m for m in messages)
    # each found once: stage 2's epochs do not count stage 1's finds as theirs
    new = [re.search(r"\((\d+) new this epoch\)", m) for m in messages]
    assert sum(int(n.group(1)) for n in new if n) <= len(broken), messages
    stage2 = list(result.run_dir.glob("stage2/jobs/*/checkpoints/last.ckpt"))
    assert len(stage2) == 1, "stage 2 as one job"
    for last in [result.run_dir / "stage1" / "checkpoints" / "last.ckpt", *stage2]:
        state = torch.load(last, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert bool(on_device) == (decode == "device")  # found on the device, once per epoch
    if decode == "device":  # and under fail, the device's failure names the file
        (root / "id_04" / "0001.jpg").unlink()  # fail stops at the scan for these
        shutil.copyfile(root / "id_02" / "0006.jpg", broken[1])  # only the tableless one
        failing = load_config(SMOKE, smoke_overrides(tmp_path / "fail", *overrides))
        with pytest.raises(BadImageError, match=f"cannot decode {broken[0]}"):
            train(failing.with_overrides(["data.on_bad_image=fail"]))


def test_too_many_broken_images_names_the_splits_own_files():
    # the "e.g." list took every flagged path in sample order: a val-split error could
    # name train files and none of its own
    from facecluster.data.images import BadImageTracker

    tracker = BadImageTracker([f"img{i}.jpg" for i in range(10)])
    for i in (0, 1, 7, 8):  # 0, 1 in train (0-5), 7, 8 in val (6-9)
        tracker.mark(i, OSError("broken"))
    with pytest.raises(
        BadImageError, match=r"2 of 4 images of the val split .*\(e\.g\. img7\.jpg, img8\.jpg\)"
    ):
        tracker.check(np.arange(6, 10), 0.25, "val split")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_evaluation_face_nothing_can_replace_is_left_out_not_fatal(tmp_path, workers):
    # An identity with one val image is common (55 of the demo's 142 identities): its
    # one broken file stopped the run at the first validation under on_bad_image=skip.
    # Now it is left out of the scores (IGNORED), and only of them.
    from facecluster.data import IGNORED, scored
    from facecluster.models.backbone_module import BackboneSystem

    root = make_tree(tmp_path / "data", identities=3, per_identity=10)
    dm = FaceDataModule(str(root), batch_size=4, eval_batch_size=4, num_workers=workers,
                        val_fraction=0.1, test_fraction=0.2, max_bad_fraction=0.5)  # fmt: skip
    dm.setup()
    val = list(dm.split_samples("val"))
    assert [label for _, label in val] == [0, 1, 2]  # one val image each
    truncate(Path(val[1][0]))
    labels = torch.cat([labels for _, labels in dm.val_dataloader()])
    assert labels.tolist() == [0, IGNORED, 2]
    assert scored(labels).tolist() == [True, False, True]
    # what the stage-1 validation step counts: the two other faces
    model = BackboneSystem(3, **module_args(load_config(SMOKE), 1))
    model.log = lambda *args, **kwargs: None
    model.eval()  # as Lightning runs validation
    for images, labels in dm.val_dataloader():  # as the device gets it: normalised
        model.validation_step((normalize_images(images), labels), 0)
    assert int(model.val_acc.tp + model.val_acc.fn) == 2  # faces counted (micro)
    # a batch of such faces alone (or of DDP padding alone) updates nothing, and passes
    images, _ = next(iter(dm.val_dataloader()))
    model.validation_step((normalize_images(images[:1]), torch.tensor([IGNORED])), 0)
    assert int(model.val_acc.tp + model.val_acc.fn) == 2
    # a training identity with no readable image still stops, naming it
    for path, label in dm.split_samples("train"):
        if label == 1:
            truncate(Path(path))
    with pytest.raises(BadImageError, match=r"every image in the train split of the identity"):
        for _ in dm.train_dataloader():
            pass


def test_broken_evaluation_faces_are_left_out_of_the_table_calibration_and_threshold(
    tmp_path, caplog, monkeypatch, capsys
):
    # RELIABILITY.md's row: every val and test face of one identity, and every face of
    # one unseen validation identity, unreadable after training. Evaluation, the
    # decision unit's fit and the export's open-set threshold skip exactly those faces,
    # each named in a warning, and finish.
    from facecluster import evaluation
    from facecluster.data import IGNORED
    from facecluster.deploy import export_run
    from facecluster.evaluation import evaluate_run
    from facecluster.inference import TwoStageIdentifier
    from facecluster.inference.decision import Calibration
    from facecluster.run import RunFolder

    root = shutil.copytree(DEMO, tmp_path / "faces")
    overrides = smoke_overrides(
        tmp_path, f"data.root={root}", "logger=none", "eval.after_training=false",
        "data.unseen_fraction=0.25", "data.max_bad_fraction=0.5",
    )  # fmt: skip
    run = RunFolder(train(load_config(SMOKE, overrides)).run_dir)
    dm = build_datamodule(run.finished_config())
    dm.setup()
    val, test = list(dm.split_samples("val")), list(dm.split_samples("test"))
    label = val[0][1]
    mine = [path for path, y in val + test if y == label]
    unseen = dm.unseen_dataloader("val").dataset.samples
    stranger = [path for path, y in unseen if y == unseen[0][1]]
    for path in mine + stranger:
        truncate(Path(path))
    (run.path / "calibration.json").unlink(missing_ok=True)  # fitted again, now
    scored_labels, fitted = [], []
    update, update_router = evaluation.MacroScores.update, Calibration.update_router

    def counted(self, predicted, labels):
        scored_labels.append((self, labels.clone()))
        return update(self, predicted, labels)

    def router_faces(self, log_mass, right):
        fitted.append(log_mass.shape[1])
        return update_router(self, log_mass, right)

    monkeypatch.setattr(evaluation.MacroScores, "update", counted)
    monkeypatch.setattr(Calibration, "update_router", router_faces)
    with caplog.at_level(logging.WARNING):
        report = evaluate_run(run.path, ["eval.plots=false", "eval.timing_batches=1"])
        export_run(run.path, tmp_path / "export")
    broken_test = sum(1 for path, y in test if y == label)
    broken_val = sum(1 for path, y in val if y == label)
    rows = {}  # each row's (and sweep point's) scores: the labels it counted
    for scores, labels in scored_labels:
        rows.setdefault(scores, []).extend(labels.tolist())
    assert len(rows) >= len(report.rows)
    for labels in rows.values():
        assert IGNORED not in labels and label not in labels
        assert len(labels) == len(test) - broken_test
    assert sum(fitted) == len(val) - broken_val  # the one fit, by evaluation
    probes = TwoStageIdentifier.load(tmp_path / "export" / "identifier.pt").open_set["probes"]
    assert probes == len(unseen) - len(stranger)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(str(path) in warned for path in mine + stranger), warned
    assert "evaluation and the class means leave it out" in warned
    # more broken faces than data.max_bad_fraction lets pass: evaluate.py says so in its
    # one error line, as train.py does (it printed a traceback)
    from facecluster.cli import evaluate_main

    capsys.readouterr()
    assert evaluate_main([f"run={run.path}", "data.max_bad_fraction=0.01"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [error] = [line for line in err.splitlines() if line.startswith("error: ")]
    said = r"at least (\d+) of \d+ images of the test split are undecodable, more than data.max"
    assert int(re.search(said, error)[1]) <= broken_test  # counted until the limit passed
    assert str(mine[0]) in error or str(root) in error


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_data_set_found_in_training_ends_in_one_error_and_the_resume_command(
    tmp_path, capsys, monkeypatch, workers
):
    # too many broken images in a split are found by a loader, after the run folder is
    # made: train.py printed two chained tracebacks and exit 1, and the same command
    # with a higher data.max_bad_fraction was refused (the folder exists)
    from facecluster.cli import train_main

    root = tmp_path / "faces"
    for person in sorted(p for p in DEMO.iterdir() if p.is_dir())[:12]:
        shutil.copytree(person, root / person.name)
    for image in sorted(root.glob("*/*.jpg"))[::8]:  # an eighth of every split
        image.write_bytes(b"not a jpeg")
    overrides = smoke_overrides(
        tmp_path, f"data.root={root}", f"data.num_workers={workers}", "logger=none"
    )
    assert train_main(["-c", str(SMOKE), *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [error] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert re.search(r"of the \w+ split are undecodable, more than data.max_bad_fraction", error)
    assert str(root) in error  # the culprit named
    assert err.rstrip().endswith(f"python train.py resume={tmp_path / 'run'}")
    assert "once the data is repaired: continue the run" in err
    # a stage-2 job gives no command of its own (its stage=2 would never assemble the
    # run): its launcher's error says how to continue
    monkeypatch.setenv("FACECLUSTER_JOB", "subnets-0")
    again = smoke_overrides(tmp_path / "job", f"data.root={root}", "logger=none")
    assert train_main(["-c", str(SMOKE), *again]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "continue the run" not in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.ddp
def test_under_ddp_the_process_that_finds_a_broken_image_says_so_and_the_other_stops_in_a_line(
    tmp_path,
):
    # data.on_bad_image=fail on 2 gloo processes: the broken image is in one process's
    # shard. That one printed its error and the resume command; the other printed a
    # 100-line gloo traceback ("Connection closed by peer") after it
    import subprocess
    import sys

    from tests.conftest import ROOT

    root = tmp_path / "faces"
    for person in sorted(p for p in DEMO.iterdir() if p.is_dir())[:12]:
        shutil.copytree(person, root / person.name)
    broken = sorted(root.glob("*/*.jpg"))[5]
    broken.write_bytes(b"not a jpeg")
    overrides = smoke_overrides(
        tmp_path, f"data.root={root}", "data.on_bad_image=fail", "logger=none", "stage=1"
    )
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    done = subprocess.run(
        [sys.executable, "train.py", "-c", str(SMOKE), *overrides, *ddp],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # -9: rank 0's Lightning launcher kills every process within 5 s of a process it
    # started failing, which may come before rank 0's own line
    assert done.returncode in (1, 2, -9), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = re.findall(r"error: [^\r\n]*", done.stderr)
    assert any(f"cannot decode {broken}" in e and "on_bad_image=fail" in e for e in errors)
    peer = [e for e in errors if e.startswith("error: another process of this run stopped")]
    assert len(errors) == 1 + len(peer), errors
    assert len(peer) == 1 or (done.returncode == -9 and not peer), errors
    assert f"python train.py resume={tmp_path / 'run'}" in done.stderr


def test_a_dataloader_workers_reset_by_peer_is_not_taken_for_a_ddp_peers_stop():
    # train.py says "another process of this run stopped first" for gloo's message only,
    # not for a worker's error that a network filesystem's reset put in the same words
    from facecluster.builders import peer_stopped

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection "
        "closed by peer [127.0.0.1]:19089. This is typically caused by a remote worker crashing."
    )
    assert peer_stopped(gloo)
    worker = RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        "call last):\n  ...\nRuntimeError: read of /mnt/nfs/train.rec failed: Connection "
        "reset by peer"
    )
    assert not peer_stopped(worker)


def test_a_process_whose_ddp_peer_is_gone_says_how_to_continue_the_run(
    tmp_path, capsys, monkeypatch
):
    # a rank SIGKILLed (the OOM killer) leaves no line of its own: the one left said
    # "another process ... stopped first" and nothing about the run, which a resume
    # continues (a review of the DDP paths)
    from facecluster import pipeline
    from facecluster.cli import train_main

    def gone(run):
        raise RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[127.0.0.1]:5555"
        )

    monkeypatch.setattr(pipeline, "_two_stages", gone)
    overrides = smoke_overrides(tmp_path, "logger=none")
    assert train_main(["-c", str(SMOKE), *overrides]) == 1
    err = capsys.readouterr().err
    assert "error: another process of this run stopped first" in err
    assert "once its cause is dealt with: continue the run" in err
    assert err.rstrip().endswith(f"python train.py resume={tmp_path / 'run'}")
    # a stage-2 job's launcher says how to continue, as for its other errors
    monkeypatch.setenv("FACECLUSTER_JOB", "subnets-0")
    assert train_main(["-c", str(SMOKE), *smoke_overrides(tmp_path / "job", "logger=none")]) == 1
    assert "continue the run" not in capsys.readouterr().err


def test_a_file_this_user_cannot_read_stops_as_such_under_skip(tmp_path, monkeypatch):
    # a file without read permission was counted as a damaged image under skip ("the
    # data set looks damaged ... Repair or remove them"), or replaced by another image
    # without a word within data.max_bad_fraction
    ds = _broken_dataset(tmp_path, max_bad_fraction=0.9)
    read_bytes = Path.read_bytes

    def refusing(path):
        if path.name == "0.jpg":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refusing)
    ds[2]
    with pytest.raises(BadImageError, match=r"0\.jpg \(Permission denied\): the file is not"):
        ds[0]
