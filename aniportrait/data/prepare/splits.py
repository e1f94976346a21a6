"""Who is in a clip, and which split each person goes to.

Splits are made per identity, never per clip, so no person (and, with the dataset rules below, no source
video) is seen in two splits. Identities are ranked by a seeded hash and the first ones go to test, the
next to val, the rest to train: the result depends only on the set of identities and the seed, not on
the order in which videos were processed. A split file pins identities to splits (official test lists).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from aniportrait.data.clip import SPLITS
from aniportrait.errors import AniPortraitError

__all__ = ["IDENTITY_RULES", "identity_of", "assign_splits", "read_split_file"]

IDENTITY_RULES = ("stem", "parent", "hdtf", "vfhq", "celebvhq", "regex:PATTERN")

_HDTF_NAME = re.compile(r"^(RD|WDA|WRA)_(.+?)_\d+$")
_VFHQ_NAME = re.compile(r"^Clip\+(.+?)\+P\d+\+C\d+\+F\d+-\d+$")
_TRAILING_INDEX = re.compile(r"^(.+)_\d+$")


def _hdtf_identity(stem: str) -> str:
    """``WDA_AmyKlobuchar1_000`` -> ``AmyKlobuchar``: HDTF numbers several videos of one speaker (WDA/WRA).

    Radio names (``RD_Radio11_000``) keep their number: those are different shows.
    """
    match = _HDTF_NAME.match(stem)
    if not match:
        return stem
    subset, name = match.groups()
    return name if subset == "RD" else name.rstrip("0123456789") or name


def identity_of(source_key: str, rule: str) -> str:
    """The identity of a source video from its path relative to the input folder (``a/b/name.mp4``)."""
    path = PurePosixPath(source_key)
    stem = path.stem
    if rule == "stem":
        return stem
    if rule == "parent":
        return path.parent.name or stem
    if rule == "hdtf":
        return _hdtf_identity(stem)
    if rule == "vfhq":
        match = _VFHQ_NAME.match(stem)
        return match.group(1) if match else stem  # the YouTube id: one interview, one person
    if rule == "celebvhq":
        match = _TRAILING_INDEX.match(stem)
        return match.group(1) if match else stem  # <ytb_id>_<n>: the YouTube id
    if rule.startswith("regex:"):
        pattern = rule[len("regex:"):]
        try:
            match = re.search(pattern, str(path.with_suffix("")))
        except re.error as error:
            raise AniPortraitError(f"identity={rule!r}: not a valid regular expression ({error})") from error
        if not match:
            raise AniPortraitError(f"identity={rule!r} does not match the video {source_key!r}; fix the pattern")
        return match.group(1) if match.groups() else match.group(0)
    raise AniPortraitError(f"unknown identity rule {rule!r}; use one of {', '.join(IDENTITY_RULES)}")


def read_split_file(path: str | Path) -> dict[str, str]:
    """``{identity: split}`` from JSON (an object) or text lines ``identity split``."""
    path = Path(path)
    if not path.is_file():
        raise AniPortraitError(f"split_file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as error:
            raise AniPortraitError(f"split_file {path} is not valid JSON ({error})") from error
        if not isinstance(table, dict):
            raise AniPortraitError(f"split_file {path} must hold a JSON object {{identity: split}}")
    else:
        table = {}
        for number, line in enumerate(text.splitlines(), start=1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 2:
                raise AniPortraitError(f"{path}:{number}: expected 'identity split', got {line!r}")
            table[parts[0]] = parts[1]
    bad = {identity: split for identity, split in table.items() if split not in SPLITS}
    if bad:
        identity, split = next(iter(bad.items()))
        raise AniPortraitError(f"split_file {path}: identity {identity!r} has split {split!r}; use one of {SPLITS}")
    return {str(identity): str(split) for identity, split in table.items()}


def _rank(identity: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{identity}".encode()).hexdigest()


def assign_splits(
    identities: Iterable[str],
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    fixed: dict[str, str] | None = None,
) -> dict[str, str]:
    """``{identity: split}``. Non-zero fractions get at least one identity each when there are enough
    identities to keep one for training: val from two identities on, test from three."""
    fixed = fixed or {}
    unique = sorted(set(identities))
    free = sorted((identity for identity in unique if identity not in fixed), key=lambda name: _rank(name, seed))
    count = len(free)
    test = round(test_fraction * count)
    val = round(val_fraction * count)
    if count >= 2 and val_fraction > 0:
        val = max(val, 1)
    if count >= 3 and test_fraction > 0:
        test = max(test, 1)
    assignment = {identity: fixed[identity] for identity in unique if identity in fixed}
    for position, identity in enumerate(free):
        assignment[identity] = "test" if position < test else "val" if position < test + val else "train"
    return assignment
