"""The one file-system module: atomic writes of files and folders, checksums, fsync, stale-temporary cleanup.

Every writer in the package goes through here, so "an interrupted write leaves either the old content or
nothing, never something half-written that loads" holds in one place:

* :func:`atomic_write_file`: the caller writes a temporary sibling ``.{name}.tmp-XXXX``; it is fsynced and
  renamed onto the target as the last step.
* :func:`atomic_write_dir`: the caller builds a temporary sibling folder; an existing target is moved aside
  (``.{name}.old-XXXX``), the new folder renamed in, and the old one deleted (put back if the rename fails).
* :func:`remove_stale_temporaries`: deletes what crashed writers of a target left behind; every write calls
  it first, so temporaries of killed writers never pile up.
* :func:`recover_replaced`: puts back a folder whose replacement was interrupted between its two renames.
* :func:`check_path`: refuses paths that are not valid UTF-8 (they save but cannot be read back).
* Every file-system failure of a write (including a full disk reported by safetensors or torch as
  ``RuntimeError``) is raised as an ``OSError`` naming the path (:func:`os_error`).

Temporaries are always siblings of the target (same file system, so the rename is atomic) and are named
``.{target name}.{kind}-{host}-{pid}-XXXX`` (``kind``: ``tmp`` / ``old``; ``host``: 8 hex digits of a hash of
the host name; ``pid``: the writing process). A temporary whose writer ran on this host and is no longer
alive is stale; one from another host (or from an older release, without host and pid) is stale once it is
an hour old. They are created private (:func:`tempfile.mkstemp` / :func:`tempfile.mkdtemp`: ``0o600`` /
``0o700``) and given the permissions of an ordinary new file or folder, ``0o666`` / ``0o777`` minus the process
umask, just before they are renamed into place, as ``open`` and ``mkdir`` would (so colleagues on a shared file
system can read results under the usual umask ``022``). Nothing here knows about steering vectors or models.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TEMP_KINDS",
    "atomic_write_dir",
    "atomic_write_file",
    "check_path",
    "current_umask",
    "fsync_file",
    "os_error",
    "recover_replaced",
    "remove_stale_temporaries",
    "sha256_file",
    "write_text_synced",
]

#: Infixes of the temporaries made here (``.{name}.tmp-*``, ``.{name}.old-*``; ``trash`` from older releases).
TEMP_KINDS = ("tmp-", "old-", "trash-")
#: Age after which a temporary whose writer cannot be checked (another host, an older release) is stale.
FOREIGN_STALE_S = 3600.0
#: A folder whose replacement was interrupted is put back only if its backup was renamed this long ago (when the
#: writer cannot be checked for being alive): the two renames of a replacement are microseconds apart.
FOREIGN_RECOVER_S = 10.0

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_OWNER = re.compile(r"^(?:tmp|old|trash)-([0-9a-f]{8})-(\d{1,10})-")
#: Words of a writer's non-OSError exception that mean the file system failed (safetensors' Rust ``IoError``,
#: torch's ``PytorchStreamWriter ... file write failed``).
_IO_WORDS = ("ioerror", "file write failed", "no space left", "disk quota", "input/output error",
             "read-only file system", "too many open files")


def check_path(path: str | os.PathLike[str], what: str = "path") -> Path:
    """``path`` as a :class:`~pathlib.Path`, refused if it is not valid UTF-8 (a file name with such bytes saves
    but cannot be read back by safetensors).

    Raises:
        ValueError: naming the argument.
        TypeError: not a str or path-like.
    """
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{what}` must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    for candidate in (text, os.path.abspath(text)):
        try:
            candidate.encode("utf-8")
        except UnicodeEncodeError:
            where = "the current folder's path" if candidate != text else "it"
            raise ValueError(f"`{what}` {text.encode('utf-8', 'replace')[:200]!r}: {where} is not valid UTF-8; "
                             "use a path whose name is valid UTF-8") from None
    return Path(text)


def os_error(exc: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """What a failed write should raise: an ``OSError`` naming ``path`` when ``exc`` is a file-system failure
    (an ``OSError`` without a file name, or a library's ``RuntimeError``-like error saying the disk is full /
    the write failed, or any error while the file system has no space left), else ``exc`` itself."""
    if isinstance(exc, OSError):
        if exc.filename is not None or exc.errno is None:
            return exc
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    if not isinstance(exc, Exception) or isinstance(exc, (ValueError, TypeError)):
        return exc
    text = str(exc)
    m = re.search(r"Os \{ code: (\d+)", text)  # safetensors: IoError(Os { code: 28, kind: StorageFull, ...
    code = int(m.group(1)) if m else None
    if code is None and any(w in text.lower() for w in _IO_WORDS):
        code = errno.ENOSPC if "space" in text.lower() else errno.EIO
    if code is None and _disk_full(Path(path).parent):
        code = errno.ENOSPC
    if code is None:
        return exc
    first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
    return OSError(code, f"{os.strerror(code)} ({type(exc).__name__}: {first})", str(path))


def _disk_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < (1 << 16)


def _writer_alive(name_rest: str) -> bool | None:
    """Whether the writer of a temporary (its name after ``.{target}.``) is alive: None when unknown (another
    host or an older naming scheme)."""
    m = _OWNER.match(name_rest)
    if m is None or m.group(1) != _HOST:
        return None
    pid = int(m.group(2))
    if pid == os.getpid():
        return True  # ours: another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _tag() -> str:
    return f"{_HOST}-{os.getpid()}-"


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
    path = check_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_tag()}", dir=path.parent)
    except OSError as exc:
        raise os_error(exc, path) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(mode if mode is not None else 0o666 & ~current_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        converted = os_error(exc, path)
        if converted is exc:
            raise
        raise converted from exc
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
    target = Path(os.path.abspath(check_path(target)))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_tag()}", dir=target.parent))
    except OSError as exc:
        raise os_error(exc, target) from None
    try:
        build(tmp)
        _ordinary_permissions(tmp)
        _install_dir(tmp, target, keep_existing)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        converted = os_error(exc, target)
        if converted is exc:
            raise
        raise converted from exc
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
        # Two renames: the target is absent for a few microseconds. A crash in between leaves the complete old
        # folder as this backup, which recover_replaced() (called by load and by the next write) puts back.
        backup = target.parent / f".{target.name}.old-{_tag()}{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, backup)
        except FileNotFoundError:
            continue  # removed meanwhile: try again
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(backup, target)
            raise
        _remove(backup)
        return
    os.rename(tmp, target)


def _remove(p: Path) -> None:
    """Delete a file, a symlink (not what it points to) or a folder tree; errors ignored."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def _temporaries(target: Path) -> list[tuple[Path, str]]:
    """``(path, name after ".{target name}.")`` of every temporary sibling of ``target``."""
    prefix = f".{target.name}."
    try:
        with os.scandir(target.parent) as it:
            names = [e.name for e in it if e.name.startswith(prefix)]
    except OSError:
        return []
    return [(target.parent / n, n[len(prefix):]) for n in names if n[len(prefix):].startswith(TEMP_KINDS)]


def recover_replaced(target: str | os.PathLike[str], wait_s: float = 2.0) -> bool:
    """Put back a folder whose replacement was interrupted between its two renames (:func:`atomic_write_dir`).

    When ``target`` does not exist but a backup ``.{name}.old-*`` of it does, and the writer that made the
    backup is dead (or, for a writer on another host, the backup was renamed more than
    :data:`FOREIGN_RECOVER_S` ago), the newest such backup is renamed back to ``target``. While a live writer
    is between its renames, this waits up to ``wait_s`` seconds for it to finish.

    Returns:
        True if ``target`` exists afterwards.
    """
    target = Path(os.path.abspath(target))
    deadline = time.monotonic() + wait_s
    while True:
        if os.path.lexists(target):
            return True
        backups = [(p, rest) for p, rest in _temporaries(target) if rest.startswith("old-")]
        if not backups:
            return False
        live = False
        candidates = []
        for p, rest in backups:
            alive = _writer_alive(rest)
            try:
                age = time.time() - p.lstat().st_ctime
            except OSError:
                continue
            if alive or (alive is None and age < FOREIGN_RECOVER_S):
                live = True
            else:
                candidates.append((age, p))
        if candidates:
            _age, newest = min(candidates)
            try:
                os.rename(newest, target)
                return True
            except OSError:
                if os.path.lexists(target):
                    return True
        if not live or time.monotonic() >= deadline:
            return os.path.lexists(target)
        time.sleep(0.02)


def remove_stale_temporaries(target: str | os.PathLike[str], max_age_s: float = FOREIGN_STALE_S) -> None:
    """Delete temporaries of ``target`` left by crashed writers: siblings ``.{name}.tmp-*`` / ``.old-*`` /
    ``.trash-*`` (files or folders). One written on this host by a process that is no longer alive is deleted
    at once; one whose writer cannot be checked (another host, an older release's naming) once it was last
    modified more than ``max_age_s`` seconds ago. Temporaries of live writers (this process included) are
    kept. An interrupted folder replacement is first put back (:func:`recover_replaced`). Errors are
    ignored."""
    target = Path(os.path.abspath(target))
    found = _temporaries(target)
    if not found:
        return
    if any(rest.startswith("old-") for _, rest in found) and not os.path.lexists(target):
        recover_replaced(target, wait_s=0.0)
        found = _temporaries(target)
    now = time.time()
    for p, rest in found:
        alive = _writer_alive(rest)
        if alive:
            continue
        try:
            if alive is None and now - p.lstat().st_mtime <= max_age_s:
                continue
        except OSError:
            continue
        _remove(p)
