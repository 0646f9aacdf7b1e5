"""Throughput of routed inference against ISM (every sub-net runs) and against the
single model, with and without shared layers, on CPU.

Routed: one router-backbone forward + the routed sub-net (top_m=1), so with K
sub-nets of the same backbone the limit of the routed/ISM ratio is K/2. The
routing search (over the class means) must stay a small share of the
pipeline. With ``model.shared_layers=n`` the stage-1 trunk (stem and n stages)
runs once, then the router's tail and the sub-net's tail: each ``--shared-layers``
value is timed against the single model (one backbone, one head over all
identities), at ``--batch`` and at batch 1. Weights are random: speed does not
depend on them.

    .venv/bin/python bench/routing_throughput.py            # K=8, batch 256, 10,000 identities
    .venv/bin/python bench/routing_throughput.py --identities 100000 --index ivf

Prints a markdown table and writes JSON next to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from facecluster.cli import at_least, exit_process, output_file
from facecluster.clustering import ClusterAssignment
from facecluster.config import RouteConfig
from facecluster.inference import TwoStageIdentifier
from facecluster.models.components import create_backbone, shareable_stages
from facecluster.results import measured
from facecluster.timing import time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--width", type=at_least(1), default=32, help="IResNet base width")
    parser.add_argument("--image-size", type=at_least(1), default=112)
    parser.add_argument("--embedding-dim", type=at_least(1), default=512)
    parser.add_argument("--clusters", type=at_least(1), default=8)
    parser.add_argument("--identities", type=at_least(1), default=10_000)
    parser.add_argument("--batch", type=at_least(1), default=256)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--index", default="flat")
    parser.add_argument(
        "--shared-layers",
        type=at_least(0),
        nargs="*",
        help="model.shared_layers values to time (default: 0 and 2 to the backbone's "
        "stages: 0 2 3 4 for an IResNet, 0 2 3 for a MobileFaceNet)",
    )
    parser.add_argument("--out", type=output_file, default="bench/results/routing_throughput.json")
    args = parser.parse_args()
    if args.identities < args.clusters:  # "assignment has 2 clusters but there are 4 sub-nets"
        parser.error(f"--identities {args.identities} cannot fill --clusters {args.clusters}")
    torch.manual_seed(0)

    kwargs = {"width": args.width} if args.backbone.startswith("iresnet") else {}
    backbone = {
        "name": args.backbone,
        "embedding_dim": args.embedding_dim,
        "image_size": args.image_size,
        **kwargs,
    }

    def net():
        return create_backbone(**backbone).eval()

    k, c, d = args.clusters, args.identities, args.embedding_dim
    means = F.normalize(torch.randn(c, d), dim=1)
    assignment = ClusterAssignment.from_labels(torch.arange(c) % k, means, "random")
    heads = [F.normalize(torch.randn(int(n), d), dim=1) for n in assignment.cluster_sizes()]
    route = dict(vars(RouteConfig()), index=args.index)
    route.update(router_temperature=0.05, subnet_temperature=0.07, generalist_weight=0.5)
    router = net()
    stages = shareable_stages(router)  # mbf has 3: its default asked for 4 (an mbf review)
    if args.shared_layers is None:
        args.shared_layers = [0, *range(2, stages + 1)]
    if too_many := [n for n in args.shared_layers if n > stages]:
        parser.error(f"--shared-layers {too_many[0]}: {args.backbone} has {stages} stages to share")

    def identifier(shared_layers: int) -> TwoStageIdentifier:
        # sub-nets that share the router's trunk hold its weights there (as stage 2 leaves them)
        subnets = [copy.deepcopy(router) for _ in range(k)] if shared_layers else None
        return TwoStageIdentifier(
            backbone,
            router,
            subnets or [net() for _ in range(k)],
            heads,
            assignment,
            [str(i) for i in range(c)],
            route,
            shared_layers,
        )

    ident = identifier(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)

    with torch.inference_mode():
        query = ident.embed(images)
        timings = time_interleaved(
            {
                "routed": lambda: ident.identify(images, top_m=1),
                "ism": lambda: ident.identify(images, all_subnets=True),
                "search": lambda: ident.router.route(query, 1),
                "one_net": lambda: ident.subnets[0](images),
            },
            rounds=args.repeats,
        )
    routed, ism, search, one_net = (
        timings[name].median for name in ("routed", "ism", "search", "one_net")
    )

    result = {
        "backbone": f"{args.backbone} width {args.width}" if kwargs else args.backbone,
        "image_size": args.image_size,
        "embedding_dim": d,
        "clusters": k,
        "identities": c,
        "batch": args.batch,
        "index": args.index,
        "torch_threads": torch.get_num_threads(),
        "routed_images_per_s": args.batch / routed,
        "ism_images_per_s": args.batch / ism,
        "ratio": ism / routed,
        # ISM runs every sub-net and nothing else, routed runs 2 backbones
        "limit": k / 2,
        "routing_search_ms": search * 1000,
        "routing_search_share": search / routed,
        "one_backbone_forward_ms": one_net * 1000,
    }
    result["shared_layers"] = shared_rows(identifier, router, means, images, args)
    result |= measured()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"| routed img/s | ISM img/s | ratio (limit {k / 2:g}) | routing search "
        f"| share of routed |\n"
        f"|---:|---:|---:|---:|---:|\n"
        f"| {result['routed_images_per_s']:.1f} | {result['ism_images_per_s']:.1f} | "
        f"{result['ratio']:.2f}x | {result['routing_search_ms']:.1f} ms | "
        f"{result['routing_search_share']:.2%} |"
    )
    print(
        f"({result['backbone']}, {args.image_size}px, d={d}, K={k}, {c} identities, "
        f"batch {args.batch}, {args.index} index, {result['torch_threads']} threads) -> {out}"
    )

    print(
        "\n| shared layers | routed img/s | single model img/s | ratio | routed ms @1 "
        "| single ms @1 |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for row in result["shared_layers"]:
        print(
            f"| {row['shared_layers']} | {row['routed_images_per_s']:.1f} | "
            f"{row['single_images_per_s']:.1f} | {row['ratio']:.2f} | "
            f"{row['routed_ms_at_1']:.1f} | {row['single_ms_at_1']:.1f} |"
        )


def shared_rows(identifier, router, head, images, args) -> list[dict[str, float]]:
    """Routed (top_m=1, moe) with each ``--shared-layers`` against the single model, which
    embeds with one backbone and scores one head over all identities."""

    def single(x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(router(x), dim=1) @ head.T).argmax(dim=1)

    rows = []
    with torch.inference_mode():
        for n in args.shared_layers:
            ident = identifier(n)
            calls = {"routed": partial(ident.identify, top_m=1), "single": single}
            batch = time_interleaved(
                {name: partial(f, images) for name, f in calls.items()}, rounds=args.repeats
            )
            one = time_interleaved(
                {name: partial(f, images[:1]) for name, f in calls.items()}, rounds=20
            )
            rows.append(
                {
                    "shared_layers": n,
                    "routed_images_per_s": len(images) / batch["routed"].median,
                    "single_images_per_s": len(images) / batch["single"].median,
                    "ratio": batch["single"].median / batch["routed"].median,
                    "routed_ms_at_1": one["routed"].median * 1000,
                    "single_ms_at_1": one["single"].median * 1000,
                }
            )
    return rows


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
