"""Framework overhead: facecluster's Trainer against a bare PyTorch loop, same math, same batches.

Stage 1 (backbone + ArcFace over all identities) and stage 2 (K sub-nets, one batch
each per step) run through ``build_trainer`` (facecluster's callbacks, checkpoint
plugin, progress bar, the datamodule's on-device mirror and normalisation) and
through a plain loop doing the same forward, loss, backward, optimizer and
scheduler step, on the same uint8 batches held in memory, from the same initial
weights. Only the framework differs. The class-mean pass (``embedding_class_sums``,
as the clustering callback calls it) is timed against a plain inference loop.
Steady-state time: the first ``--warmup`` steps of each fit are not timed. Fits
and loops alternate over ``--rounds`` rounds (facecluster.timing); medians.

    python bench/train_overhead.py                      # CPU, the demo's model size
    python bench/train_overhead.py --accelerator gpu --backbone iresnet50 --width 64 \\
        --image-size 112 --batch-size 256 --precision bf16-mixed

Writes bench/results/train_overhead.json; docs/PERFORMANCE.md quotes the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from facecluster.builders import build_trainer, module_args
from facecluster.cli import at_least, exit_process, output_file
from facecluster.clustering.means import accumulate_class_sums, embedding_class_sums
from facecluster.config import load_config
from facecluster.data.datamodule import network_batches
from facecluster.data.transforms import normalize_images
from facecluster.evaluation import eval_autocast
from facecluster.models.backbone_module import BackboneSystem
from facecluster.models.optim import build_optimizer, build_scheduler, param_groups
from facecluster.models.subnets_module import SubnetSystem
from facecluster.results import measured
from facecluster.run import RunFolder
from facecluster.timing import time_interleaved

ROOT = Path(__file__).resolve().parents[1]


class InMemory(L.LightningDataModule):
    """Fixed batches, moved to the device and normalised as FaceDataModule does it."""

    def __init__(self, batches: list) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)  # the batches as they are

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return network_batches(batch, self.trainer)


class StepClock(L.Callback):
    """Seconds from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, sync) -> None:
        self.warmup, self.sync, self.start, self.seconds = warmup, sync, 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sync()
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        self.seconds = time.perf_counter() - self.start


def _batch(args, classes: int, generator: torch.Generator) -> tuple:
    size = (args.batch_size, args.image_size, args.image_size, 3)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (args.batch_size,), generator=generator)
    return images, labels, torch.rand(args.batch_size, generator=generator) < 0.5


def _config(args, tmp: Path):
    return load_config(ROOT / "configs" / "default.yaml").with_overrides(
        [
            f"model.backbone={args.backbone}",
            f"model.kwargs.width={args.width}"
            if args.backbone.startswith("iresnet")
            else "model.kwargs={}",
            f"model.compile={args.compile}",
            f"model.channels_last={args.channels_last}",
            f"data.image_size={args.image_size}",
            f"trainer.accelerator={args.accelerator}",
            f"trainer.precision={args.precision}",
            "trainer.devices=1",
            "stage1.max_epochs=1",
            "stage2.max_epochs=1",
            "data.val_fraction=0",
            "route.decision=linear",  # nothing here routes: no calibration split needed
            "logger=none",
            f"output_dir={tmp}",
        ]
    )


def _system(cfg, stage: int, classes: int, clusters: int, seed: int):
    torch.manual_seed(seed)
    if stage == 1:
        return BackboneSystem(num_classes=classes, **module_args(cfg, 1))
    sizes = [classes // clusters] * clusters
    return SubnetSystem(num_classes=classes, cluster_sizes=sizes, **module_args(cfg, 2))


def _facecluster(cfg, stage, batches, make, warmup, sync, tmp: Path):
    def fit() -> float:
        module, clock = make(), StepClock(warmup, sync)
        run = RunFolder(Path(tempfile.mkdtemp(dir=tmp)))
        trainer = build_trainer(cfg, stage, run, None, [clock], job="bench" if stage == 2 else None)
        trainer.fit(module, datamodule=InMemory(batches))
        return clock.seconds

    return fit


def _bare(cfg, stage, batches, make, warmup, sync, device, precision):
    def loop() -> float:
        module = make()
        module.configure_model()  # the same model: compile / channels_last as configured
        module.to(device).train()
        optim = module.hparams.optim
        optimizer = build_optimizer(
            param_groups(module.trained_modules(), optim["weight_decay"]), optim
        )
        scheduler = build_scheduler(optimizer, len(batches), 1, optim)["scheduler"]
        autocast = eval_autocast(cfg, device)  # the dtype Lightning's plugin uses
        # loss scaling where Lightning scales: fp16 on a GPU (16-mixed on a CPU is bf16)
        fp16 = precision == "16-mixed" and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if fp16 else None
        start = 0.0
        for i, batch in enumerate(batches):
            parts = batch.items() if isinstance(batch, dict) else [(0, batch)]
            with autocast():
                loss = 0.0
                for k, (images, labels, mirror) in parts:
                    images, labels, mirror = (
                        t.to(device, non_blocking=True) for t in (images, labels, mirror)
                    )
                    x = normalize_images(images, mirror)
                    if stage == 1:
                        logits = module.head(module.backbone(x), labels)
                    else:
                        logits = module.heads[str(k)](module.subnets[str(k)](x), labels)
                    loss = loss + F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            sync()
            if i + 1 == warmup:
                start = time.perf_counter()
        return time.perf_counter() - start

    return loop


def _class_means(cfg, module, batches, classes, device, sync):
    backbone = module.backbone.to(device).eval()
    dim = module.hparams.backbone["embedding_dim"]
    autocast = eval_autocast(cfg, device)  # the callback's precision_plugin.forward_context()
    loader = [(images, labels) for images, labels, _ in batches]

    def facecluster() -> None:
        with autocast():
            embedding_class_sums(
                lambda x: backbone(normalize_images(x)), loader, classes, dim, device
            )
        sync()

    def plain() -> None:
        sums = torch.zeros(classes, dim, dtype=torch.float64, device=device)
        counts = torch.zeros(classes, dtype=torch.long, device=device)
        with torch.inference_mode(), autocast():
            for images, labels in loader:
                embeddings = backbone(normalize_images(images.to(device)))
                accumulate_class_sums(embeddings.float(), labels.to(device), sums, counts)
        sync()

    return {"facecluster": facecluster, "plain inference": plain}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile", default="false", choices=["false", "true"])
    parser.add_argument("--channels-last", default="false", choices=["false", "true"])
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--width", type=at_least(1), default=16)
    parser.add_argument("--image-size", type=at_least(1), default=64)
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--classes", type=at_least(2), default=160)
    parser.add_argument("--clusters", type=at_least(1), default=2)
    parser.add_argument("--steps", type=at_least(1), default=15, help="timed steps per fit")
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--out", type=output_file, default="bench/results/train_overhead.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    n = args.warmup + args.steps
    stage1 = [_batch(args, args.classes, generator) for _ in range(n)]
    local = args.classes // args.clusters
    stage2 = [{k: _batch(args, local, generator) for k in range(args.clusters)} for _ in range(n)]
    result = {"args": vars(args), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, Path(tmp))
        for stage, batches in ((1, stage1), (2, stage2)):

            def make(stage=stage):
                return _system(cfg, stage, args.classes, args.clusters, seed=0)

            timings = time_interleaved(
                {
                    "facecluster": _facecluster(
                        cfg, stage, batches, make, args.warmup, sync, Path(tmp)
                    ),
                    "bare loop": _bare(
                        cfg, stage, batches, make, args.warmup, sync, device, args.precision
                    ),
                },
                rounds=args.rounds,
                warmup=0,
            )
            fc, bare = timings["facecluster"], timings["bare loop"]
            result[f"stage{stage}"] = {
                "facecluster_steps_per_s": fc.rate(args.steps),
                "bare_steps_per_s": bare.rate(args.steps),
                "ratio": bare.median / fc.median,
                "spread": {"facecluster": fc.spread, "bare": bare.spread},
            }
            print(f"stage {stage}:", json.dumps(result[f"stage{stage}"]))
        means = time_interleaved(
            _class_means(
                cfg, _system(cfg, 1, args.classes, 1, 0), stage1, args.classes, device, sync
            ),
            rounds=args.rounds,
        )
        fc, plain = means["facecluster"], means["plain inference"]
        result["class_means"] = {
            "facecluster_images_per_s": fc.rate(n * args.batch_size),
            "plain_images_per_s": plain.rate(n * args.batch_size),
            "ratio": plain.median / fc.median,
            "spread": {"facecluster": fc.spread, "plain": plain.spread},
        }
        print("class means:", json.dumps(result["class_means"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result |= measured(device)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
