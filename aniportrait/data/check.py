"""``python -m aniportrait.data.check ROOT``: list every bad clip of a clip-format dataset and why.

Checks per clip: the manifest entry (fields, split), the files exist, landmarks.npz has the format's
arrays with the right shapes and dtypes and as many frames as the manifest says, finite values where a
face was found, the video decodes with that frame count, size and fps, and the audio (when present) is
16 kHz mono and as long as the video within one frame. Exit status 1 when any clip is bad.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aniportrait.data.clip import ClipRecord, Manifest, load_landmarks
from aniportrait.errors import AniPortraitError

__all__ = ["check_clip", "check_dataset"]


def check_clip(root: Path, record: ClipRecord, decode_video: bool = True) -> list[str]:
    """Problems with one clip (empty when it is fine)."""
    import soundfile

    from aniportrait.data.video import probe_video

    problems = []
    landmarks_path = root / record.landmarks
    try:
        arrays = load_landmarks(landmarks_path, frames=record.frames)
        valid = arrays["valid"]
        for key in ("lmks", "mesh3d", "trans_mat"):
            if not np.isfinite(arrays[key][valid]).all():
                problems.append(f"{key} has NaN/inf in frames marked valid")
    except AniPortraitError as error:
        problems.append(str(error))
    video_path = root / record.video
    if not video_path.is_file():
        problems.append(f"video missing: {video_path}")
    elif decode_video:
        try:
            info = probe_video(video_path)
            if info.frames != record.frames:
                problems.append(f"video has {info.frames} frames, manifest says {record.frames}")
            if (info.width, info.height) != (record.width, record.height):
                problems.append(f"video is {info.width}x{info.height}, manifest says {record.width}x{record.height}")
            if abs(info.fps - record.fps) > 0.01:
                problems.append(f"video fps {info.fps:g}, manifest says {record.fps:g}")
        except AniPortraitError as error:
            problems.append(str(error))
    if record.audio is not None:
        audio_path = root / record.audio
        if not audio_path.is_file():
            problems.append(f"audio missing: {audio_path}")
        else:
            try:
                info = soundfile.info(str(audio_path))
                if info.samplerate != 16000 or info.channels != 1:
                    problems.append(f"audio is {info.samplerate} Hz x {info.channels} channels; the format is 16 kHz mono")
                video_seconds = record.frames / record.fps
                if abs(info.duration - video_seconds) > 1.0 / record.fps:
                    problems.append(f"audio lasts {info.duration:.3f} s, video {video_seconds:.3f} s (more than one frame apart)")
            except RuntimeError as error:
                problems.append(f"audio unreadable: {error}")
    return problems


def check_dataset(root: str | Path, decode_video: bool = True, progress: bool = True) -> dict[str, list[str]]:
    """{clip id: problems} for every bad clip; the manifest itself must load."""
    root = Path(root)
    manifest = Manifest.load(root)
    bad = {}
    for record in tqdm(manifest, desc="checking clips", unit="clip", disable=not progress):
        problems = check_clip(root, record, decode_video)
        if problems:
            bad[record.id] = problems
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aniportrait.data.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="dataset root (holds manifest.jsonl)")
    parser.add_argument("--no-video", action="store_true", help="skip decoding the videos (faster)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        bad = check_dataset(args.root, decode_video=not args.no_video, progress=not args.json)
        total = len(Manifest.load(args.root))
    except AniPortraitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"clips": total, "bad": bad}, indent=2))
    else:
        for clip_id, problems in bad.items():
            for problem in problems:
                print(f"{clip_id}: {problem}")
        print(f"{total - len(bad)} of {total} clips are fine; {len(bad)} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
