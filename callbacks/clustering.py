"""The clustering unit, run at the end of stage 1 (Ahmadi & Dianat, JSDP 2024).

One streamed pass of the stage-1 backbone over the training images gives the sum
and count of L2-normalised embeddings per identity (scatter-add, no per-class
loop); sums and counts are all-reduced across ranks, so every rank holds the same
class means as a single-process pass. Rank 0 then groups the identities (faiss
spherical k-means, balanced k-means, or the random ISM partition; by the class means,
or with ``clustering.features=head`` by the stage-1 head's rows), saves the
ClusterAssignment in the run folder and broadcasts the grouping (not the class
means, which every rank holds); every rank then maps the saved file in place of its
own copy, once it has checked that the file holds the same assignment, and hands it to
the datamodule through its one public method, ``connect_clusters``.

This callback owns the hand-off between the stages, on every path: a fit that
trains runs :meth:`ClusteringCallback.cluster` in ``on_train_end``; a resumed
stage 1 that was already finished (Lightning skips the hooks of a fit with nothing
left to do) calls the same method after ``fit``; a run resumed in stage 2 reads
the saved assignment back with :meth:`ClusteringCallback.restore`. Either way the
pipeline takes ``assignment`` from here, and a stage-2 job narrows the datamodule
to its own sub-nets with :meth:`ClusteringCallback.connect`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from facecluster.callbacks.interrupt import stop_if_terminated
from facecluster.callbacks.progress import close_train_bar
from facecluster.clustering import (
    ClusterAssignment,
    cluster_identities,
    dispersion,
    embedding_class_sums,
    finalize_class_means,
    unit_rows,
)
from facecluster.data import FaceDataModule
from facecluster.data.transforms import normalize_images
from facecluster.io import shown_list
from facecluster.models.components.partial_fc import gather_to_first


class ClusteringCallback(L.Callback):
    """Compute class means, cluster the identities and connect the datamodule.

    Args:
        datamodule: the run's datamodule (gives the embedding pass, receives the clusters).
        num_clusters: K.
        method: kmeans, balanced or random.
        seed: seeds k-means and the random partition.
        save_path: where the ClusterAssignment is written (atomically, by rank 0) and,
            on a resume in stage 2, read back from.
        niter: k-means iterations.
        nredo: k-means restarts.
        features: what k-means groups: ``means`` (the class means) or ``head`` (the
            stage-1 head's rows, gathered whole from their shards).
        overlap: fraction of the identities that also join their next nearest cluster
            (``clustering.overlap``).
    """

    def __init__(
        self,
        datamodule: FaceDataModule,
        num_clusters: int,
        method: str,
        seed: int,
        save_path: str | Path,
        niter: int = 20,
        nredo: int = 1,
        features: str = "means",
        overlap: float = 0.0,
    ) -> None:
        if features not in ("means", "head"):
            raise ValueError(f"clustering.features={features!r} is not one of means, head")
        self.datamodule = datamodule
        self.num_clusters = num_clusters
        self.method = method
        self.seed = seed
        self.save_path = Path(save_path)
        self.niter = niter
        self.nredo = nredo
        self.features = features
        self.overlap = overlap
        self.assignment: ClusterAssignment | None = None
        # stage2.negatives: each cluster's outsiders, ranked once per assignment (a
        # stage-2 job hands it over twice: all clusters, then its group's), kept until
        # the second hand-over
        self._neighbours: tuple[ClusterAssignment, list[torch.Tensor]] | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        close_train_bar(trainer)  # the clustering's bar and summary on lines of their own
        self.cluster(trainer, pl_module)

    @torch.no_grad()
    def class_means(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """L2-normalised class-mean embeddings [C, d], identical on every rank.

        The backbone runs on the strategy's root device: after ``fit`` Lightning's
        teardown has moved the module to the CPU, and under NCCL the all-reduce
        below needs tensors on the GPU.
        """
        dm = self.datamodule
        loader = dm.embedding_dataloader(trainer.global_rank, trainer.world_size)
        device, was_training = pl_module.device, pl_module.training
        pl_module.to(trainer.strategy.root_device).eval()
        precision = trainer.precision_plugin  # *-true precisions: inputs in the weights' dtype
        with precision.forward_context():
            sums, counts = embedding_class_sums(
                lambda images: pl_module(precision.convert_input(normalize_images(images))),
                loader,
                dm.num_classes,
                pl_module.hparams.backbone["embedding_dim"],
                device=pl_module.device,
                progress=trainer.global_rank == 0,
            )
        pl_module.to(device).train(was_training)
        # float64 sums: the all-reduced result does not depend on how ranks split the data.
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return finalize_class_means(sums, counts, device="cpu")

    def cluster(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ClusterAssignment:
        """The whole clustering unit; every rank must call it."""
        means = self.class_means(trainer, pl_module)
        # in on_train_end, past the loops' own checks, and the stage's test would start
        # afresh: a kill during the pass or k-means was lost (stage 2 trained, exit 0)
        stop_if_terminated(trainer)  # the pass is a forward over every training image
        rows = None
        if self.features == "head":  # every rank sends its shard; rank 0 gets them all
            head = pl_module.head
            rows = gather_to_first(head.weight.detach(), head.num_classes)
        assignment = payload = failure = None
        if trainer.global_rank == 0:
            try:
                assignment = cluster_identities(
                    means,
                    self.num_clusters,
                    self.method,
                    seed=self.seed,
                    niter=self.niter,
                    nredo=self.nredo,
                    features=rows,
                    overlap=self.overlap,
                )
                assignment.save(self.save_path)
            except Exception as e:  # the other ranks wait in the broadcast: tell them
                failure = e
                payload = {"error": f"{type(e).__name__}: {e}"}
            else:
                # every rank holds the same all-reduced class means: only the grouping is
                # sent (labels, centroids, overlap: computed, 32 MB at 2M identities, not
                # 4 GB more)
                payload = {k: v for k, v in assignment.to_dict().items() if k != "class_means"}
        # k-means runs once, on rank 0: faiss is not bit-identical across processes.
        payload = trainer.strategy.broadcast(payload, src=0)
        if failure is not None:
            raise failure
        if "error" in payload:  # rank 0's clustering failed: stop here too, not at a timeout
            raise RuntimeError(f"the clustering failed on rank 0: {payload['error']}")
        if assignment is None:  # the means as cluster_identities keeps them (no copy)
            means = unit_rows(means, in_place=True)
            assignment = ClusterAssignment.from_dict({**payload, "class_means": means})
        del means, rows
        trainer.strategy.barrier("clustering")
        assignment = self._mapped(assignment)
        stop_if_terminated(trainer)  # a resume restores clusters.pt, then tests stage 1
        self._hand_over(assignment)
        self._log(trainer, assignment)
        return assignment

    def _mapped(self, assignment: ClusterAssignment) -> ClusterAssignment:
        """The saved assignment, mapped as a stage-2 job maps it
        (:meth:`ClusterAssignment.load`), if the file holds exactly ``assignment``: the
        class means are then pages of the file, shared by the processes of a node, not
        a private copy in each that lasts through stage 2 (4 GB at 2M identities x 512,
        32 GB on a node of 8). A file this rank cannot read yet, or whose content
        differs (a network file system's cached view of an older one), leaves
        ``assignment`` as it is."""
        try:
            saved = ClusterAssignment.load(self.save_path)
        except (OSError, ValueError):
            return assignment
        return saved if saved == assignment else assignment

    def restore(self, trainer: L.Trainer | None = None) -> ClusterAssignment:
        """The saved assignment of a resumed run, handed to the datamodule; with the
        stage-1 ``trainer``, its figures are logged as :meth:`cluster` logs them."""
        if not self.save_path.is_file():
            raise FileNotFoundError(
                f"{self.save_path} is missing: the run has no clustering yet (stage=cluster)"
            )
        self._hand_over(ClusterAssignment.load(self.save_path, self.num_clusters))
        assert self.assignment is not None
        if trainer is not None:
            self._log(trainer, self.assignment)
        return self.assignment

    def connect(self, subnets: list[int]) -> None:
        """Serve only these sub-nets' loaders (a stage-2 job's group)."""
        assert self.assignment is not None, "cluster() or restore() first"
        self._hand_over(self.assignment, subnets)
        self._neighbours = None  # K rankings of C ids: 1 GB at 2M identities and K=64

    def _hand_over(self, assignment: ClusterAssignment, subnets: list[int] | None = None) -> None:
        clusters = range(assignment.num_clusters)
        neighbours = None
        if self.datamodule.hparams.subnet_negatives > 0:  # stage2.negatives
            if self._neighbours is None or self._neighbours[0] is not assignment:
                self._neighbours = (assignment, [assignment.neighbours(k) for k in clusters])
            neighbours = self._neighbours[1]
        self.datamodule.connect_clusters(
            [assignment.classes_of(k) for k in clusters], subnets, neighbours
        )
        self.assignment = assignment

    def _log(self, trainer: L.Trainer, assignment: ClusterAssignment) -> None:
        if trainer.global_rank != 0:
            return
        stats = dispersion(assignment)
        sizes = assignment.cluster_sizes().tolist()
        both = len(assignment.overlap)  # "(0 in two)" was read as nothing (a review)
        rank_zero_info(
            f"clustering ({assignment.method}, K={assignment.num_clusters}): identities per "
            f"cluster {sizes}{f', {both} of them in two clusters' if both else ''}; "
            f"within-cluster dispersion {stats['within']:.4f}, between-cluster "
            f"{stats['between']:.4f}; saved to {self.save_path}"
        )
        alone = [k for k, n in enumerate(sizes) if n == 1]
        if alone and not self.datamodule.hparams.subnet_negatives > 0:  # no "not mine"
            # K close to the identity count, or k-means isolating one: such a sub-net's
            # ArcFace loss, a softmax over one identity, is zero at every step
            which = shown_list([str(k) for k in alone])
            rank_zero_warn(
                f"clustering: cluster{'s' if len(alone) > 1 else ''} {which} "
                f"of {assignment.num_clusters} hold{'' if len(alone) > 1 else 's'} one "
                "identity: a sub-net over one identity has a zero loss and learns nothing; "
                "fewer clusters (clustering.num_clusters), or stage2.negatives (a 'not mine' "
                "class), give it something to learn"
            )
        if trainer.logger is None:
            return
        trainer.logger.log_metrics(
            {f"clustering/{k}": float(v) for k, v in stats.items()}, step=trainer.global_step
        )
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.log_table(
                "clustering/sizes",
                columns=["cluster", "identities"],
                data=[[k, n] for k, n in enumerate(sizes)],
                step=trainer.global_step,
            )
        trainer.logger.save()  # logged after the fit: nothing of Lightning's saves it now
