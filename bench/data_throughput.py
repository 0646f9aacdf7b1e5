"""Images/s through the real training input pipeline, from a .rec and from a folder.

For each ``num_workers`` in 0, 1, 2: the stage-1 training loader of FaceDataModule
(decode, flip, to tensor, normalise, collate) over an image folder and over the
same folder packed into RecordIO, and the ceiling: decoding the same JPEG bytes to
RGB in a tight loop in as many processes (one for ``num_workers=0``). The decoders
Pillow and ``torchvision.io.decode_jpeg`` (libjpeg-turbo) are timed alone first.

    python bench/data_throughput.py --root ../shared/datasets/lfw-112/images

Writes bench/results/data_throughput.json; docs/DATA.md quotes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from facecluster.data import FaceDataModule
from facecluster.data.pack import pack_folder
from facecluster.data.recordio import RecordFile, image_layout


def _jpegs(rec: Path, count: int) -> list[bytes]:
    records = RecordFile(rec)
    keys = image_layout(records).keys[:count]
    return [records.record(int(k)).data for k in keys]


def _pillow(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def _torchvision(data: bytes) -> torch.Tensor:
    from torchvision.io import decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _decode_rate(decoder, jpegs: list[bytes], seconds: float = 2.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in jpegs:
            decoder(data)
        done += len(jpegs)
    return done / (time.perf_counter() - start)


def _worker(args: tuple[list[bytes], float]) -> float:
    torch.set_num_threads(1)
    return _decode_rate(_pillow, *args)


def ceiling(jpegs: list[bytes], processes: int) -> float:
    """Pillow decodes per second, summed over ``processes`` parallel processes."""
    if processes == 1:
        return _worker((jpegs, 3.0))
    with mp.get_context("spawn").Pool(processes) as pool:
        return sum(pool.map(_worker, [(jpegs, 3.0)] * processes))


def loader_rate(root: Path, workers: int, batches: int, batch_size: int) -> float:
    dm = FaceDataModule(
        str(root),
        image_size=112,
        batch_size=batch_size,
        num_workers=workers,
        min_images_per_class=1,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # workers started, first batch ready
    done, start = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        done += len(images)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/datasets/lfw-112/images")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="bench/results/data_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per process, as in DataLoader workers
    root = Path(args.root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        rec = pack_folder(root, Path(tmp) / "rec")
        jpegs = _jpegs(rec, 512)
        result = {
            "root": str(root),
            "records": len(RecordFile(rec).offsets),
            "cpu": platform.processor() or platform.machine(),
            "cores": mp.cpu_count(),
            "decoders_images_per_s": {
                "pillow": _decode_rate(_pillow, jpegs),
                "torchvision.io.decode_jpeg": _decode_rate(_torchvision, jpegs),
            },
            "rows": [],
        }
        for workers in (0, 1, 2):
            row = {
                "num_workers": workers,
                "ceiling": ceiling(jpegs, max(1, workers)),
                "folder": loader_rate(root, workers, args.batches, args.batch_size),
                "rec": loader_rate(rec, workers, args.batches, args.batch_size),
            }
            row["rec_vs_ceiling"] = row["rec"] / row["ceiling"]
            row["rec_vs_folder"] = row["rec"] / row["folder"]
            result["rows"].append(row)
            print(json.dumps(row))
    print(json.dumps(result["decoders_images_per_s"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
