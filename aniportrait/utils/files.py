"""Opening array files (.npz, .npy) with one clear error for every way they can be bad.

Missing, empty (0 bytes), truncated (a zip archive without its central directory), corrupt (a bad deflate
stream), pickled (never loaded) or with NaN/infinite values where numbers are required: each is an
:class:`AniPortraitError` that names the file, what it was for and how to fix it.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from aniportrait.errors import AniPortraitError

__all__ = ["read_arrays"]


def read_arrays(path: str | os.PathLike, what: str, keys: Iterable[str] | None = None,
                finite: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` (``keys``: only those, each required), or of a ``.npy`` as ``{"array": ...}``.

    what: what the file is for, in the message ("landmarks", "pose input"). finite: keys whose values must all be
    finite numbers.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"{what} not found: {path}; check the path")
    if path.stat().st_size == 0:
        raise AniPortraitError(f"{what} {path} is empty (0 bytes); the file was not written completely: make it again")
    wanted = None if keys is None else list(keys)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"array": loaded}
        else:
            with loaded:
                missing = [key for key in wanted or () if key not in loaded.files]
                if missing:
                    raise AniPortraitError(f"{what} {path} lacks {', '.join(missing)} (it holds {', '.join(loaded.files)})")
                arrays = {key: loaded[key] for key in (loaded.files if wanted is None else wanted)}
    except AniPortraitError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise AniPortraitError(f"cannot read {what} {path} ({reason}); the file is truncated or corrupt (or holds "
                               "pickled objects, which are never loaded): make it again") from error
    for key in finite:
        array = arrays.get(key)
        if array is not None and np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
            count = int((~np.isfinite(array)).sum())
            raise AniPortraitError(f"{what} {path}: {key} holds {count} NaN or infinite values; make the file again")
    return arrays
