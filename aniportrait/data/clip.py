"""The clip format every dataset ends up in (GUIDE section 3).

```
<root>/manifest.jsonl            one JSON object per clip (ClipRecord)
<root>/clips/<id>/video.mp4      H.264 yuv420p, square face crop, constant fps
<root>/clips/<id>/audio.wav      16 kHz mono PCM16 (absent for video-only clips)
<root>/clips/<id>/landmarks.npz  lmks [T,478,3] f32, mesh3d [T,468,3] f32, trans_mat [T,4,4] f32,
                                 blendshapes [T,52] f32, valid [T] bool (+ optional extra arrays)
```
Readers validate shapes, dtypes and lengths and name the offending clip in their errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aniportrait.errors import AniPortraitError
from aniportrait.utils import values
from aniportrait.utils.atomic import atomic_path
from aniportrait.utils.files import read_arrays

__all__ = [
    "ClipRecord",
    "Manifest",
    "LANDMARK_ARRAYS",
    "SPLITS",
    "validate_landmarks",
    "load_landmarks",
    "save_landmarks",
    "clip_dir",
]

MANIFEST_NAME = "manifest.jsonl"
SPLITS = ("train", "val", "test")
# name -> (shape after the time axis, dtype)
LANDMARK_ARRAYS: dict[str, tuple[tuple[int, ...], np.dtype]] = {
    "lmks": ((478, 3), np.dtype(np.float32)),
    "mesh3d": ((468, 3), np.dtype(np.float32)),
    "trans_mat": ((4, 4), np.dtype(np.float32)),
    "blendshapes": ((52,), np.dtype(np.float32)),
    "valid": ((), np.dtype(bool)),
}


@dataclass
class ClipRecord:
    """One line of manifest.jsonl. Paths are relative to the dataset root."""

    id: str
    split: str
    identity: str
    fps: float
    frames: int
    width: int
    height: int
    duration_s: float
    source: str
    video: str
    landmarks: str
    audio: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return json.dumps(data, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> ClipRecord:
        required = ("id", "split", "identity", "fps", "frames", "width", "height", "duration_s", "source", "video", "landmarks")
        missing = [key for key in required if key not in data]
        if missing:
            raise AniPortraitError(f"{where}: manifest entry {data.get('id', '?')!r} lacks {', '.join(missing)}")
        if data["split"] not in SPLITS:
            raise AniPortraitError(f"{where}: clip {data['id']!r} has split {data['split']!r}; use one of {SPLITS}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        fields = {k: data[k] for k in known if k in data}
        clip = f"{where}: clip {data['id']!r}"
        fields["fps"] = values.number(f"{clip} fps", data["fps"], minimum=0, exclusive_minimum=True)
        for key in ("frames", "width", "height"):
            fields[key] = values.integer(f"{clip} {key}", data[key], minimum=1)
        fields["duration_s"] = values.number(f"{clip} duration_s", data["duration_s"], minimum=0)
        return cls(**fields, extra=extra)

    def path(self, root: Path, key: str) -> Path | None:
        relative = getattr(self, key)
        return None if relative is None else Path(root) / relative


def clip_dir(root: str | os.PathLike, clip_id: str) -> Path:
    return Path(root) / "clips" / clip_id


class Manifest:
    """The clips of one dataset root, in manifest order."""

    def __init__(self, root: str | os.PathLike, records: Iterable[ClipRecord] = ()):
        self.root = Path(root)
        self.records: list[ClipRecord] = list(records)

    @classmethod
    def load(cls, root: str | os.PathLike) -> Manifest:
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise AniPortraitError(
                f"no {MANIFEST_NAME} in {root}: not a prepared dataset; prepare one with "
                f"`python -m aniportrait.data.prepare input=VIDEOS output={root}` or use data=synthetic"
            )
        records = []
        seen: set[str] = set()
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise AniPortraitError(f"{path}:{number}: not valid JSON ({error})") from error
            record = ClipRecord.from_dict(data, f"{path}:{number}")
            if record.id in seen:
                raise AniPortraitError(f"{path}:{number}: duplicate clip id {record.id!r}")
            seen.add(record.id)
            records.append(record)
        return cls(root, records)

    def save(self) -> Path:
        path = self.root / MANIFEST_NAME
        with atomic_path(path) as tmp:
            tmp.write_text("".join(record.to_json() + "\n" for record in self.records))
        return path

    def split(self, name: str) -> list[ClipRecord]:
        if name not in SPLITS:
            raise AniPortraitError(f"unknown split {name!r}; use one of {SPLITS}")
        return [record for record in self.records if record.split == name]

    def identities(self, split: str | None = None) -> list[str]:
        records = self.records if split is None else self.split(split)
        return sorted({record.identity for record in records})

    def __iter__(self) -> Iterator[ClipRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def upsert(self, record: ClipRecord) -> None:
        self.records = [r for r in self.records if r.id != record.id] + [record]


def validate_landmarks(arrays: dict[str, np.ndarray], name: str, frames: int | None = None) -> int:
    """Check the required arrays' shapes and dtypes; returns T. Raises AniPortraitError naming ``name``."""
    length = None
    for key, (shape, dtype) in LANDMARK_ARRAYS.items():
        if key not in arrays:
            raise AniPortraitError(f"{name}: landmarks lack the array {key!r} (clip format: {', '.join(LANDMARK_ARRAYS)})")
        array = arrays[key]
        if array.ndim != 1 + len(shape) or tuple(array.shape[1:]) != shape:
            raise AniPortraitError(f"{name}: {key} has shape {tuple(array.shape)}, expected [T, {', '.join(map(str, shape))}]".replace(", ]", "]"))
        if array.dtype != dtype:
            raise AniPortraitError(f"{name}: {key} has dtype {array.dtype}, expected {dtype}")
        if length is None:
            length = array.shape[0]
        elif array.shape[0] != length:
            raise AniPortraitError(f"{name}: {key} has {array.shape[0]} frames but lmks has {length}")
    if frames is not None and length != frames:
        raise AniPortraitError(f"{name}: landmarks have {length} frames but the manifest says {frames}")
    return int(length)


def load_landmarks(path: str | os.PathLike, frames: int | None = None) -> dict[str, np.ndarray]:
    """Read and validate a landmarks.npz (all arrays, extras included)."""
    path = Path(path)
    arrays = read_arrays(path, "landmarks file", finite=("lmks", "mesh3d", "trans_mat", "blendshapes"))
    validate_landmarks(arrays, str(path), frames)
    return arrays


def save_landmarks(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Validate and write a landmarks.npz atomically (required arrays cast to the format's dtypes)."""
    arrays = dict(arrays)
    for key, (_, dtype) in LANDMARK_ARRAYS.items():
        if key in arrays:
            arrays[key] = np.asarray(arrays[key]).astype(dtype, copy=False)
    validate_landmarks(arrays, str(path))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return Path(path)
