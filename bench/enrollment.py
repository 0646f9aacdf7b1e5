"""Enrolment without retraining against training from the start, on the same faces.

Run A holds some identities out of training (``data.unseen_fraction``); run B is
the same config with every identity trained (``data.unseen_fraction=0``). For each
identity A never saw, its images fall into train/val/test exactly as in B (the
split is seeded per identity name). A's export enrols those identities from
their train and val images (``facecluster enroll``); both identifiers then name
the identities' test images (routed, the run's top_m and decision unit). The script
prints and writes both top-1 accuracies, and the same accuracy on the test images
of the identities that both runs trained, before and after the enrolment, to see
what the enrolment cost them.

    python train.py run_name=demo-open                          # data.unseen_fraction=0.1
    python train.py run_name=demo-all data.unseen_fraction=0    # every identity trained
    python bench/enrollment.py --enrolled runs/demo-open --full runs/demo-all

Writes bench/results/enrollment.json; docs/DEPLOYMENT.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from facecluster.builders import build_datamodule
from facecluster.cli import exit_process, output_file
from facecluster.config import ConfigError
from facecluster.data.transforms import load_faces, normalize_images
from facecluster.deploy import calibrate_run, enroll_folder, export_run, load_export
from facecluster.inference import TwoStageIdentifier
from facecluster.results import measured
from facecluster.run import RunFolder


@torch.inference_mode()
def top1(identifier: TwoStageIdentifier, samples: list[tuple[str, str]], batch: int = 128) -> float:
    """Share of ``(path, true name)`` samples the identifier names right."""
    size, right = identifier.backbone_args["image_size"], 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        images = load_faces([path for path, _ in chunk], size)
        found = identifier.identify(normalize_images(images)).identity.tolist()
        right += sum(
            identifier.class_names[i] == name for i, (_, name) in zip(found, chunk, strict=True)
        )
    return right / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--enrolled", required=True, help="run A, with unseen identities")
    parser.add_argument("--full", required=True, help="run B, every identity trained")
    parser.add_argument("--out", type=output_file, default="bench/results/enrollment.json")
    args = parser.parse_args()
    try:  # the runs, before minutes of work: one line each (tracebacks, or figures of
        # runs that do not belong together, written with exit 0)
        enrolled, full = RunFolder(Path(args.enrolled)), RunFolder(Path(args.full))
        enrolled.finished_config()
        full_cfg = full.finished_config()
        unseen_file = enrolled.path / "unseen_identities.json"
        if not unseen_file.is_file():
            parser.error(
                f"--enrolled {args.enrolled} holds no identity out of training (no "
                f"{unseen_file.name}): train it with data.unseen_fraction > 0"
            )
        unseen = sorted(sum(json.loads(unseen_file.read_text()).values(), []))
        missing = sorted({*unseen, *enrolled.class_names()} - set(full.class_names()))
        if missing:
            parser.error(
                f"--full {args.full} did not train {len(missing)} of the identities of "
                f"--enrolled {args.enrolled} (e.g. {missing[0]!r}): give the same config "
                "with data.unseen_fraction=0"
            )
    except (ConfigError, OSError, ValueError) as e:
        parser.error(str(e))
    dm = build_datamodule(full_cfg)
    names = dm.class_names
    split = {
        s: [(p, names[label]) for p, label in dm.split_samples(s)] for s in ("train", "val", "test")
    }
    with tempfile.TemporaryDirectory() as tmp:
        model, people = Path(tmp) / "model", Path(tmp) / "people"
        export_run(args.enrolled, model)
        test_new = [(p, n) for p, n in split["test"] if n in unseen]
        test_old = [(p, n) for p, n in split["test"] if n not in unseen]
        before = top1(load_export(model, "torch", "cpu"), test_old)
        for path, name in split["train"] + split["val"]:
            if name in unseen:
                (people / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, people / name / Path(path).name)
        enroll_folder(model, people)
        enrolled = load_export(model, "torch", "cpu")
        trained = TwoStageIdentifier.from_run(full)
        calibrate_run(trained, full, full.finished_config())  # as its export would
        result = {
            "enrolled_run": str(Path(args.enrolled).resolve()),
            "full_run": str(full.path),
            "identities_enrolled": len(unseen),
            "enrolment_images": sum(1 for _, n in split["train"] + split["val"] if n in unseen),
            "test_images_enrolled_identities": len(test_new),
            "top1_enrolled": top1(enrolled, test_new),
            "top1_trained_from_start": top1(trained, test_new),
            "test_images_other_identities": len(test_old),
            "top1_others_before_enrolment": before,
            "top1_others_after_enrolment": top1(enrolled, test_old),
            "top1_others_trained_with_all": top1(trained, test_old),
            **measured(),
        }
    for key, value in result.items():
        print(f"{key}: {value:.2%}" if isinstance(value, float) else f"{key}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
