"""Hold frame ranges back: split every clip of a dataset into a training part and held-out parts, by time.

With few identities (a handful of sample clips, one person per clip), splitting by identity leaves nothing to
train on; holding back the END of every clip instead tests on frames no training step ever saw, of people it did
see. For each clip of ``T`` frames::

    [ train: the first part | gap | val: val_fraction x T | gap | test: the last test_fraction x T ]

``gap_seconds`` of frames between the parts are dropped, so no held-out frame is a near-copy of a training frame.
Each part becomes its own clip (``<id>-train``, ``<id>-val``, ``<id>-test``: video, audio, landmarks cut to its
frames) in the clip format, with the source clip's identity and the part's split::

    python -m aniportrait.data.holdout SOURCE_ROOT OUT_ROOT [test_fraction=0.2] [val_fraction=0.1] [gap_seconds=0.5]

A clip too short to give every part ``min_frames`` frames is left out (named in the log). The output is written
into a temporary folder and renamed when complete; an existing OUT_ROOT is refused.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from aniportrait.audio.io import SAMPLE_RATE, load_audio, write_wav
from aniportrait.data.clip import ClipRecord, Manifest, clip_dir, load_landmarks, save_landmarks
from aniportrait.data.video import read_video, write_video
from aniportrait.errors import AniPortraitError
from aniportrait.utils.atomic import atomic_dir

__all__ = ["HoldoutSettings", "frame_ranges", "split_frame_ranges", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HoldoutSettings:
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    gap_seconds: float = 0.5
    min_frames: int = 16
    crf: int = 18  # H.264 quality of the re-encoded parts (as prepare's default)
    audio: bool = True  # false: video-only parts (what stage-B training needs; a smaller dataset)

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 <= self.val_fraction < 1.0 or \
                self.test_fraction + self.val_fraction >= 1.0:
            raise AniPortraitError(f"test_fraction={self.test_fraction}, val_fraction={self.val_fraction}: need "
                                   "0 < test_fraction, 0 <= val_fraction and test_fraction + val_fraction < 1")
        if self.gap_seconds < 0 or self.min_frames < 1:
            raise AniPortraitError(f"gap_seconds={self.gap_seconds}, min_frames={self.min_frames}: need gap_seconds >= 0 "
                                   "and min_frames >= 1")


def frame_ranges(frames: int, fps: float, settings: HoldoutSettings) -> dict[str, range] | None:
    """The frame ranges of the parts (``train``, ``val`` when asked for, ``test``) of a clip, or None when one of
    them would be shorter than ``settings.min_frames``."""
    gap = math.ceil(settings.gap_seconds * fps)
    test = max(settings.min_frames, round(frames * settings.test_fraction))
    val = max(settings.min_frames, round(frames * settings.val_fraction)) if settings.val_fraction else 0
    train_end = frames - test - gap - (val + gap if val else 0)
    if train_end < settings.min_frames:
        return None
    ranges = {"train": range(0, train_end)}
    if val:
        ranges["val"] = range(train_end + gap, train_end + gap + val)
    ranges["test"] = range(frames - test, frames)
    return ranges


def _write_part(out_root: Path, record: ClipRecord, split: str, frames: range, video, audio, arrays,
                crf: int) -> ClipRecord:
    """One part of a clip as a new clip in ``out_root``."""
    part_id = f"{record.id}-{split}"
    folder = clip_dir(out_root, part_id)
    folder.mkdir(parents=True, exist_ok=True)
    window = slice(frames.start, frames.stop)
    part_audio = None
    if audio is not None:  # audio.wav is the clip's audio; video.mp4 stays silent
        part_audio = audio[round(frames.start / record.fps * SAMPLE_RATE): round(frames.stop / record.fps * SAMPLE_RATE)]
        write_wav(folder / "audio.wav", part_audio)
    write_video(folder / "video.mp4", video[window], record.fps, crf=crf)
    save_landmarks(folder / "landmarks.npz", {name: values[window] for name, values in arrays.items()})
    relative = folder.relative_to(out_root)
    return replace(record, id=part_id, split=split, frames=len(frames), duration_s=len(frames) / record.fps,
                   source=f"{record.source} frames {frames.start}-{frames.stop - 1}",
                   video=str(relative / "video.mp4"), landmarks=str(relative / "landmarks.npz"),
                   audio=str(relative / "audio.wav") if part_audio is not None else None,
                   extra={**record.extra, "holdout_of": record.id, "holdout_frames": [frames.start, frames.stop]})


def split_frame_ranges(source_root: str | Path, out_root: str | Path, settings: HoldoutSettings = HoldoutSettings(),
                       ) -> Manifest:
    """Write the held-out version of the dataset at ``source_root`` to ``out_root``; returns its manifest."""
    source_root, out_root = Path(source_root), Path(out_root)
    if out_root.exists():
        raise AniPortraitError(f"{out_root} exists; give a new folder for the held-out dataset (nothing was written)")
    manifest = Manifest.load(source_root)
    records: list[ClipRecord] = []
    skipped = []
    with atomic_dir(out_root) as tmp:
        for record in manifest:
            ranges = frame_ranges(record.frames, record.fps, settings)
            if ranges is None:
                skipped.append(record.id)
                continue
            video = read_video(source_root / record.video)
            arrays = load_landmarks(source_root / record.landmarks, frames=record.frames)
            audio = load_audio(source_root / record.audio) if record.audio and settings.audio else None
            if len(video) != record.frames:
                raise AniPortraitError(f"clip {record.id}: {record.video} has {len(video)} frames, the manifest says "
                                       f"{record.frames}; re-run the preparation for this clip")
            for split, frames in ranges.items():
                records.append(_write_part(tmp, record, split, frames, video, audio, arrays, settings.crf))
        if not records:
            raise AniPortraitError(f"{source_root}: no clip is long enough to hold back frame ranges "
                                   f"(min_frames={settings.min_frames} per part)")
        Manifest(tmp, records).save()
    if skipped:
        log.warning("left out %d clips too short to split: %s", len(skipped), ", ".join(skipped))
    return Manifest.load(out_root)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    positional = [arg for arg in args if "=" not in arg]
    options = dict(arg.split("=", 1) for arg in args if "=" in arg)
    try:
        if len(positional) != 2:
            raise AniPortraitError("usage: python -m aniportrait.data.holdout SOURCE_ROOT OUT_ROOT [test_fraction=0.2] "
                                   "[val_fraction=0.0] [gap_seconds=0.5] [min_frames=16] [crf=18] [audio=true]")
        known = {"test_fraction": float, "val_fraction": float, "gap_seconds": float, "min_frames": int, "crf": int,
                 "audio": lambda value: {"true": True, "false": False}[value.lower()]}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise AniPortraitError(f"unknown options {unknown}; known: {sorted(known)}")
        try:
            values = {key: known[key](value) for key, value in options.items()}
        except (ValueError, KeyError) as error:
            raise AniPortraitError(f"bad option value ({error})") from error
        manifest = split_frame_ranges(positional[0], positional[1], HoldoutSettings(**values))
    except AniPortraitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = {split: len(manifest.split(split)) for split in ("train", "val", "test")}
    print(f"{positional[1]}: " + ", ".join(f"{count} {split}" for split, count in counts.items()) + " clips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
