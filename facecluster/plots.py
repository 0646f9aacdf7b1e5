"""Evaluation plots, each written to the path the caller gives: accuracy and
throughput against top_m, the decision unit's alpha, and the class-mean embeddings
coloured by cluster (the paper's Figure 1 idea)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facecluster.clustering import ClusterAssignment, cluster_identities, dispersion
from facecluster.io import replacing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    # a temporary file put in its place: a plot left as a link (a run folder from
    # elsewhere) was written through onto the file it names (a security review)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    return path


def top_m_plot(path: Path, run_name: str, sweep: list[dict[str, float]]) -> Path:
    fig, ax1 = _pyplot().subplots(figsize=(6, 4))
    ms = [p["top_m"] for p in sweep]
    ax1.plot(ms, [p["top1"] for p in sweep], "o-", color="C0")
    ax1.set_xscale("log", base=2)  # the sweep doubles top_m (evaluation.top_m_sweep)
    ax1.set_xticks(ms, [str(m) for m in ms])
    ax1.set_xlabel("top_m (clusters searched)")
    ax1.set_ylabel("top-1 accuracy", color="C0")
    ax2 = ax1.twinx()
    ax2.plot(ms, [p["throughput"] for p in sweep], "s--", color="C1")
    ax2.set_ylabel("images/s", color="C1")
    ax1.set_title(f"{run_name}: accuracy and throughput against top_m")
    return _save(fig, path)


def alpha_plot(path: Path, run_name: str, sweep: list[dict[str, float]]) -> Path:
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    key = "alpha" if "alpha" in sweep[0] else "generalist_weight"
    ax.plot([p[key] for p in sweep], [p["top1"] for p in sweep], "o-")
    if key == "alpha":
        ax.set_xlabel("alpha (0: sub-net cosine, 1: class-mean similarity)")
    else:
        ax.set_xlabel("generalist weight (0: sub-nets, 1: class means; moe, fitted temperatures)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"{run_name}: decision unit")
    return _save(fig, path)


PLOTTED_MEANS = 20_000
"""Identities a class-mean plot shows at most (a seeded sample beyond): the PCA of all
300K means took 25 s and 1.8 GB here, and more points do not show more."""


def class_means_plot(path: Path, assignment: ClusterAssignment, seed: int) -> Path:
    """Class means in 2-D (PCA), this run's partition beside a random one of the same means
    (k-means beside a random partition). The dispersion in the titles is over every
    identity; the PCA and the points, over at most :data:`PLOTTED_MEANS` of them."""
    means = assignment.class_means
    shown = torch.arange(len(means))
    if len(means) > PLOTTED_MEANS:
        generator = torch.Generator().manual_seed(seed)
        shown = torch.randperm(len(means), generator=generator)[:PLOTTED_MEANS].sort().values
    sample = means[shown]
    centred = sample - sample.mean(0)
    plt = _pyplot()
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap

    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    if xy.shape[1] < 2:  # one identity (or a rank-1 set): its second axis is 0
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    # a colour of its own per cluster: "tab10" spread K > 10 ids over 10 colours, so
    # clusters shared one; tab10, tab20, then K hues
    k = assignment.num_clusters
    if k <= 20:
        palette = ListedColormap([colormaps["tab10" if k <= 10 else "tab20"](i) for i in range(k)])
    else:
        palette = ListedColormap([colormaps["hsv"](i / k) for i in range(k)])
    norm = BoundaryNorm(np.arange(k + 1) - 0.5, k)
    other_method = "random" if assignment.method != "random" else "kmeans"
    other = cluster_identities(means, assignment.num_clusters, other_method, seed=seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, part in zip(axes, (assignment, other), strict=True):
        stats = dispersion(part)
        colour = part.class_to_cluster[shown].numpy()
        ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap=palette, norm=norm, s=12)
        ax.set_title(f"{part.method}: within {stats['within']:.3f}, between {stats['between']:.3f}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    of = f", {len(shown):,} of {len(means):,} identities" if len(shown) < len(means) else ""
    fig.suptitle(f"class-mean embeddings (PCA{of}), coloured by cluster")
    return _save(fig, path)
