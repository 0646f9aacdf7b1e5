"""What the sample index costs per process as a .rec grows: start-up time and memory.

Writes a synthetic ``.rec`` in InsightFace's layout (header and identity records; every
image record holds the same small JPEG, so the file is about 860 bytes per image),
then, in a fresh process: the time and resident memory of
``FaceDataModule.setup("fit")`` and the train loader, and the memory a forked
DataLoader worker makes its own by looking up every training sample once and reading
its record's bytes (what one epoch does, less the decode: Python's reference counts
write to the objects a lookup returns, so their copy-on-write pages are copied).

    python bench/sample_index.py --images 1709166 --identities 36023

(a tenth of Glint360K: 17,091,657 images of 360,232 identities). Prints one JSON line
and writes it to ``--out``; docs/DATA.md quotes it.

The set-up is measured twice, in two fresh processes sharing a cache folder
(``output_dir/.cache`` in a run): the first makes the kept split (``setup_s``), the
second reads it (``setup_cached_s``), as every later DDP rank, stage-2 job,
evaluation and resume of a run does. ``--layout im2rec`` writes the file without
header and identity records, as plain ``im2rec`` does: identities then come from one
pass over every record's label, kept there too.

    python bench/sample_index.py --layout im2rec --out bench/results/sample_index_im2rec.json

``--first-key`` starts the image keys of the InsightFace layout there instead of at 1:
past 2^24 = 16,777,216 every identity's stored key range is rounded (float32) and each
boundary is found again among the records around it, as in the second half of
WebFace42M (42.5M images) or the end of Glint360K, without writing 17M records first:

    python bench/sample_index.py --first-key 33554433 --out bench/results/index_past_2p24.json
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_rec(
    out: Path, images: int, identities: int, identity_records: bool = True, first_key: int = 1
) -> Path:
    """``out/train.rec``: ``images`` records spread evenly over ``identities``; with
    InsightFace's header and identity records (image keys from ``first_key``), or none
    (keys from 0, as im2rec)."""
    from PIL import Image

    from facecluster.data.recordio import RecordWriter, pack

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((112, 112, 3), np.uint8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    per = np.full(identities, images // identities)
    per[: images % identities] += 1
    out.mkdir(parents=True, exist_ok=True)
    with RecordWriter(out / "train.rec", out / "train.idx") as writer:
        key, ranges = (first_key if identity_records else 0), []
        for label in range(identities):
            start, payload = key, pack(float(label), jpeg)
            for _ in range(per[label]):
                writer.write(key, payload)
                key += 1
            ranges.append((start, key))
        if not identity_records:
            return out / "train.rec"
        for label, (start, end) in enumerate(ranges):
            writer.write(key + label, pack([start, end]))
        writer.write(0, pack([key, key + identities]))
    (out / "property").write_text(f"{identities},112,112\n")
    return out / "train.rec"


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _private_anonymous_mb() -> float:
    """Private dirty memory of this process's anonymous mappings (heap, arenas): where
    copied-on-write pages go. Mapped files are left out: the ``.rec`` this script has
    just written is still dirty in the page cache, and counts as private to whichever
    process alone maps it, copied or not."""
    total, anonymous = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
            anonymous = fields[4] == "0"  # inode 0: not a file
        elif anonymous and fields[0] == "Private_Dirty:":
            total += int(fields[1])
    return total / 1024


def measure(rec: str, cache: str | None = None) -> dict:
    """In this process (start it fresh): setup time and memory, then a forked reader."""
    from facecluster.data import FaceDataModule

    before, anonymous = _rss_mb(), _private_anonymous_mb()
    start = time.perf_counter()
    dm = FaceDataModule(rec, image_size=112, batch_size=128, num_workers=0, cache=cache)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    result = {
        "setup_s": time.perf_counter() - start,
        "rss_added_mb": _rss_mb() - before,
        # without the pages of the mapped .rec that the set-up touched (resident, but
        # the page cache's, shared by every process mapping the file)
        "anonymous_added_mb": _private_anonymous_mb() - anonymous,
        "train_samples": len(dataset),
    }
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker's view: forked, reads each sample once
        first = _private_anonymous_mb()
        for i in range(len(dataset)):
            locator, _ = dataset.samples[i]
            dataset.sample_ids[i], dataset.records.encoded(locator)
        os.write(write, json.dumps(_private_anonymous_mb() - first).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        result["worker_private_mb_per_epoch"] = json.loads(f.read())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_709_166)
    parser.add_argument("--identities", type=int, default=36_023)
    parser.add_argument("--layout", choices=("insightface", "im2rec"), default="insightface")
    parser.add_argument(
        "--first-key", type=int, default=1, help="the first image key (insightface)"
    )
    parser.add_argument("--out", default="bench/results/sample_index.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the fresh process's part
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.cache)))
        return
    from facecluster.cli import output_file  # not in the measuring process: its imports
    from facecluster.data import FaceDataModule
    from facecluster.results import measured

    try:  # before the measurement, not after it
        output_file(args.out)
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument --out: {e}")

    # the measured data module keeps identities of its default min_images_per_class
    least = inspect.signature(FaceDataModule).parameters["min_images_per_class"].default
    if not 0 < args.identities * least <= args.images:
        parser.error(
            f"need --identities > 0 and --images >= {least} x --identities (the data "
            f"module's min_images_per_class), got {args.identities}, {args.images}"
        )
    if args.first_key < 1 or (args.layout == "im2rec" and args.first_key != 1):
        parser.error("--first-key: a key >= 1, and only for --layout insightface")
    with tempfile.TemporaryDirectory() as tmp:
        im2rec = args.layout == "im2rec"
        rec = write_rec(Path(tmp) / "rec", args.images, args.identities, not im2rec, args.first_key)
        command = [sys.executable, __file__, "--measure", str(rec)]
        command += ["--cache", str(Path(tmp) / "cache")]

        def run() -> dict:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:  # its own error, not CalledProcessError's exit status alone
                lines = done.stderr.strip().splitlines() or ["(no output)"]
                parser.error(f"the measuring process failed: {lines[-1]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        result = run()
        cached = run()  # the second process reads the split (and labels) the first kept
        result["setup_cached_s"] = cached["setup_s"]
        result["rss_added_cached_mb"] = cached["rss_added_mb"]
        result["anonymous_added_cached_mb"] = cached["anonymous_added_mb"]
        result.update(
            layout=args.layout,
            first_key=args.first_key,
            images=args.images,
            identities=args.identities,
            rec_bytes=rec.stat().st_size,
        )
    images = result["images"]
    result["setup_us_per_image"] = result["setup_s"] / images * 1e6
    result["rss_bytes_per_image"] = result["rss_added_mb"] * 2**20 / images
    result["worker_bytes_per_train_sample"] = (
        result["worker_private_mb_per_epoch"] * 2**20 / result["train_samples"]
    )
    result |= measured()
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
