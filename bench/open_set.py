"""The exported "unknown" threshold on a run's test split: how many faces of
identities never trained on get a name (FPIR), how many of the trained ones do not
get theirs (FNIR), at the threshold the export chose on the validation unseen faces.

    python bench/open_set.py --run runs/<run> --export exports/demo

Writes bench/results/open_set.json; docs/DEPLOYMENT.md quotes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from facecluster.builders import build_datamodule
from facecluster.cli import exit_process, output_file
from facecluster.config import ConfigError
from facecluster.data import scored
from facecluster.data.transforms import normalize_images
from facecluster.deploy import export_threshold, load_export
from facecluster.results import measured
from facecluster.run import RunFolder


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an open-set run (data.unseen_fraction > 0)")
    parser.add_argument("--export", required=True, help="its facecluster export folder")
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnx"))
    parser.add_argument("--out", type=output_file, default="bench/results/open_set.json")
    args = parser.parse_args()
    try:  # the run and the export, before the passes: one line each (tracebacks, or
        # figures of another run's faces)
        run = RunFolder(Path(args.run))
        cfg = run.finished_config()
        if not cfg.data.unseen_fraction > 0:  # before the export's load (seconds at scale)
            parser.error(f"--run {args.run} holds no identity out of training (an open-set run)")
        ident = load_export(args.export, args.runtime, "cpu")
        if ident.class_names[: len(run.class_names())] != run.class_names():
            parser.error(f"--export {args.export} is not an export of --run {args.run}")
        threshold = export_threshold(ident, args.export)
    except (ConfigError, OSError, ValueError) as e:
        parser.error(str(e))
    if threshold is None:
        parser.error(f"--export {args.export} has no unknown threshold")
    dm = build_datamodule(cfg)
    right = wrong = mated = 0
    for images, labels in dm.test_dataloader():
        keep = scored(labels)  # a broken face that nothing replaced is not a probe
        images, labels = images[keep], labels[keep]
        result = ident.identify(normalize_images(images))
        named = result.similarity >= threshold
        right += int(((result.identity == labels) & named).sum())
        wrong += int(((result.identity != labels) & named).sum())
        mated += len(labels)
    loader = dm.unseen_dataloader("test")
    scores = torch.cat(
        [ident.identify(normalize_images(x[scored(y)])).similarity for x, y in loader]
    )
    result = {
        "run": args.run,
        "runtime": args.runtime,
        "threshold": threshold,
        "threshold_probes": ident.open_set["probes"],
        "mated_test_faces": mated,
        "named_right": right / mated,
        "named_wrong": wrong / mated,
        "unknown": (mated - right - wrong) / mated,
        "fnir": 1 - right / mated,
        "nonmated_test_faces": len(scores),
        "fpir": int((scores >= threshold).sum()) / len(scores),
        "target_fpir": ident.open_set["fpir"],
        **measured(),
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
