"""Evaluation of finished runs on their held-out test split: the paper's comparison.

For a two-stage run (method=clustered or method=random) it reports:

- routed: the router picks ``route.top_m`` clusters, only their sub-nets run, the
  decision unit fuses (the paper's method; for a random partition, the routed
  variant of ISM);
- all sub-nets (ISM): every sub-net runs, the best score wins;
- the stage-1 model (one head over all identities) and nearest class mean on the
  stage-1 backbone: cheap references that separate the effect of the clustering
  from the effect of routing.

For method=single: the single model and nearest class mean. Every row has top-1
accuracy, macro precision/recall/F1 (torchmetrics), routing accuracy (true
identity inside the chosen clusters), sub-net forwards per image, throughput at
``eval.batch_size`` and latency at batch 1, and the parameter count of the
inference path. Sweeps over top_m and alpha and a PCA plot of the class means
(coloured by cluster, against a random partition of the same means) go with it.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchmetrics.classification import MulticlassF1Score, MulticlassPrecision, MulticlassRecall
from tqdm.auto import tqdm

from facecluster.clustering import (
    ClusterAssignment,
    cluster_identities,
    dispersion,
    embedding_class_sums,
    finalize_class_means,
)
from facecluster.config import ConfigError, load_config
from facecluster.data import FaceDataModule
from facecluster.inference import TwoStageIdentifier
from facecluster.inference.identifier import _backbone, _state_dict, _strip

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
Predict = Callable[[Tensor], tuple[Tensor, Tensor | None]]
"""images -> (predicted ids [B], candidate clusters [B, m] or None)."""


@dataclass
class Row:
    """One line of the evaluation table."""

    run: str
    model: str
    top1: float
    precision: float
    recall: float
    f1: float
    routing_accuracy: float | None
    subnet_forwards: float
    throughput: float
    latency_ms: float
    params: int


@dataclass
class RunEvaluation:
    """Everything ``evaluate_run`` measured for one run."""

    run_dir: Path
    method: str
    rows: list[Row]
    batch_size: int = 256
    top_m_sweep: list[dict[str, float]] = field(default_factory=list)
    alpha_sweep: list[dict[str, float]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- loading


def run_config(run_dir: Path, overrides: list[str] | tuple = ()) -> DictConfig:
    """The config of a finished run, with overrides (e.g. a moved ``data.root``)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"run={run_dir}: not a facecluster run folder (no config.yaml)")
    if not (run_dir / "results.json").is_file():
        raise ConfigError(
            f"run={run_dir}: the run is not finished (no results.json); "
            f"finish it with `python train.py resume={run_dir}`"
        )
    return load_config(run_dir / "config.yaml", [*overrides, "resume=null"])


def _count(*modules: nn.Module | Tensor) -> int:
    total = 0
    for m in modules:
        total += m.numel() if isinstance(m, Tensor) else sum(p.numel() for p in m.parameters())
    return total


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def _score(
    predict: Predict, loader, num_classes: int, class_to_cluster: Tensor | None, desc: str
) -> dict[str, float]:
    metrics = {
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    correct = routed = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False):
        predicted, clusters = predict(images)
        correct += int((predicted == labels).sum())
        total += len(labels)
        for metric in metrics.values():
            metric.update(predicted, labels)
        if clusters is not None and class_to_cluster is not None:
            routed += int((clusters == class_to_cluster[labels][:, None]).any(dim=1).sum())
    out = {name: float(metric.compute()) for name, metric in metrics.items()}
    out["top1"] = correct / max(1, total)
    out["routing_accuracy"] = routed / max(1, total) if class_to_cluster is not None else None
    return out


@torch.no_grad()
def _timing(predict: Predict, images: Tensor, batch_size: int, batches: int) -> tuple[float, float]:
    """Throughput (images/s at ``batch_size``) and median latency (ms at batch 1)."""
    batch = images.repeat((batch_size + len(images) - 1) // len(images), 1, 1, 1)[:batch_size]
    predict(batch)  # warm-up: allocator, faiss, lazy inits
    start = time.perf_counter()
    for _ in range(batches):
        predict(batch)
    throughput = batch_size * batches / (time.perf_counter() - start)
    latencies = []
    for i in range(20):
        one = images[i % len(images)][None]
        start = time.perf_counter()
        predict(one)
        latencies.append((time.perf_counter() - start) * 1000)
    return throughput, statistics.median(latencies)


def _row(
    run: str,
    model: str,
    predict: Predict,
    loader,
    sample: Tensor,
    num_classes: int,
    class_to_cluster: Tensor | None,
    forwards: float,
    params: int,
    cfg: DictConfig,
    scores: dict[str, float] | None = None,
) -> Row:
    if scores is None:
        scores = _score(predict, loader, num_classes, class_to_cluster, model)
    throughput, latency = _timing(predict, sample, cfg.eval.batch_size, cfg.eval.timing_batches)
    return Row(
        run,
        model,
        scores["top1"],
        scores["precision"],
        scores["recall"],
        scores["f1"],
        scores["routing_accuracy"],
        forwards,
        throughput,
        latency,
        params,
    )


def _test_data(cfg: DictConfig) -> tuple[FaceDataModule, Any, Tensor]:
    from facecluster.pipeline import build_datamodule  # the one place a config becomes data

    dm = build_datamodule(cfg)
    dm.eval_batch_size = cfg.eval.batch_size
    loader = dm.test_dataloader()
    sample = next(iter(loader))[0]
    return dm, loader, sample


def evaluate_run(run_dir: str | Path, overrides: list[str] | tuple = ()) -> RunEvaluation:
    """Evaluate one finished run on its held-out test split (see the module doc)."""
    run_dir = Path(run_dir).resolve()
    cfg = run_config(run_dir, overrides)
    torch.manual_seed(cfg.seed)
    dm, loader, sample = _test_data(cfg)
    name = run_dir.name
    stage1 = _state_dict(run_dir / "stage1" / "checkpoints" / "last.ckpt", "cpu")
    head = F.normalize(stage1["head.weight"].float(), dim=1)

    if cfg.method == "single":
        backbone = _backbone(cfg.model, cfg.data.image_size)
        backbone.load_state_dict(_strip(stage1, "backbone."))
        backbone.eval()
        sums, counts = embedding_class_sums(
            backbone,
            dm.embedding_dataloader(),
            dm.num_classes,
            cfg.model.embedding_dim,
            progress=True,
        )
        means = finalize_class_means(sums, counts)

        def embed(images: Tensor) -> Tensor:
            return F.normalize(backbone(images).float(), dim=1)

        rows = [
            _row(
                name,
                "single model (one head)",
                lambda x: ((embed(x) @ head.T).argmax(1), None),
                loader,
                sample,
                dm.num_classes,
                None,
                0.0,
                _count(backbone, head),
                cfg,
            ),
            _row(
                name,
                "nearest class mean",
                lambda x: ((embed(x) @ means.T).argmax(1), None),
                loader,
                sample,
                dm.num_classes,
                None,
                0.0,
                _count(backbone, means),
                cfg,
            ),
        ]
        return _write(RunEvaluation(run_dir, cfg.method, rows, cfg.eval.batch_size), cfg)

    ident = TwoStageIdentifier.from_run(run_dir)
    assignment = ident.assignment
    k, top_m, alpha = ident.num_clusters, cfg.route.top_m, cfg.route.alpha
    c2c = assignment.class_to_cluster
    subnet_params = _count(*ident.subnets, *[ident.head(i) for i in range(k)])

    def routed(m: int, a: float) -> Predict:
        return lambda x: (lambda r: (r.identity, r.clusters))(ident.identify(x, m, a))

    scored: dict[tuple[int, float], dict[str, float]] = {}

    def routed_scores(m: int, a: float) -> dict[str, float]:
        # The headline row, the top_m sweep and the alpha sweep share a setting:
        # each (top_m, alpha) pass over the test set runs once.
        if (m, a) not in scored:
            scored[m, a] = _score(
                routed(m, a), loader, dm.num_classes, c2c, f"top_m={m}, alpha={a:g}"
            )
        return scored[m, a]

    label = "clustered" if cfg.method == "clustered" else "random partition"
    rows = [
        _row(
            name,
            f"{label}, routed (top_m={top_m}, alpha={alpha:g})",
            routed(top_m, alpha),
            loader,
            sample,
            dm.num_classes,
            c2c,
            float(top_m) if alpha < 1 else 0.0,
            _count(ident.router_backbone) + subnet_params,
            cfg,
            scores=routed_scores(top_m, alpha),
        ),
        _row(
            name,
            f"{label}, all sub-nets (ISM)",
            lambda x: (ident.identify(x, alpha=alpha, all_subnets=True).identity, None),
            loader,
            sample,
            dm.num_classes,
            None,
            float(k),
            subnet_params + (_count(ident.router_backbone) if alpha > 0 else 0),
            cfg,
        ),
        _row(
            name,
            "stage-1 model (one head)",
            lambda x: ((ident.embed(x) @ head.T).argmax(1), None),
            loader,
            sample,
            dm.num_classes,
            None,
            0.0,
            _count(ident.router_backbone, head),
            cfg,
        ),
        _row(
            name,
            "nearest class mean (stage-1 backbone)",
            lambda x: ((ident.embed(x) @ ident.class_means.T).argmax(1), None),
            loader,
            sample,
            dm.num_classes,
            None,
            0.0,
            _count(ident.router_backbone, ident.class_means),
            cfg,
        ),
    ]
    report = RunEvaluation(run_dir, cfg.method, rows, cfg.eval.batch_size)
    for m in range(1, k + 1):
        scores = routed_scores(m, alpha)
        throughput, _ = _timing(routed(m, alpha), sample, cfg.eval.batch_size, 1)
        report.top_m_sweep.append(
            {
                "top_m": m,
                "top1": scores["top1"],
                "throughput": throughput,
                "routing_accuracy": scores["routing_accuracy"],
            }
        )
    for a in ALPHAS:
        scores = routed_scores(top_m, a)
        report.alpha_sweep.append({"alpha": a, "top1": scores["top1"]})
    if cfg.eval.plots:
        report.plots = _plots(report, assignment, cfg.seed)
    return _write(report, cfg)


# --------------------------------------------------------------------------- output


COLUMNS = (
    "run",
    "model",
    "top-1",
    "macro P",
    "macro R",
    "macro F1",
    "routing acc",
    "sub-net fwd/img",
    "img/s @256",
    "ms @1",
    "params",
)


def _cells(row: Row) -> list[str]:
    routing = "" if row.routing_accuracy is None else f"{row.routing_accuracy:.2%}"
    return [
        row.run,
        row.model,
        f"{row.top1:.2%}",
        f"{row.precision:.2%}",
        f"{row.recall:.2%}",
        f"{row.f1:.2%}",
        routing,
        f"{row.subnet_forwards:g}",
        f"{row.throughput:.0f}",
        f"{row.latency_ms:.1f}",
        f"{row.params / 1e6:.2f}M",
    ]


def format_table(rows: list[Row], batch_size: int = 256) -> str:
    """Rows as a markdown table."""
    header = [c.replace("@256", f"@{batch_size}") for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _write(report: RunEvaluation, cfg: DictConfig) -> RunEvaluation:
    out = report.run_dir / "eval"
    out.mkdir(exist_ok=True)
    (out / "results.md").write_text(format_table(report.rows, cfg.eval.batch_size) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(report.rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in report.rows)
    (out / "results.json").write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in report.rows],
                "top_m_sweep": report.top_m_sweep,
                "alpha_sweep": report.alpha_sweep,
                "batch_size": cfg.eval.batch_size,
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )
    if cfg.logger == "wandb":
        _log_wandb(report, cfg)
    return report


def _plots(report: RunEvaluation, assignment: ClusterAssignment, seed: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = report.run_dir / "eval"
    out.mkdir(exist_ok=True)
    paths = []
    ms = [p["top_m"] for p in report.top_m_sweep]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(ms, [p["top1"] for p in report.top_m_sweep], "o-", color="C0")
    ax1.set_xlabel("top_m (clusters searched)")
    ax1.set_ylabel("top-1 accuracy", color="C0")
    ax2 = ax1.twinx()
    ax2.plot(ms, [p["throughput"] for p in report.top_m_sweep], "s--", color="C1")
    ax2.set_ylabel("images/s", color="C1")
    ax1.set_title(f"{report.run_dir.name}: accuracy and throughput against top_m")
    fig.tight_layout()
    paths.append(out / "top_m.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["alpha"] for p in report.alpha_sweep], [p["top1"] for p in report.alpha_sweep], "o-")
    ax.set_xlabel("alpha (0: sub-net cosine, 1: class-mean similarity)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"{report.run_dir.name}: decision unit")
    fig.tight_layout()
    paths.append(out / "alpha.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # The paper's Figure 1 idea: class means in 2-D, coloured by cluster, this run's
    # partition beside a random partition of the same means.
    means = assignment.class_means
    centred = means - means.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    other_method = "random" if assignment.method != "random" else "kmeans"
    other = cluster_identities(means, assignment.num_clusters, other_method, seed=seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, part in zip(axes, (assignment, other), strict=True):
        stats = dispersion(part)
        ax.scatter(xy[:, 0], xy[:, 1], c=part.class_to_cluster.numpy(), cmap="tab10", s=12)
        ax.set_title(f"{part.method}: within {stats['within']:.3f}, between {stats['between']:.3f}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle("class-mean embeddings (PCA), coloured by cluster")
    fig.tight_layout()
    paths.append(out / "class_means_pca.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _log_wandb(report: RunEvaluation, cfg: DictConfig) -> None:
    import wandb

    from facecluster.loggers import wandb_mode

    run_id = json.loads((report.run_dir / "run.json").read_text())["run_id"]
    mode, _ = wandb_mode(cfg)
    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        id=run_id,
        resume="allow",
        dir=str(report.run_dir),
        mode=mode,
    )
    try:
        table = wandb.Table(columns=list(COLUMNS), data=[_cells(r) for r in report.rows])
        logs: dict[str, Any] = {"eval/results": table}
        logs.update({f"eval/{p.stem}": wandb.Image(str(p)) for p in report.plots})
        run.log(logs)
    finally:
        run.finish()


def evaluate_runs(run_dirs: list[str | Path], overrides: list[str] | tuple = ()) -> str:
    """Evaluate several runs; returns one markdown table of all their rows."""
    reports = [evaluate_run(r, overrides) for r in run_dirs]
    return format_table([row for rep in reports for row in rep.rows], reports[0].batch_size)
