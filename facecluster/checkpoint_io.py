"""Checkpoints that are never half-written, and never hold NaN weights.

Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and
writes it through an fsspec transaction, with no ``fsync``: after a power loss or a
``kill -9`` at the wrong moment, the last checkpoint (the file a resume picks) can be
empty or truncated, and the run cannot be continued. :class:`AtomicCheckpointIO`
writes to a temporary file in the same folder, fsyncs it, and ``os.replace``-s it
over the target (atomic on POSIX and Windows within one filesystem), then fsyncs the
folder so the rename itself survives a crash. A crash at any point leaves either the
previous checkpoint or the new one, never a mixture; a failed write (disk full,
exception) removes its temporary file and leaves the previous checkpoint in place.

Local checkpoints are read memory-mapped, so a resume under DDP reads only each
process's shard of a sharded head.

It also refuses to write a checkpoint whose weights are not finite: a diverged run
must not replace the last good checkpoint with NaNs (the DivergenceCallback normally
stops the run before; this is the guarantee behind it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from facecluster.io import atomic_torch_save, non_finite_keys, shown_list

__all__ = ["AtomicCheckpointIO", "NonFiniteCheckpointError"]


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint about to be written holds NaN or Inf weights."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, fsynced local writes and a finite-weights check.

    Remote paths (``s3://`` and the like) go through Lightning's own writer.

    Args:
        check_finite: Refuse (``NonFiniteCheckpointError``) to write a checkpoint whose
            ``state_dict`` holds NaN or Inf.
    """

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__()
        self.check_finite = check_finite

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (temp file, fsync, ``os.replace``).

        Raises:
            NonFiniteCheckpointError: the weights hold NaN/Inf; nothing is written.
            OSError: the write failed (e.g. disk full); the previous file is unchanged.
        """
        if self.check_finite:
            bad = non_finite_keys(checkpoint.get("state_dict", {}))
            if bad:
                raise NonFiniteCheckpointError(
                    f"not writing {path}: {len(bad)} weight tensor(s) hold NaN/Inf "
                    f"({shown_list(bad)}); the previous checkpoint there is kept"
                )
        if storage_options is not None or not _local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        # a write killed before its rename (kill -9, the OOM killer, a node lost) left
        # its temporary file, as large as the checkpoint: this process is the one writer
        # of this file (the stage's or the job's lock), so any other is such a leftover
        for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as e:
            raise OSError(
                e.errno,
                f"checkpoint {path} not written ({e.strerror or e}); the previous file "
                "there is unchanged",
            ) from e

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A local checkpoint is memory-mapped (``torch.load(mmap=True)``): each process
        of a resume reads only the pages it keeps, its shard of a head, instead of the
        whole gathered head and its optimizer state (computed: about 8 GB each at 2M
        identities x 512 with SGD's momentum, on every rank of a node). Remote paths go through
        Lightning's reader. ``weights_only=None`` reads weights only, as every read of
        facecluster does: torch's own default follows TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD,
        under which a crafted checkpoint ran its code (a security review)."""
        weights_only = True if weights_only is None else weights_only
        if not _local(path):
            return super().load_checkpoint(path, map_location, weights_only)
        where = map_location if map_location is not None else "cpu"
        checkpoint = torch.load(path, map_location=where, mmap=True, weights_only=weights_only)
        states = checkpoint.get("callbacks") or {}
        for key in [k for k, state in states.items() if _best_checkpoint(k, state)]:
            # a run saved before 2026-12-07 kept a best-* checkpoint by val/acc too:
            # Lightning asked for its callback at a resume ("Please add the following
            # callbacks"), which no longer exists
            del states[key]
        return checkpoint


def _best_checkpoint(key: Any, state: Any) -> bool:
    """Whether ``state`` (under ``key``) is that of the callback that kept
    ``best-epochNNN.ckpt`` until 2026-12-07, not a user's own ``ModelCheckpoint`` of the
    same monitor (``train(cfg, callbacks=[...])``), whose state a resume restores."""
    best = state.get("best_model_path") if isinstance(state, dict) else None
    return str(key).startswith(_BEST_CHECKPOINT) and Path(str(best)).name.startswith("best-epoch")


_BEST_CHECKPOINT = "ModelCheckpoint{'monitor': 'val/acc"
"""The state key of the callback that kept ``best-epochNNN.ckpt`` until 2026-12-07 (by
``val/acc`` in stage 1, ``val/acc_subnets`` in stage 2)."""


def _local(path: Any) -> bool:
    """A path on this machine's filesystem (not ``s3://`` and the like)."""
    return get_filesystem(path).protocol in ("file", "local", ("file", "local"))
