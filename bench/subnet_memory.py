"""Stage-2 activation memory: what a training step of K sub-nets keeps for its backward
pass, with and without ``stage2.activation_checkpointing``, and the step time it costs.

Autograd's saved tensors are counted (distinct storages) on the CPU, in fp32 and
under bf16 autocast, for a real :class:`~facecluster.models.subnets_module.SubnetSystem`
(IResNet-50 at 112x112 by default, ArcFace heads). The counts scale with the batch, so
a GPU's figure at batch 128 is computed from them (labelled so in docs/SCALE.md).

    python bench/subnet_memory.py --out bench/results/subnet_memory.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from facecluster.cli import at_least, output_file
from facecluster.models.subnets_module import SubnetSystem
from facecluster.results import measured

OPTIM = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def system(
    backbone: str, size: int, k: int, classes: int, checkpointing: bool, width: int | None
) -> SubnetSystem:
    args = {"name": backbone, "embedding_dim": 512, "image_size": size}
    model = SubnetSystem(
        classes * k,
        [classes] * k,
        backbone={**args, **({"width": width} if width is not None else {})},
        head={"name": "arcface", "s": 64.0, "m": 0.5},
        optim=OPTIM,
        activation_checkpointing=checkpointing,
    )
    model.log = lambda *a, **kw: None  # no Trainer
    return model.train()


def step(model: SubnetSystem, batch: dict, dtype: torch.dtype | None) -> tuple[int, float]:
    """Bytes kept for the backward pass after the forward pass, and the step's CPU
    seconds (process time, one thread: what the step computes, not what else runs)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    start = time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model.training_step(batch, 0)["loss"]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="iresnet50")
    p.add_argument("--image-size", type=at_least(1), default=112)
    p.add_argument("--width", type=at_least(1), help="the backbone's base width (default: its own)")
    p.add_argument("--batch", type=at_least(1), default=4, help="images per sub-net")
    p.add_argument("--clusters", type=at_least(1), nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--repeats", type=at_least(1), default=3, help="timed steps of each setting, in turn"
    )
    p.add_argument("--out", type=output_file)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = []
    for k in a.clusters:
        batch = {
            c: (torch.randn(a.batch, 3, a.image_size, a.image_size), torch.arange(a.batch) % 100)
            for c in range(k)
        }
        models = {on: system(a.backbone, a.image_size, k, 100, on, a.width) for on in (False, True)}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            kept = {on: step(models[on], batch, dtype)[0] for on in (False, True)}
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(a.repeats):  # interleaved: this machine's speed drifts
                for on in (False, True):
                    times[on].append(step(models[on], batch, dtype)[1])
            row = {
                "backbone": a.backbone,
                "image_size": a.image_size,
                "width": a.width,
                "subnets": k,
                "batch_per_subnet": a.batch,
                "precision": name,
                "kept_mib": kept[False] / 2**20,
                "kept_checkpointed_mib": kept[True] / 2**20,
                "kept_mib_per_image_per_subnet": kept[False] / 2**20 / (k * a.batch),
                "step_cpu_s": statistics.median(times[False]),
                "step_checkpointed_cpu_s": statistics.median(times[True]),
            }
            row["time_ratio"] = row["step_checkpointed_cpu_s"] / row["step_cpu_s"]
            rows.append(row)
            print(json.dumps({key: round(v, 3) if isinstance(v, float) else v
                              for key, v in row.items()}), flush=True)  # fmt: skip
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"rows": rows, **measured()}, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
