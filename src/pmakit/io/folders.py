"""Output folders that appear complete or not at all, and never inside their own inputs.

A folder is built in a temporary sibling and renamed into place only when complete, so a
crash, a full disk or an interrupt never leaves a half-written model where a user (or a Hub
upload) would pick it up.

The temporary siblings are named ``_<name>.<8 random characters>.tmp`` (and ``.old`` for the
folder being replaced). While a writer works on one it holds an exclusive ``flock`` on it; the
kernel drops that lock when the writer dies, even by ``kill -9``. So a sibling with that name
whose lock is free belongs to a dead writer, and `remove_stale_temporaries` (run before every
new write of the same name, and by the PMA callback when training starts) deletes it. Nothing
else is ever touched: not other ``_*`` folders, not temporaries a live process still holds.

A merge into an output folder also holds ``.<name>.lock`` beside it (`output_lock`), so a second
merge into the same folder is refused instead of silently replacing the first one's result.

Finished folders get the permissions ``os.makedirs`` would give them under the user's umask
(``0o777 & ~umask``, 755 for the usual 022), like a ``save_pretrained`` folder, not the 700
of ``mkdtemp``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, PmakitError


try:  # POSIX: writer locks that die with their process
    import fcntl
except ImportError:  # pragma: no cover - Windows: no stale temporary is ever recognised
    fcntl = None


__all__ = [
    "DiskFullError",
    "OutputBusyError",
    "atomic_directory",
    "check_output_outside_inputs",
    "copy_model_folder",
    "output_lock",
    "publish_directory",
    "remove_stale_temporaries",
    "reporting_disk_full",
    "scratch_directory",
]

# `tempfile.mkdtemp` names: prefix `_<name>.`, 8 characters of [a-z0-9_], suffix `.tmp` or `.old`.
_TEMPORARY_RE = re.compile(r"^_(?P<name>.+)\.[a-z0-9_]{8}\.(?:tmp|old)$")
# A writer locks its folder right after `mkdtemp`; younger unlocked folders are left alone so
# that a sweep never races a writer between those two calls.
_GRACE_SECONDS = 0.5


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``, on any error it is removed.

    An existing non-empty ``path`` is refused unless ``overwrite`` is set, and checked before any
    work starts so that a long merge does not fail at its very end.
    """
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path {target} exists and is not a folder.")
    if _is_nonempty_dir(target) and not overwrite:
        raise FileExistsError(
            f"Output folder {target} already exists and is not empty; pass overwrite=True to replace it."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, lambda name: name == target.name)
    # "_" first: the Trainer's Hub pushes skip `_*`, so a push that runs while a folder is being
    # built never uploads it half-written.
    tmp, lock = _locked_temporary(target, ".tmp")
    try:
        os.chmod(tmp, _default_directory_mode())
        yield tmp
        publish_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _release(lock)


def publish_directory(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an old ``target`` only after the move."""
    if target.exists():
        old, lock = _locked_temporary(target, ".old")
        try:
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            _release(lock)
    else:
        os.replace(tmp, target)


def remove_stale_temporaries(folder: str | os.PathLike, accept: Callable[[str], bool] | None = None) -> list[Path]:
    """Delete the temporaries that dead writers left in ``folder``; return what was deleted.

    Only ``_<name>.<random>.tmp`` / ``.old`` folders made by `atomic_directory` are candidates,
    only for names ``accept(name)`` allows (all when None), and only when no live process holds
    their writer lock. On systems without ``flock`` nothing is removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY_RE.match(entry.name)
        if match is None or (accept is not None and not accept(match["name"])):
            continue
        if entry.is_dir() and not entry.is_symlink() and _writer_is_gone(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def scratch_directory(name: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a private work folder ``_<name>.<random>.tmp`` in ``parent`` (default: the temp dir), removed on exit.

    It holds the same writer lock as `atomic_directory`'s temporaries, so the scratch of a process that
    died (``kill -9``) is found and removed by the next one that asks for scratch of the same ``name``;
    scratch that a live process holds is left alone.
    """
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    remove_stale_temporaries(parent, lambda found: found == name)
    tmp, lock = _locked_temporary(parent / name, ".tmp")
    try:
        yield tmp
    finally:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:  # even when an interrupt cuts the removal short: the next run then removes the rest
            _release(lock)


def _locked_temporary(target: Path, suffix: str) -> tuple[Path, int | None]:
    """A fresh ``_<name>.<random><suffix>`` sibling of ``target``, with its writer lock held."""
    tmp = Path(tempfile.mkdtemp(prefix=f"_{target.name}.", suffix=suffix, dir=target.parent))
    return tmp, _take_lock(tmp)


def _take_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding an exclusive flock, or None where locks are unavailable."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release(lock: int | None) -> None:
    if lock is not None:
        os.close(lock)  # closing the last descriptor drops the flock


def _writer_is_gone(path: Path) -> bool:
    """Whether no live process holds ``path``'s writer lock (False when that cannot be told)."""
    try:
        if time.time() - path.stat().st_mtime < _GRACE_SECONDS:
            return False
    except OSError:
        return False
    lock = _take_lock(path)
    _release(lock)
    return lock is not None


def _default_directory_mode() -> int:
    """The mode ``os.makedirs`` gives a new folder: ``0o777`` less the process umask."""
    return 0o777 & ~_current_umask()


def _current_umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return mask


class DiskFullError(PmakitError, OSError):
    """The disk filled up while a folder was written (errno ``ENOSPC``); the one-line message names the folder."""


_NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def _is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a full disk: an ENOSPC OSError, a `shutil.copytree` error list
    with one, or a library error that only carries the text (safetensors' writer)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list):
            return any(_NO_SPACE in str(entry) for entry in err.args[0])
        if _NO_SPACE in str(err) or "StorageFull" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


@contextmanager
def reporting_disk_full(target: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk inside the block into one `DiskFullError` line naming ``target``.

    Wrap `atomic_directory` (or a copy built with it) so that its temporary folder is removed
    first: the message can then say that ``target`` was left as it was. Other errors pass through.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not _is_disk_full(err):
            raise
        raise DiskFullError(
            errno.ENOSPC, f"No space left on device to write {Path(target)}; it was left as it was (free some space)"
        ) from None


def copy_model_folder(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Replace ``path`` by a copy of the finished folder ``source`` (built aside, then renamed)."""
    with atomic_directory(path, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return Path(path)


def check_output_outside_inputs(
    output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], *, overwrite: bool = False
) -> None:
    """Refuse an output folder that lies inside an input, or (with ``overwrite``) one that holds an input.

    ``inputs`` are ``(label, folder)`` pairs; the label names the input in the message.

    Raises:
        InputError: the output and an input overlap.
    """
    out = Path(output).resolve()
    for label, folder in inputs:
        src = Path(folder).resolve()
        if out == src or out.is_relative_to(src):
            raise InputError(f"Output folder {output} is inside input {label}; choose a folder outside every input.")
        if overwrite and src.is_relative_to(out):
            raise InputError(f"Input {label} is inside output folder {output}, which overwrite would delete.")


class OutputBusyError(InputError):
    """Another process is writing the same output folder (it holds the folder's lock file)."""


def _output_lock_file(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _take_output_lock(fd: int, lock_path: Path, target: Path) -> bool:
    """Lock ``fd`` without waiting; False when the file was replaced meanwhile (try again)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        raise OutputBusyError(
            f"Output folder {target} is being written by another process (pid {holder}, lock {lock_path}); "
            "wait for it to finish or choose another output folder."
        ) from None
    try:  # the holder before us removed the file after we opened it: our lock guards nothing
        return os.stat(lock_path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive writer lock of output folder ``path``: ``.<name>.lock`` beside it, with our pid.

    Two writers of one folder would otherwise both succeed and the later would silently replace
    the earlier. The second one is refused at once (it does not wait: a merge can take hours).
    The kernel drops the lock when its holder dies, even by ``kill -9``; the file is removed on
    release. Without ``fcntl`` (Windows) no lock is taken.

    Raises:
        OutputBusyError: another live process holds the lock; the message names its pid.
    """
    target = Path(path).expanduser().absolute()
    if fcntl is None:  # pragma: no cover - Windows
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = _output_lock_file(target)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _take_output_lock(fd, lock_path, target):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield lock_path
    finally:
        lock_path.unlink(missing_ok=True)  # still locked: nobody can take it between unlink and close
        os.close(fd)
