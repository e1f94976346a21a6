"""Atomic file writes: write to a temporary name beside the target, then rename.

A crash or an error never leaves a half-written output under the final name. Temporary names carry the
writing process's id (``.<name>.<pid>.<random>.tmp<suffix>``), so the first write into a folder removes what a
killed run (SIGKILL, power loss) left there: entries of that form whose process no longer exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_dir", "temporary_name", "remove_stale_temporaries"]

# mkstemp/mkdtemp draw 8 characters from [a-z0-9_]
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp(\.[^/]*)?$")
_cleaned: set[Path] = set()  # folders this process has already swept


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders that writers killed before they could clean up left in ``folder``
    (their process is gone); returns what was removed. Done once per folder per process by the writers below."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if entry.is_dir(follow_symlinks=False) else path.unlink()
            removed.append(path)
    return removed


def _sweep_once(folder: Path) -> None:
    key = folder.resolve()
    if key not in _cleaned:
        _cleaned.add(key)
        remove_stale_temporaries(folder)


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` in the form the sweep recognises (for writers that create the file
    themselves, like :class:`~aniportrait.data.video.VideoWriter`); nothing is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    token = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    return path.with_name(f".{path.stem}.{os.getpid()}.{token}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` if the block succeeds.

    ``suffix`` defaults to the target's suffix so that writers that pick a format from the extension
    (PyAV, numpy, cv2) keep working. Whether ``path`` may be replaced is the caller's decision
    (:mod:`aniportrait.utils.outputs` checks that before any work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should be readable like any other
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    An existing ``path`` is replaced only with ``replace=True`` (the caller owns it, or the user asked);
    otherwise :class:`FileExistsError` is raised before anything is written.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} appeared while it was being written; refusing to replace it")
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
