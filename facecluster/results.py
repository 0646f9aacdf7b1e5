"""The held-out results of a training run, and the one markdown table writer.

``summarise`` turns the two stages' test passes into ``results.json``;
``markdown_table`` writes every table facecluster prints (training results and
evaluation rows alike); ``provenance`` records what made a run's numbers (the code
and the machine): where each stage trained and where it was evaluated.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from facecluster.clustering import ClusterAssignment
from facecluster.data import FaceDataModule


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column (l or r, default l). A ``|``
    in a cell is escaped (``\\|``): a run folder named ``a|b`` shifted its row's columns."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    lines = [line(header), "|" + "|".join(rule) + "|", *(line(row) for row in rows)]
    return "\n".join(lines)


def source_digest() -> str:
    """A digest of facecluster's Python source (the package and its callbacks): which
    code trained or evaluated a run. Not the git commit: a commit of docs or of the
    results themselves changes no number."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for folder in (package, package.parent / "callbacks"):
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            digest.update(str(path.relative_to(package.parent)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# the packages whose arithmetic or draws reach the weights and the tables
_PACKAGES = ("torch", "lightning", "timm", "numpy", "faiss-cpu", "simplejpeg", "pillow")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """The machine and software that ran: CPU (and the vector instructions torch's
    kernels use on it), torch's CPU threads in this process, the GPU of ``device`` (the
    one the work ran on; None: a CPU), Python and the packages of :data:`_PACKAGES`.
    Float arithmetic rounds differently in other kernels, and CPU reductions split
    differently over another thread count, so the same seed and code can train other
    weights on another machine (docs/TRAINING.md): compare runs whose records are
    equal."""
    device = torch.device(device) if device is not None else None
    versions: dict[str, str | None] = {"torch": torch.__version__}  # with its build: +cu130
    for name in _PACKAGES[1:]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": (
            torch.cuda.get_device_name(device)
            if device is not None and device.type == "cuda"
            else None
        ),
        "python": platform.python_version(),
        "packages": versions,
    }


def machine_name(record: dict[str, Any]) -> str:
    """A :func:`machine` record in words: the CPU and its kernels (and GPU), Python and
    the packages."""
    gpu = f", {record['gpu']}" if record.get("gpu") else ""
    # records before 2026-12-06 lack the thread count
    count = record.get("threads")
    threads = "" if count is None else f", {count} thread{'s' if count != 1 else ''}"
    packages = ", ".join(f"{k} {v}" for k, v in record["packages"].items() if v)
    return (
        f"{record['cpu']} ({record['cpu_capability']} kernels{threads}{gpu}), Python "
        f"{record['python']}, {packages}"
    )


def measured(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a benchmark's JSON keeps beside its figures: ``measured``, when it finished
    (UTC, to the second), and :func:`provenance` (``code``, ``machine``). The shared
    machines these benchmarks run on change from session to session (an Intel Xeon with
    AVX-512 kernels one day, an AMD EPYC with AVX2 the next), and every rate with them."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return {"measured": when, **provenance(device)}


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """``code`` (:func:`source_digest`) and ``machine`` (:func:`machine` of ``device``),
    as stage 1's summary, each sub-net's record and each evaluation record keep them:
    those of the process that finished the part (a part resumed elsewhere names the
    last)."""
    return {"code": source_digest(), "machine": machine(device)}


def trained_by(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct :func:`provenance` of ``records`` (stage 1's summary, sub-nets'
    records), in order; records written before provenance was kept give none."""
    found: list[dict[str, Any]] = []
    for record in records:
        if "machine" in record:
            made = {"code": record["code"], "machine": record["machine"]}
            if made not in found:
                found.append(made)
    return found


def stage2_summary(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Stage 2's summary (``stage2.json``) from every sub-net's record: the furthest
    step and epoch, the jobs, who trained them, and the held-out accuracy over all of
    their test images and of each."""
    correct = sum(r["test_correct"] for r in records.values())
    images = sum(r["test_images"] for r in records.values())
    return {
        "global_step": max(r["global_step"] for r in records.values()),
        "epochs": max(r["epochs"] for r in records.values()),
        "jobs": sorted({r["job"] for r in records.values()}),
        "trained_by": trained_by(records.values()),
        "test": {
            "test/acc": correct / max(1, images),
            **{f"test/acc_subnet{k}": r["test_acc"] for k, r in records.items()},
        },
    }


def result_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The logger's ``results/*`` metrics of :func:`summarise`'s results."""
    metrics = {"results/stage1_acc": results["stage1"]["accuracy"]}
    for s in results.get("subnets", []):
        metrics[f"results/subnet{s['cluster']}_acc"] = s["accuracy"]
    if "subnets_oracle_accuracy" in results:
        metrics["results/subnets_oracle_acc"] = results["subnets_oracle_accuracy"]
    return metrics


def _majority(test: torch.Tensor, train: torch.Tensor) -> float:
    """Always answering the identity with the most training images, scored on ``test``:
    the bar an unbalanced set sets, chosen without looking at the labels it is scored
    on."""
    if not len(test) or not len(train):
        return 0.0
    return int((test == torch.bincount(train).argmax()).sum()) / len(test)


def summarise(
    method: str,
    dm: FaceDataModule,
    assignment: ClusterAssignment | None,
    stage1: dict[str, Any],
    stage2: dict[str, Any] | None,
) -> dict[str, Any]:
    """The held-out accuracies of stage 1 and of each sub-net (``results.json``)."""
    test_labels, train_labels = dm.split_labels("test"), dm.split_labels("train")
    results: dict[str, Any] = {
        "method": method,
        "identities": dm.num_classes,
        "test_images": len(test_labels),
        "stage1": {
            "accuracy": float(stage1["test_acc"]),
            "chance": 1.0 / dm.num_classes,
            "majority": _majority(test_labels, train_labels),
            "steps": stage1["global_step"],
        },
        # where and by which code stage 1 and the sub-nets trained (a stage-2 job, an
        # assemble job, a resume may each run elsewhere)
        "trained_by": trained_by([stage1, *(stage2 or {}).get("trained_by", [])]),
    }
    if assignment is None or stage2 is None:  # method=single
        return results
    clusters = assignment.class_to_cluster[test_labels]
    train_clusters = assignment.class_to_cluster[train_labels]
    results["clustering"] = assignment.method
    results["num_clusters"] = assignment.num_clusters
    results["subnets"] = [
        {
            "cluster": k,
            "identities": n,
            "test_images": int((clusters == k).sum()),
            "accuracy": float(stage2["test"][f"test/acc_subnet{k}"]),
            "chance": 1.0 / n,
            "majority": _majority(test_labels[clusters == k], train_labels[train_clusters == k]),
        }
        for k, n in enumerate(assignment.cluster_sizes().tolist())
    ]
    results["subnets_oracle_accuracy"] = float(stage2["test"]["test/acc"])
    results["stage2_steps"] = stage2["global_step"]
    return results


def training_table(results: dict[str, Any]) -> str:
    """The held-out results of training as a markdown table."""
    s1 = results["stage1"]
    name = "single model" if results["method"] == "single" else "stage-1 single model"
    rows = [(f"{name}, all identities", results["identities"], results["test_images"], s1)]
    rows += [
        (f"sub-net {s['cluster']}, on its own cluster", s["identities"], s["test_images"], s)
        for s in results.get("subnets", [])
    ]
    title = (
        f"{results['clustering']} clustering, K={results['num_clusters']}"
        if "subnets" in results
        else "method=single"
    )
    header = ("model", "identities", "test images", "top-1 accuracy", "chance", "most frequent")
    cells = [
        (m, c, n, f"{s['accuracy']:.2%}", f"{s['chance']:.2%}", f"{s['majority']:.2%}")
        for m, c, n, s in rows
    ]
    return "\n".join(
        [
            f"Held-out test accuracy ({title})",
            "",
            markdown_table(header, cells, "lrrrrr"),
            "",
            "chance: 1 / identities; most frequent: always answering the identity "
            "with the most training images."
            + (
                " Each sub-net is scored on the test images of the identities its "
                "cluster owns; its identities are all it answers among (with "
                "clustering.overlap, its extra members too)."
                if "subnets" in results
                else ""
            ),
        ]
    )
