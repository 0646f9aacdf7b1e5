"""Atomic file writes, and safe reads, shared by checkpoints, cluster assignments
and exports.

A file written in place can be left truncated by a crash or a ``kill -9``, and a
resume or a reader then fails on it. ``atomic_torch_save`` writes to a temporary
file in the destination folder, fsyncs it and ``os.replace``-s it over the target
(atomic within one filesystem), then fsyncs the folder so the rename survives a
power loss: readers see the old file or the complete new one, never a mixture;
``atomic_file`` does the same for any other writer. ``non_finite_keys`` names the
tensors of a checkpoint or an export that hold NaN or inf. ``load_plain`` is the one way
facecluster reads a torch file: with ``weights_only=True``, so a file from someone
else (an export, a run folder, an assignment) can hold only tensors, numbers,
strings and containers of them, and a pickle that would run code is refused before
anything in it runs. ``file_stamp``, ``pid_alive`` and ``shown_list`` are the one
way each module tells a file replaced, a process gone, and names many files in a
message; ``written_by_a_live_process`` tells a temporary file of a running process
from one left by a killed one; ``folder_lock`` is the one lock of a folder updated in
place.
Imports nothing of facecluster, so every package may use it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import reprlib
import shutil
import signal
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch


def fsync_dir(directory: Path) -> None:
    # Not every platform can open a folder (Windows); os.replace must do there.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], shared: bool = False) -> Iterator[BinaryIO]:
    """An open binary file that becomes ``path`` when the block succeeds; parent
    folders are created. It keeps the mode of the file it replaces (one made private
    stays private); ``shared``, a cache that other users of the folder read, takes this
    process's umask instead: a cache written under umask 077 and rewritten by another
    user kept 0600, and each user in turn found it unreadable and made it again.

    It is a temporary file of its own in the destination folder (concurrent writers,
    DDP ranks or jobs on other nodes, never share one), fsynced, then ``os.replace``-d
    over ``path``. On any failure the temporary file is removed and a previous file
    at ``path`` is left unchanged.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A dot name not ending like the target, so nothing that lists checkpoints sees it.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(None if shared else target))  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and disk_full(e):
            raise write_error(e, target) from None
        raise
    fsync_dir(target.parent)


def disk_full(error: OSError) -> bool:
    """Whether ``error`` is a write refused for space: the device full, or a quota."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def write_error(error: OSError, path: str | os.PathLike[str]) -> OSError:
    """``error``, met writing ``path``, as an OSError naming ``path`` and, for a full disk,
    the space left in its folder (measured once its temporary file is removed): a
    write's error names no file, or the temporary file, and the user cannot tell which
    disk to free (a full-disk review: 73 of 104 training failures said only "No space
    left on device")."""
    why = error.strerror or str(error)
    if disk_full(error):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(Path(path).parent).free
            why += f", {free / 2**20:.1f} MiB free there"
    return OSError(error.errno, why, str(path))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically (:func:`atomic_file`).

    Raises:
        OSError: the write failed, naming ``path`` (and, for a full disk, the space
            left there); torch's zip writer reports a failed write as a RuntimeError
            ("unexpected pos"), the OSError only as its context.
    """
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except RuntimeError as e:
        failed = e.__context__
        if not isinstance(failed, OSError):
            raise
        raise write_error(failed, path) from None
    return Path(path)


def _file_mode(target: Path | None) -> int:
    """The permissions a rewritten file keeps (a file made private stays private), or
    those of a new file under this process's umask (``target`` None: always those)."""
    if target is not None:
        with contextlib.suppress(OSError):
            return target.stat().st_mode & 0o777
    try:  # read, not set: os.umask would change it for every thread for a moment
        status = Path("/proc/self/status").read_text()
        umask = int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it when the block succeeds
    (``os.replace``): readers see the old file or the whole new one, never a part.
    The temporary name is this call's own: jobs that write the same file at once (every
    stage-2 job writes the run's identity lists) must not replace or delete each other's.
    The file is fsynced before it takes the name, and the folder after, as
    :func:`atomic_file` does: a power loss may leave the old file, not an empty one
    under the name (a sub-net's record that no resume could parse)."""
    with replacing_together(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def replacing_together(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """:func:`replacing` for files that belong together (a ``.rec`` and its index, an
    evaluation's three tables): every temporary file is fsynced before the first takes
    its name, then they replace theirs in the order given. A failure before then (a
    full disk that only the fsync of a large file reports, Ctrl-C) leaves every target
    as it was; nested ``replacing`` blocks had renamed the others by then. Ctrl-C or
    SIGTERM during the renames waits until every file is in place (:func:`signals_held`),
    never leaving some new files beside the old others."""
    targets = [Path(p) for p in paths]
    temps = [
        t.with_name(f".{t.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{t.suffix}")
        for t in targets
    ]
    try:
        try:
            yield temps
            for tmp in temps:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:  # a full disk: named by the target whose file it wrote
            if not disk_full(e):
                raise
            named = [t for t, tmp in zip(targets, temps, strict=True) if str(tmp) == e.filename]
            for tmp in temps:  # the space left is measured without them
                tmp.unlink(missing_ok=True)
            raise write_error(e, (named or targets)[0]) from None
        with signals_held():
            for tmp, target in zip(temps, targets, strict=True):
                mode = _file_mode(target)  # a file made private stays private
                if os.stat(tmp).st_mode & 0o777 != mode:
                    # a temp linked to another user's file (an export update put in place
                    # by another user of a shared folder) is not this process's to chmod
                    with contextlib.suppress(PermissionError):
                        os.chmod(tmp, mode)
                os.replace(tmp, target)
            # inside: a signal let through after the renames would skip what makes
            # them survive a power loss
            for folder in dict.fromkeys(t.parent for t in targets):
                fsync_dir(folder)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM that arrive while the block runs take effect after it:
    the handler in place before the block (a KeyboardInterrupt, a time limit's end)
    runs then, once per signal, in the order they came.

    Blocked in this thread (``signal.pthread_sigmask``) and noted by a handler of the
    block's own: the kernel hands a signal that the main thread blocks to any other
    thread (tqdm's monitor, a DataLoader's pin-memory thread), and Python then runs the
    handler in the main thread all the same, inside the block. Off the main thread
    (handlers cannot be set there, and none runs there) or without signal masks
    (Windows), nothing changes; a signal ignored or handled outside Python is left alone.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):
        yield
        return
    came: list[int] = []

    def note(signum: int, frame: object) -> None:
        came.append(signum)

    held = [s for s in HELD_SIGNALS if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    before: dict[int, Any] = {}
    mask = None
    try:
        for s in held:
            before[s] = signal.signal(s, note)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        yield
    finally:
        try:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending one reaches note
        finally:
            _restore_then_raise(list(before.items()), came)


def _restore_then_raise(handlers: list[tuple[int, Any]], came: list[int]) -> None:
    """Put each handler back, then raise each noted signal once, in the order they came
    (the first that raises ends the caller). Nested, so that a signal whose own handler
    is back already (a Ctrl-C) cannot skip the steps after it: SIGTERM left to the
    noting handler would be lost for good."""
    if handlers:
        (number, handler), rest = handlers[0], handlers[1:]
        try:
            signal.signal(number, handler)
        finally:
            _restore_then_raise(rest, came)
        return
    for number in dict.fromkeys(came):
        signal.raise_signal(number)


def check_can_write(folder: Path) -> None:
    """OSError unless a file can be made in ``folder``, or, where it does not exist yet,
    in its nearest existing parent (nothing is left behind): a read-only file system or
    folder, or a file where a folder is needed, named before the work whose results
    would go there rather than after it."""
    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(target))
    try:
        tempfile.TemporaryFile(dir=target).close()
    except OSError as e:  # named by the folder, not by the probe's random name
        raise OSError(e.errno, e.strerror, str(target)) from None


LOCK = ".facecluster-lock"
"""The lock file of a folder that commands update in place (an export, a pack's OUT)."""


@contextlib.contextmanager
def folder_lock(folder: Path, what: str, wait: bool = True) -> Iterator[None]:
    """Held while a process updates ``folder`` (``what``: "the export", "OUT"): an
    advisory ``flock`` on ``folder/.facecluster-lock``, released when the process ends,
    however it ends. Two commands finishing one export's update at once removed each
    other's files; two packs into one OUT each replaced the other's data set.

    ``wait=False``: BlockingIOError at once where another process holds it. On a file
    system without ``flock`` (Lustre ``-o noflock``, some NFS) the block runs unlocked,
    with a warning; a lock file open read-only on NFS, which locks only a file open for
    writing, is refused."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one command on a folder at a time, as documented
        yield
        return
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        # writable by whoever may write the folder (a shared export's group): NFS
        # locks only a file open for writing
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o644 | (folder.stat().st_mode & 0o022))
    except FileExistsError:
        try:
            fd = os.open(folder / LOCK, os.O_RDWR)
        except PermissionError:  # another user's, made before this: local file
            fd = os.open(folder / LOCK, os.O_RDONLY)  # systems lock it read-only too
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise
        except OSError as e:  # a file system without flock
            if e.errno == errno.EBADF and _read_only(fd):  # NFS: not the file system's
                raise PermissionError(
                    f"{folder / LOCK}: cannot lock it open for reading only ({e.strerror}); "
                    f"make it writable for the users of {what}"
                ) from None
            logging.getLogger("facecluster").warning(
                "%s: cannot lock %s (%s); run one command on %s at a time",
                folder,
                LOCK,
                e.strerror,
                what,
            )
        yield  # flock is released when the file is closed, or the process ends
    finally:
        os.close(fd)


def _read_only(fd: int) -> bool:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def file_stamp(path: str | os.PathLike[str] | int, inode: bool = True) -> tuple[int, ...]:
    """What tells file ``path`` (or open file descriptor) replaced without reading it:
    its size, modification time (ns) and inode (a copy that kept size and time has
    another inode). ``inode=False``: size and time alone, for what must read as the same
    file after a copy (``cp -a``, rsync) or on a FUSE mount (sshfs, a cloud bucket) that
    does not keep an unchanged file's inode."""
    stat = os.stat(path)
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)[: 3 if inode else 2]


def written_by_a_live_process(path: Path, prefix: str) -> bool:
    """Whether ``path``, named ``<prefix>.<pid>-<hex>...`` by the process that writes it
    (:func:`replacing_together`'s temporary files, an export's update folder), is being
    written by a process still running here: not one killed before it finished. pid 1
    (a container's entrypoint, killed) is taken for gone: it is pid 1 again in the next
    container. Windows cannot tell: False."""
    if os.name == "nt" or not path.name.startswith(prefix + "."):
        return False
    try:
        pid = int(path.name[len(prefix) + 1 :].split("-")[0])
    except ValueError:
        return False
    return pid != 1 and pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts). Windows
    cannot tell (``os.kill`` ends the process there): True, so nothing that may be
    another process's is taken."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:  # ProcessLookupError
        return False
    return True


def shown_list(names: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``names`` (files, identities, keys), then how many there
    are in all: the one way a message names many of them."""
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def shown_value(value: object, limit: int = 40) -> str:
    """A value read from a file, as a message shows it: at most about ``limit``
    characters, built without its whole repr (a 100 KB pickle's list of one 64 KB bytes
    object referenced 20,000 times made a repr of 5 GB; a damaged export's, a 131 MB
    error line)."""
    shown = reprlib.Repr()  # keyword arguments from Python 3.12
    shown.maxlevel, shown.maxlist, shown.maxtuple, shown.maxdict = 2, 3, 3, 3
    shown.maxstring = shown.maxother = limit
    text = shown.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def non_finite_keys(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` holding NaN or inf, or values
    past float32's range (the other values are skipped). Each tensor's least and
    greatest values tell, NaN being both: no bool copy of it (``isfinite(t).all()``
    took 22 times as long on a 250K x 512 tensor on one thread, measured). A tensor held
    under several names (the frozen trunk that ``model.shared_layers`` shares between
    the stage-1 backbone and every sub-net) is scanned once, and each of its names
    reported."""
    bad, seen = [], {}
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            same = (value.device, value.data_ptr(), value.dtype, value.shape, value.stride())
            if same not in seen:
                low, high = torch.aminmax(value.detach())
                # as float32 (the networks' own): a float64 past its range is inf there
                seen[same] = not bool(low.float().isfinite() & high.float().isfinite())
            if seen[same]:
                bad.append(key)
    return bad


class UnsafeFileError(ValueError):
    """A torch file holds Python objects other than plain data, so it was not loaded."""


def check_archive(path: str | os.PathLike[str], what: str = "file") -> None:
    """That ``path`` is there and its zip directory (torch's file format) reads: a file
    cut short or of another format is found without reading its tensors. A file of
    torch's legacy format (a pickle) passes; :func:`load_plain` reads it.

    Raises:
        FileNotFoundError: no such file. ValueError: neither a readable zip archive nor
            a pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} ({what}) does not exist")
    try:
        with zipfile.ZipFile(path):
            pass
    except zipfile.BadZipFile as e:
        with open(path, "rb") as f:  # torch's legacy format, a pickle: load_plain reads it
            if f.read(1) == b"\x80":
                return
        raise ValueError(f"{path} ({what}) cannot be read: {e}: a damaged file?") from None
    except OSError as e:
        raise ValueError(f"{path} ({what}) cannot be read: {e}") from None


def load_plain(
    path: str | os.PathLike[str], map_location: Any = "cpu", what: str = "file", mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)``, with errors that name ``path``.

    Args:
        path: the file.
        map_location: where tensors go.
        what: what the file should be, for the messages ("exported identifier").
        mmap: map the file instead of reading it (checkpoint metadata).

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: the pickle names a class or function that plain data does
            not need (it could run code); nothing from the file was run.
        ValueError: the file is not a torch file at all (truncated, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} ({what}) does not exist")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap can only be used" in str(e)):
                raise
            # not a zip archive (damaged, empty, torch's legacy format): read, the error
            # says what it is instead of torch's advice on how to save it
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere in unpickling
        named = re.search(r"GLOBAL (\S+)", str(e))
        if named is None:  # damaged or not a torch file: say what broke, not torch's advice
            boilerplate = ("Weights only load failed", "Check the documentation")
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            detail = " ".join(ln for ln in lines if not ln.startswith(boilerplate)) or str(e)
            detail = re.sub(r"^Please file an issue.*?use case: ", "", detail)
            raise ValueError(
                f"{path} ({what}) cannot be read: {type(e).__name__}: {detail}"
            ) from None
        culprit = f" (it names {named.group(1)})"
        raise UnsafeFileError(
            f"refusing to load {path} ({what}): it holds Python objects other than "
            f"tensors, numbers and strings{culprit}, and loading those could run code. "
            "Nothing from it was run. facecluster writes only plain data: a file it wrote "
            "loads, so this one was made or changed elsewhere"
        ) from None
