"""Reading weight files and loading them with every missing or unexpected key accounted for.

The official scripts load with ``strict=False`` and print nothing, so a checkpoint of another
architecture "loads" and silently leaves random weights behind. Here every key that does not match
is either explicitly allowed by the caller (and logged) or raises an :class:`AniPortraitError` that
lists it, before the module is touched.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from aniportrait.errors import AniPortraitError

__all__ = ["LoadReport", "load_state_dict_checked", "read_checkpoint", "read_training_checkpoint"]

log = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_SHOWN_KEYS = 12  # keys quoted in an error message; the count says how many more there are


@dataclass(frozen=True)
class LoadReport:
    """What a checked load did: the keys it left missing and ignored, all of them allowed."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``.pt/.pth/.ckpt/.bin``).

    Torch files are read with ``weights_only=True`` (no code runs on load). A top-level
    ``"state_dict"`` entry (AnimateDiff and Lightning checkpoints) is unwrapped; other non-tensor
    entries (``global_step``, ``epoch``) are dropped with a log line.
    """
    path = Path(path)
    if not path.is_file():
        raise AniPortraitError(f"checkpoint {path} does not exist: pass the path of a .safetensors/.pt/.pth file")
    if path.stat().st_size == 0:
        raise AniPortraitError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish; fetch it again")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:  # a truncated file fails its header's size check
            raise AniPortraitError(f"checkpoint {path} is not a readable .safetensors file ({_one_line(error)}); it is "
                                   "truncated or corrupt: copy or export it again") from error
    if path.suffix not in _TORCH_SUFFIXES:
        raise AniPortraitError(
            f"checkpoint {path} has an unknown suffix {path.suffix!r}: expected .safetensors or one of {_TORCH_SUFFIXES}"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError here
        raise AniPortraitError(f"checkpoint {path} could not be read as a weights-only torch file "
                               f"({_one_line(error)}); it is truncated, corrupt or not a weights file") from error
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        raise AniPortraitError(f"checkpoint {path} holds a {type(content).__name__}, not a state dict")
    dropped = sorted(str(key) for key, value in content.items() if not isinstance(value, torch.Tensor))
    if dropped:
        log.info("checkpoint %s: ignoring non-tensor entries %s", path, dropped)
    return {str(key): value for key, value in content.items() if isinstance(value, torch.Tensor)}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def read_training_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict:
    """A Lightning checkpoint of our training (to resume or export), checked before use: it exists, is complete
    (a torch zip archive with its central directory, so a truncated copy is caught without reading it all), loads
    with ``weights_only=True`` and was written by aniportrait training. ``key`` names where the path came from."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        where = "a folder" if path.is_dir() else "not found"
        raise AniPortraitError(f"{key}={path}: {where}; give a Lightning checkpoint file of a training run "
                               "(logs/train/<date>/<time>/checkpoints/last.ckpt)")
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        raise AniPortraitError(f"{key}={path} is not a complete checkpoint (empty, truncated or not a torch file); "
                               "give another checkpoint of the run (checkpoints/step_*.ckpt)")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - zipfile and torch raise several types for damaged files
        raise AniPortraitError(f"{key}={path} cannot be read ({_one_line(error)}); it is truncated or corrupt: give "
                               "another checkpoint of the run (checkpoints/step_*.ckpt)") from error
    if not isinstance(checkpoint, Mapping) or "module_class" not in (checkpoint.get("aniportrait") or {}):
        raise AniPortraitError(f"{key}={path} is not a checkpoint written by aniportrait training (no 'aniportrait' "
                               "entry); official release files are imported with `python -m aniportrait.bundle "
                               "import-official`")
    return dict(checkpoint)


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.match(pattern, key) for pattern in patterns)


def _quote(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = len(keys) - _SHOWN_KEYS
    return f"{shown} (and {more} more)" if more > 0 else shown


def load_state_dict_checked(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    component: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``module``; raise unless every mismatch is explicitly allowed.

    ``allow_missing`` / ``allow_unexpected`` are key prefixes, or regular expressions matched at the
    start of the key (``re.match``), e.g. ``r".*\\.motion_modules\\."``. Keys with a different shape,
    and missing or unexpected keys that no pattern allows, raise :class:`AniPortraitError` naming
    ``component`` and the keys, and leave the module unchanged. Allowed mismatches are logged.
    """
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    bad_missing = [key for key in missing if not _matches(key, allow_missing)]
    bad_unexpected = [key for key in unexpected if not _matches(key, allow_unexpected)]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} keys with another shape (checkpoint vs model): {_quote(mismatched)}")
    if bad_missing:
        problems.append(f"{len(bad_missing)} missing keys: {_quote(bad_missing)}")
    if bad_unexpected:
        problems.append(f"{len(bad_unexpected)} unexpected keys: {_quote(bad_unexpected)}")
    if problems:
        raise AniPortraitError(
            f"{component}: the checkpoint does not fit {type(module).__name__}: " + "; ".join(problems)
            + ". Is it a checkpoint of another architecture or configuration?"
        )
    module.load_state_dict(state_dict, strict=False)
    if missing:
        log.info("%s: %d allowed missing keys left as they were: %s", component, len(missing), _quote(missing))
    if unexpected:
        log.info("%s: %d allowed unexpected keys ignored: %s", component, len(unexpected), _quote(unexpected))
    return LoadReport(missing=tuple(missing), unexpected=tuple(unexpected))
