"""The one file-system module: atomic writes of files and folders, checksums, fsync, stale-temporary cleanup.

Every writer in the package goes through here, so "an interrupted write leaves either the old content or
nothing, never something half-written that loads" holds in one place:

* :func:`atomic_write_file`: the caller writes a temporary sibling ``.{name}.tmp-XXXX``; it is fsynced and
  renamed onto the target as the last step.
* :func:`atomic_write_dir`: the caller builds a temporary sibling folder; an existing target is moved aside
  (``.{name}.old-XXXX``), the new folder renamed in, and the old one deleted (put back if the rename fails).
* :func:`remove_stale_temporaries`: deletes what crashed writers of a target left behind.

Temporaries are always siblings of the target (same file system, so the rename is atomic) and start with
``.{target name}.``. They are created private (:func:`tempfile.mkstemp` / :func:`tempfile.mkdtemp`: ``0o600`` /
``0o700``) and given the permissions of an ordinary new file or folder, ``0o666`` / ``0o777`` minus the process
umask, just before they are renamed into place, as ``open`` and ``mkdir`` would (so colleagues on a shared file
system can read results under the usual umask ``022``). Nothing here knows about steering vectors or models.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TEMP_KINDS",
    "atomic_write_dir",
    "atomic_write_file",
    "current_umask",
    "fsync_file",
    "remove_stale_temporaries",
    "sha256_file",
    "write_text_synced",
]

#: Infixes of the temporaries made here (``.{name}.tmp-*``, ``.{name}.old-*``; ``trash`` from older releases).
TEMP_KINDS = ("tmp-", "old-", "trash-")


def current_umask() -> int:
    """The process umask (e.g. ``0o022``), read without changing it where ``/proc`` allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (briefly) and putting it back
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk_size``-byte chunks (default 4 MiB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to the disk (``os.fsync``)."""
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def write_text_synced(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` and fsync it. Not atomic by itself: use it inside a temporary
    folder (:func:`atomic_write_dir`) or a temporary file (:func:`atomic_write_file`)."""
    with Path(path).open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_file(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it onto ``path``.

    The rename is the last step, so ``path`` is either its old content or the complete new file; on any
    failure (including ``KeyboardInterrupt``) the temporary file is removed and the error re-raised. Missing
    parent folders are created.

    Args:
        path: the file to write.
        write: writes the complete content to the path it is given (the temporary file exists, empty).
        mode: permission bits for the new file (e.g. ``0o644``); default: ``0o666`` minus the umask, like
            any new file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(mode if mode is not None else 0o666 & ~current_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_dir(
    target: str | os.PathLike[str],
    build: Callable[[Path], None],
    *,
    keep_existing: Callable[[Path], bool] | None = None,
) -> Path:
    """Call ``build(tmp_dir)`` for a temporary sibling folder, then rename it onto ``target``.

    An existing ``target`` is replaced: it is renamed aside, the new folder renamed in, and the old one
    deleted; if renaming the new one in fails, the old one is put back. So ``target`` is always either the
    old folder or the complete new one. On any failure the temporary folder is removed and the error
    re-raised. What may be replaced is the caller's decision (check it before calling).

    Args:
        target: the folder to create or replace (made absolute, so ``"."``-style paths rename correctly).
        build: fills the (empty, ``0o700`` until it is renamed in) temporary folder it is given.
        keep_existing: for concurrent writers of the same content (e.g. a cache): if ``target`` exists
            when the new folder is ready (or appears while it is renamed in) and ``keep_existing(target)`` is
            true, the existing folder is kept and the new one discarded. Without it, a ``target`` that
            appears during the final rename makes the rename fail (``OSError``).

    Returns:
        ``target`` as an absolute :class:`~pathlib.Path`.
    """
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        _ordinary_permissions(tmp)
        _install_dir(tmp, target, keep_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _ordinary_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions of ordinary new files and folders (``0o666`` /
    ``0o777`` minus the umask): some writers (``mkdtemp``, safetensors) create them private."""
    mask = current_umask()
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _install_dir(tmp: Path, target: Path, keep_existing: Callable[[Path], bool] | None) -> None:
    """Rename the finished folder ``tmp`` onto ``target`` (see :func:`atomic_write_dir`)."""
    for _attempt in range(3):
        if not target.exists():
            try:
                os.rename(tmp, target)
                return
            except OSError:
                if keep_existing is None or not target.exists():
                    raise
                continue  # another writer got there first: decide below whether to keep its folder
        if keep_existing is not None and keep_existing(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, backup)
        except FileNotFoundError:
            continue  # removed meanwhile: try again
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return
    os.rename(tmp, target)


def remove_stale_temporaries(target: str | os.PathLike[str], max_age_s: float = 3600.0) -> None:
    """Delete temporaries of ``target`` left by crashed writers: siblings ``.{name}.tmp-*`` / ``.old-*`` /
    ``.trash-*`` (files or folders) last modified more than ``max_age_s`` seconds ago. Recent ones may belong
    to a writer that is still running and are kept. Errors are ignored."""
    target = Path(target)
    now = time.time()
    prefix = f".{target.name}."
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        if not (p.name.startswith(prefix) and p.name[len(prefix):].startswith(TEMP_KINDS)):
            continue
        try:
            if now - p.lstat().st_mtime <= max_age_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass
