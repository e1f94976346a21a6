"""The one overwrite rule of every command: never destroy a file this run did not create unless the user asked.

Before any model loads, a command lists what it will write and what it reads, and :func:`check_outputs`
(files) or :func:`check_output_dir` (a folder written as a whole, e.g. a bundle) refuses with one error that
names both paths when

* an output is one of the inputs (also through a symlink or hard link): never allowed, not even when asked;
* two outputs are the same file (two batch rows, or an mp4 and its .npz);
* an output already exists and the user did not ask to replace it (``overwrite=true`` for the Hydra entry
  points, ``--force`` for the argparse commands: the caller passes its spelling as ``ask``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from aniportrait.errors import AniPortraitError

__all__ = ["same_file", "check_outputs", "check_output_dir", "Overwrite"]

PathLike = str | os.PathLike


class Overwrite:
    """How the user says "replace it": ``Overwrite(True, "overwrite=true")``, ``Overwrite(False, "--force")``."""

    def __init__(self, allowed: bool, ask: str):
        self.allowed, self.ask = bool(allowed), ask


def _key(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name the same file: the same absolute path after resolving symlinks, or, for existing
    files, the same inode (hard links)."""
    first, second = _key(Path(first)), _key(Path(second))
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (symlinks resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None] | None = None,
                  overwrite: Overwrite | None = None, written: Iterable[PathLike] = ()) -> None:
    """Refuse outputs that collide with an input, with each other, or with an existing file.

    outputs / inputs: a label (``output``, ``audio``, ``job 3 output``) -> path; None entries are skipped.
    overwrite: may existing outputs be replaced (default: no, and the message names ``overwrite=true``).
    written: files this run created itself (earlier jobs of a batch) that may be replaced without asking.
    """
    overwrite = overwrite or Overwrite(False, "overwrite=true")
    given_outputs = [(label, Path(path)) for label, path in outputs.items() if path]
    given_inputs = [(label, Path(path)) for label, path in (inputs or {}).items() if path]
    own = [Path(path) for path in written]
    for index, (label, path) in enumerate(given_outputs):
        key = label.split(" (")[0]  # "output (its .npz)" is chosen with output=
        for input_label, input_path in given_inputs:
            if same_file(path, input_path):
                raise AniPortraitError(f"{label}={path} is the same file as the input {input_label}={input_path}; "
                                       f"writing it would destroy the input: choose another {key}")
        for other_label, other in given_outputs[:index]:
            if same_file(path, other):
                raise AniPortraitError(f"{label}={path} is the same file as {other_label}={other}; each output "
                                       "needs a file of its own")
        if path.exists() and not overwrite.allowed and not any(same_file(path, mine) for mine in own):
            raise AniPortraitError(f"{label}={path} exists and this command did not write it; add {overwrite.ask} to "
                                   f"replace it, or choose another {key}")


def check_output_dir(path: PathLike, inputs: Mapping[str, PathLike | None], overwrite: Overwrite,
                     replaceable: str, marker: str) -> Path:
    """A folder written as a whole and renamed into place (a bundle). Refused when it is a file, when an input lies
    in it (replacing it would delete the input), or when it exists and is not empty, unless the user asked; even
    then only a folder holding ``marker`` (a previous ``replaceable``, e.g. a bundle's aniportrait.yaml) is
    replaced, never a folder of other files. Returns the path."""
    path = _key(Path(path))
    for label, input_path in inputs.items():
        if input_path and _inside(Path(input_path), path):
            raise AniPortraitError(f"the output folder {path} holds the input {label}={input_path}; writing it would "
                                   "delete the input: choose another output folder")
    if path.is_file():
        raise AniPortraitError(f"{path} is a file; give a folder name for the output (a new or an empty folder)")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not (path / marker).is_file():
        raise AniPortraitError(f"{path} exists and holds files that are not a {replaceable}; choose a new or an empty "
                               "output folder (nothing there is ever deleted)")
    if not overwrite.allowed:
        raise AniPortraitError(f"{path} holds a {replaceable} that this command did not write; add {overwrite.ask} to "
                               "replace it, or choose another output folder")
    return path
