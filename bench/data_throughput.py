"""Images/s through the real training input pipeline, from a .rec and from a folder.

The CPU decoders are timed alone first on the same JPEG bytes: Pillow, simplejpeg
(libjpeg-turbo, what the loaders use) and ``torchvision.io.decode_jpeg``. Then, for
each ``num_workers`` in 0, 1, 2: the stage-1 training loader of FaceDataModule
(read, decode, draw the mirror flags, collate into a uint8 batch; the mirror
itself is applied on the device with the normalisation, timed separately here on
the CPU) over an image folder and over the
same folder packed into RecordIO, the same ``.rec`` loader through DataLoader's
per-item path (``rec_per_item``: fresh memory per batch, as before reused batch
buffers), the ``.rec`` loader under ``data.decode=device``
(it reads and ships the JPEG bytes; ``rec_bytes``), and the ceiling: the loaders'
decoder on the data set's JPEG bytes in a tight loop, in as many processes decoding
at once (one for ``num_workers=0``; see :func:`ceiling`). ``device_decode`` times
that setting's batched decode on ``--decode-device`` (nvJPEG on a GPU, libjpeg-turbo
on the CPU). Each loader figure is the steady rate, after one batch per batch slot.
The ``.rec`` loader is timed in its second epoch twice, in turn: as a training run's
later epochs see it (``rec``: the records whose JPEG header passed the in-place
decode's checks in the first epoch are not checked again,
``BadImageTracker.mark_passed``), and with those flags cleared (``rec_checked``: every
header checked, as in a first epoch).
A round measures the ``.rec`` loaders between two ceiling measurements and divides by
their mean, because the rate of this shared machine drifts by 10-25% over a minute;
each figure is the median over ``--rounds`` rounds (ratios: the median of the rounds'
own ratios).

    python bench/data_throughput.py --root ../shared/datasets/lfw-112/images

Writes bench/results/data_throughput.json; docs/DATA.md quotes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from statistics import median

import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader

from facecluster.cli import at_least, exit_process, output_file
from facecluster.data import FaceDataModule, scan_image_folder
from facecluster.data.images import EncodedImages, decode_on_device
from facecluster.data.pack import pack_folder
from facecluster.data.recordio import RecordFile, image_layout
from facecluster.data.transforms import normalize_images
from facecluster.results import measured


def _jpegs(rec: Path) -> list[bytes]:
    """Every image of ``rec``, in file order."""
    records = RecordFile(rec)
    return [records.record(int(k)).data for k in image_layout(records).keys]


def _pillow(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def _simplejpeg(data: bytes):
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def _torchvision(data: bytes) -> torch.Tensor:
    import warnings

    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():  # deprecated since torchvision 0.29 (torchcodec)
        warnings.simplefilter("ignore")
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _decode_rate(decoder, jpegs: list[bytes], seconds: float = 2.0) -> float:
    done, elapsed = _decode_count(decoder, jpegs, seconds)
    return done / elapsed


def _decode_count(decoder, jpegs: list[bytes], seconds: float, chunk: int = 128):
    """``(images decoded, seconds taken)``: ``jpegs`` in order, over and over, until
    ``seconds`` have passed (checked every ``chunk`` images, so that parallel
    processes stop together)."""
    done, start = 0, time.perf_counter()
    while True:
        for i in range(0, len(jpegs), chunk):
            part = jpegs[i : i + chunk]
            for data in part:
                decoder(data)
            done += len(part)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return done, elapsed


def _ceiling_process(jpegs: list[bytes], seconds: float, barrier, results) -> None:
    try:
        _decode_count(_simplejpeg, jpegs[-256:], 0.2)  # code and tables warm, as in a loader
        barrier.wait(timeout=120)  # every process decodes over the same interval
        results.put(_decode_count(_simplejpeg, jpegs, seconds))
    except BaseException as e:  # a JPEG simplejpeg refuses, a sibling that died: say so
        barrier.abort()
        results.put(e)


def ceiling(jpegs: list[bytes], processes: int, seconds: float = 1.0) -> float:
    """simplejpeg decodes per second of ``processes`` processes decoding at once (forked:
    they call simplejpeg alone), each its share of ``jpegs`` (``jpegs[p::processes]``)
    in file order: all images over the longest process's time.

    Give it the whole data set: a set small enough to stay in the CPU caches when it
    comes round again (the 5,120 images of a loader measurement, 23 MB of LFW-112,
    decoded for a second and more) would flatter the ceiling."""
    if len(jpegs) < processes:
        raise ValueError(f"ceiling: {len(jpegs)} JPEGs for {processes} processes")
    context = mp.get_context("fork")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=_ceiling_process,
            args=(jpegs[p::processes], seconds, barrier, results),
            daemon=True,
        )
        for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    failed = [c for c in counts if isinstance(c, BaseException)]
    if failed:
        raise RuntimeError(f"ceiling: a decoding process failed: {failed[0]!r}")
    return sum(done for done, _ in counts) / max(elapsed for _, elapsed in counts)


def loader_rate(
    root: Path,
    workers: int,
    batches: int,
    batch_size: int,
    decode: str = "cpu",
    per_item: bool = False,
    later_epoch: bool = False,
    forget: bool = False,
) -> float:
    """Images/s of the stage-1 training loader; ``per_item``: the same dataset through
    DataLoader's default path instead (``dataset[i]`` per image, ``default_collate``,
    each batch in fresh memory), what the loaders did before reused batch buffers;
    ``later_epoch``: timed in its second epoch (a ``.rec``'s JPEG headers are checked
    in the first only, ``BadImageTracker.mark_passed``); ``forget``: with the first
    epoch's passed flags cleared."""
    dm = FaceDataModule(
        str(root),
        image_size=112,
        batch_size=batch_size,
        num_workers=workers,
        min_images_per_class=1,
        val_fraction=0.0,
        test_fraction=0.0,
        decode=decode,
    )
    loader = dm.train_dataloader()
    buffers = loader.dataset.buffers
    # the steady rate: every batch slot has been used once (each slot's pages are
    # faulted in by its first batch, a cost paid once per loader, not per epoch)
    warmup = len(buffers.owner) if buffers is not None else 1
    if per_item:
        loader.dataset.buffers = None
        loader = DataLoader(
            loader.dataset, batch_size, shuffle=True, drop_last=True, num_workers=workers
        )
    if later_epoch:
        for _ in loader:
            pass
        if forget:
            dm._tracker.passed.zero_()
    # within one epoch: a new epoch's iterator starts its workers again
    timed = min(batches, len(loader) - warmup)
    if timed < 1:
        raise ValueError(
            f"an epoch of {len(loader)} batches leaves none to time after {warmup} "
            "warm-up batches: use a smaller --batch-size or fewer --workers"
        )
    it = iter(loader)
    for _ in range(warmup):  # workers started, slots in use
        next(it)
    done, start = 0, time.perf_counter()
    for _ in range(timed):
        done += len(next(it)[0])
    return done / (time.perf_counter() - start)


def measure_round(
    root: Path,
    rec: Path,
    jpegs: list[bytes],
    workers: int,
    batches: int,
    batch_size: int,
    seconds: float,
    index: int = 0,
) -> dict[str, float]:
    """Round ``index`` at ``workers``: the ``.rec`` loaders between two ceiling
    measurements (the machine's speed drifts; the ratio is to their mean), then the
    other loaders."""
    before = ceiling(jpegs, max(1, workers), seconds)
    rates = {}
    for forget in (False, True) if index % 2 == 0 else (True, False):  # in turn
        rates[forget] = loader_rate(
            rec, workers, batches, batch_size, later_epoch=True, forget=forget
        )
    rec_rate, checked = rates[False], rates[True]
    after = ceiling(jpegs, max(1, workers), seconds)
    folder = loader_rate(root, workers, batches, batch_size)
    per_item = loader_rate(rec, workers, batches, batch_size, per_item=True)
    return {
        "ceiling": (before + after) / 2,
        "ceiling_before": before,
        "ceiling_after": after,
        # the set size the ceiling used before: one measurement's worth of images then
        # (40 batches), over and over, in every process (see ceiling); synchronised as
        # the ceiling is now
        "ceiling_small_set": ceiling(
            [data for data in jpegs[: 40 * batch_size] for _ in range(max(1, workers))],
            max(1, workers),
            seconds,
        ),
        "folder": folder,
        "rec": rec_rate,
        "rec_checked": checked,
        "rec_per_item": per_item,
        # data.decode=device: the loader reads and ships the JPEG bytes
        "rec_bytes": loader_rate(rec, workers, batches, batch_size, decode="device"),
        "rec_vs_ceiling": rec_rate / ((before + after) / 2),
        "rec_checked_vs_ceiling": checked / ((before + after) / 2),
        "rec_vs_checked": rec_rate / checked,
        "folder_vs_ceiling": folder / ((before + after) / 2),
        "rec_vs_folder": rec_rate / folder,
        "rec_vs_per_item": rec_rate / per_item,
    }


def device_decode_rate(jpegs: list[bytes], batch_size: int, device: str, seconds: float) -> float:
    """Images/s of ``data.decode=device``'s batched decode (nvJPEG on CUDA, libjpeg-turbo
    on the CPU), batches of ``batch_size`` of the same JPEGs, output on ``device``."""
    batches = [
        EncodedImages(jpegs[i : i + batch_size], list(range(batch_size)))
        for i in range(0, len(jpegs) - batch_size + 1, batch_size)
    ]
    where = torch.device(device)
    decode_on_device(batches[0], 112, where)  # warm-up (nvJPEG handles, allocations)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in batches:
            decode_on_device(batch, 112, where)
            done += len(batch)
        if where.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def device_step_us(batch_size: int, rounds: int = 20) -> float:
    """Microseconds per image of what the device does to a training batch, timed here on
    the CPU: mirror the drawn images, move channels first, normalise."""
    images = torch.randint(0, 256, (batch_size, 112, 112, 3), dtype=torch.uint8)
    mirror = torch.rand(batch_size) < 0.5
    normalize_images(images, mirror)
    start = time.perf_counter()
    for _ in range(rounds):
        normalize_images(images, mirror)
    return (time.perf_counter() - start) / rounds / batch_size * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/datasets/lfw-112/images")
    parser.add_argument("--batches", type=at_least(1), default=90, help="timed per loader")
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--seconds", type=at_least(0.01, float), default=1.0, help="per decode-rate measurement"
    )
    parser.add_argument(
        "--decode-device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where data.decode=device's batched decode is timed (default: cuda if present)",
    )
    parser.add_argument("--out", type=output_file, default="bench/results/data_throughput.json")
    args = parser.parse_args()
    if not args.root.strip():  # "": the working directory, packed
        parser.error("--root names no folder: give an image folder of JPEG faces")
    if args.decode_device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--decode-device {args.decode_device}: this machine has no CUDA device")
    torch.set_num_threads(1)  # one thread per process, as in DataLoader workers
    root = Path(args.root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rec = pack_folder(root, Path(tmp) / "rec")
        except (OSError, ValueError) as e:  # the packer's messages name SRC: it is --root
            parser.error(f"--root: {str(e).replace('SRC=', '')}")
        jpegs = _jpegs(rec)  # the whole set (see ceiling)
        other = next((i for i, data in enumerate(jpegs) if data[:2] != b"\xff\xd8"), None)
        if other is not None:  # the decoders timed are JPEG decoders: a PNG stopped them
            path = scan_image_folder(root).samples.locator(other)  # pack's order
            parser.error(f"--root: {path} is not a JPEG; the benchmark times JPEG decoding")
        decoders = {"pillow": _pillow, "simplejpeg": _simplejpeg, "torchvision": _torchvision}
        result = {
            "root": str(root),
            "records": len(RecordFile(rec).offsets),
            "cores": mp.cpu_count(),
            "rounds": args.rounds,
            "decoders_images_per_s": {
                name: median(
                    [_decode_rate(decoder, jpegs, args.seconds) for _ in range(args.rounds)]
                )
                for name, decoder in decoders.items()
            },
            "device_step_on_cpu_us_per_image": device_step_us(args.batch_size),
            "device_decode": {
                "device": args.decode_device,
                "images_per_s": median(
                    [
                        device_decode_rate(jpegs, args.batch_size, args.decode_device, args.seconds)
                        for _ in range(args.rounds)
                    ]
                ),
            },
            "rows": [],
        }
        for workers in args.workers:
            rounds = [
                measure_round(
                    root, rec, jpegs, workers, args.batches, args.batch_size, args.seconds, i
                )
                for i in range(args.rounds)
            ]
            row = {"num_workers": workers}
            # rates: medians over the rounds; ratios: medians of each round's own ratio,
            # whose two sides were measured within seconds of each other
            row.update({key: median([r[key] for r in rounds]) for key in rounds[0]})
            row["rounds"] = rounds
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}))
    print(json.dumps(result["decoders_images_per_s"]))
    print("data.decode=device, batched decode:", json.dumps(result["device_decode"]))
    print("device step on the CPU:", result["device_step_on_cpu_us_per_image"], "us/image")
    result |= measured(args.decode_device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
