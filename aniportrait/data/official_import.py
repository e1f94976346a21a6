"""Import a dataset prepared by the official AniPortrait scripts into the clip format.

``python -m aniportrait.data.official_import TRAINING_JSON OUTPUT_ROOT [key=value ...]``

The official ``scripts/preprocess_dataset.py`` stores each video as a folder of frame PNGs, one
``<frame>_lmks.npy`` (478 x 3 normalised landmarks) per frame with a face, next to ``_lmks3d``,
``_trans_mat`` and ``_bs`` (51 blendshapes, ``_neutral`` dropped), and a training JSON
``{video_name: {"video_clip_num": n, "clip_data_list": [{"frame_path_list": [...], "lmks_list": [...],
"frame_name_list": [...]}]}}`` (read by ``src/dataset/dataset_face.py``). Here:

* frames and landmark files are paired by frame name (the official JSON pairs them by sorted position,
  which shifts every later frame when one frame had no face); frames without landmarks get
  ``valid = False`` and interpolated values;
* ``mesh3d`` and ``trans_mat`` are recomputed from the landmarks with MediaPipe's geometry pipeline
  (``aniportrait.face.metric``; the official ``_lmks3d`` files agree to about 1e-5 cm), so only the
  ``_lmks.npy`` files are required; ``_bs.npy`` fills the blendshapes (``_neutral`` set to 0), or zeros
  and ``blendshapes_missing`` in the manifest when absent;
* non-square frames are cropped to the largest square around the face (landmarks remapped);
* audio is optional: ``audio_dir=DIR`` with ``<video_name>.{wav,mp3,m4a,flac,aac,mp4}``; a clip whose
  first frame is named by its frame number starts at that frame's time in the audio.

Paths in the JSON are used as written, else resolved against the JSON's folder. Finished clips are
skipped on a rerun. Splits are by identity, as in ``aniportrait.data.prepare``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aniportrait.audio.io import SAMPLE_RATE, load_audio, write_wav
from aniportrait.data.clip import MANIFEST_NAME, ClipRecord, Manifest, clip_dir, save_landmarks
from aniportrait.data.prepare.clips import CLIP_INFO, audio_status, landmark_jitter
from aniportrait.data.prepare.qc import write_report
from aniportrait.data.prepare.splits import assign_splits, identity_of
from aniportrait.data.video import VideoWriter
from aniportrait.errors import AniPortraitError
from aniportrait.face.landmarks import fill_invalid_frames, resolve_landmarker_model
from aniportrait.face.metric import GeometryMetadata, MetricConverter
from aniportrait.utils.atomic import atomic_dir

__all__ = ["ImportConfig", "import_official_dataset", "main"]

log = logging.getLogger(__name__)

_AUDIO_SUFFIXES = (".wav", ".mp3", ".m4a", ".flac", ".aac", ".mp4")


@dataclass
class ImportConfig:
    training_json: str
    output: str
    fps: float = 30.0  # frame rate the PNGs were extracted at (the JSON does not say)
    size: int = 512  # output crop side; frames are resized to it
    identity: str = "stem"  # identity rule applied to the video name (see aniportrait.data.prepare.splits)
    audio_dir: str | None = None
    landmarker_model: str | None = None  # only its geometry metadata is read (canonical face)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    crf: int = 18
    preset: str = "medium"
    gop_size: int | None = 16  # as prepare's: cheap random frame access in training (null: x264's 250)


def _resolve(path_text: str, base: Path) -> Path:
    path = Path(path_text)
    return path if path.is_file() or path.is_absolute() else base / path


def _frame_key(path: Path, suffix: str) -> str:
    name = path.name
    return name[: -len(suffix)] if name.endswith(suffix) else path.stem


def _square_crop(lmks: np.ndarray, valid: np.ndarray, height: int, width: int) -> tuple[int, int, int]:
    """(left, top, side): the largest square, centred on the median face centre, inside the frame."""
    side = min(height, width)
    centre = np.median(lmks[valid, :, :2].mean(axis=1), axis=0) * [width, height]
    left = int(np.clip(round(centre[0] - side / 2), 0, width - side))
    top = int(np.clip(round(centre[1] - side / 2), 0, height - side))
    return left, top, side


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _find_audio(audio_dir: Path | None, video_name: str) -> Path | None:
    if audio_dir is None:
        return None
    for suffix in _AUDIO_SUFFIXES:
        candidate = audio_dir / f"{video_name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


class _Unusable(Exception):
    """A clip of the JSON cannot be imported; the message is the QC reason."""


def _read_landmarks(frame_paths: list[Path], lmks_paths: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Per-frame landmarks and blendshapes, paired by frame name: (lmks, blendshapes, valid, bs_missing)."""
    count = len(frame_paths)
    lmks = np.zeros((count, 478, 3), dtype=np.float32)
    blendshapes = np.zeros((count, 52), dtype=np.float32)
    valid = np.zeros(count, dtype=bool)
    blendshapes_missing = False
    for index, path in enumerate(frame_paths):
        lmks_path = lmks_paths.get(path.stem)
        if lmks_path is None or not lmks_path.is_file():
            continue
        values = np.load(lmks_path).astype(np.float32)
        if values.shape != (478, 3):
            raise _Unusable(f"unreadable: {lmks_path} has shape {values.shape}, expected (478, 3)")
        lmks[index], valid[index] = values, True
        bs_path = lmks_path.with_name(lmks_path.name.replace("_lmks.npy", "_bs.npy"))
        if bs_path.is_file():
            scores = np.load(bs_path).astype(np.float32).reshape(-1)
            blendshapes[index, 52 - len(scores) :] = scores  # the official files drop _neutral (index 0)
        else:
            blendshapes_missing = True
    if not valid.any():
        raise _Unusable("no face: no frame has a _lmks.npy file")
    return lmks, blendshapes, valid, blendshapes_missing


def _clip_audio(config: ImportConfig, video_name: str, first_frame: Path, count: int) -> np.ndarray | None:
    """The clip's audio from ``audio_dir``: from the first frame's number (if it is one) for ``count`` frames."""
    audio_path = _find_audio(Path(config.audio_dir) if config.audio_dir else None, video_name)
    if audio_path is None:
        return None
    start_frame = int(first_frame.stem) if first_frame.stem.isdigit() else 0
    samples = load_audio(audio_path)
    offset = int(round(start_frame / config.fps * SAMPLE_RATE))
    audio = np.zeros(int(round(count / config.fps * SAMPLE_RATE)), dtype=np.float32)
    piece = samples[offset : offset + len(audio)]
    audio[: len(piece)] = piece
    return audio


def _import_clip(
    video_name: str, clip_index: int, clip: dict, base: Path, config: ImportConfig, converter: MetricConverter, root: Path
) -> dict:
    """Write one clip of the JSON (frames streamed, one at a time) and return its QC entry."""
    clip_id = f"{video_name}_{clip_index:03d}"
    finished = clip_dir(root, clip_id) / CLIP_INFO
    if finished.is_file():
        return json.loads(finished.read_text())
    frame_paths = [_resolve(p, base) for p in clip.get("frame_path_list", [])]
    lmks_paths = {_frame_key(p, "_lmks.npy"): p for p in (_resolve(q, base) for q in clip.get("lmks_list", []))}
    count = len(frame_paths)
    entry = {"id": clip_id, "source": video_name, "status": "rejected", "reason": None, "start_s": 0.0,
             "end_s": count / config.fps, "frames": count, "warnings": []}
    try:
        missing = [p for p in frame_paths if not p.is_file()]
        if not frame_paths or missing:
            raise _Unusable(f"unreadable: {len(missing)} of {count} frame files missing (e.g. {missing[0] if missing else '-'})")
        first = cv2.imread(str(frame_paths[0]), cv2.IMREAD_COLOR)
        if first is None:
            raise _Unusable(f"unreadable: cannot read frame {frame_paths[0]}")
        height, width = first.shape[:2]
        lmks, blendshapes, valid, blendshapes_missing = _read_landmarks(frame_paths, lmks_paths)
    except _Unusable as problem:
        entry["reason"] = str(problem)
        return entry

    left, top, side = _square_crop(lmks, valid, height, width)
    if (side, side) != (height, width):
        entry["warnings"].append(f"frames are {width}x{height}: cropped to the square at ({left}, {top}) of side {side}")
        lmks[:, :, 0] = (lmks[:, :, 0] * width - left) / side
        lmks[:, :, 1] = (lmks[:, :, 1] * height - top) / side
        lmks[:, :, 2] = lmks[:, :, 2] * width / side  # MediaPipe's z is in units of the image width
    mesh3d = np.zeros((count, 468, 3), dtype=np.float32)
    trans_mat = np.zeros((count, 4, 4), dtype=np.float32)
    for index in np.flatnonzero(valid):
        _, pose, mesh = converter.convert(lmks[index], (side, side))
        mesh3d[index], trans_mat[index] = mesh, pose
    arrays = fill_invalid_frames({"lmks": lmks, "mesh3d": mesh3d, "trans_mat": trans_mat, "blendshapes": blendshapes}, valid)
    arrays["valid"] = valid
    audio = _clip_audio(config, video_name, frame_paths[0], count)
    if audio is None and config.audio_dir:
        entry["warnings"].append(f"no audio file for {video_name} in {config.audio_dir}: video-only clip")

    relative = Path("clips") / clip_id
    interpolation = cv2.INTER_AREA if side > config.size else cv2.INTER_LINEAR
    try:
        with atomic_dir(clip_dir(root, clip_id), replace=True) as folder:  # a rerun redoes an unfinished source
            with VideoWriter(folder / "video.mp4", config.fps, crf=config.crf, preset=config.preset,
                             gop_size=config.gop_size) as writer:
                writer.set_audio(audio)
                for path in frame_paths:
                    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                    if image is None or image.shape[:2] != (height, width):
                        raise _Unusable(f"unreadable: frame {path} is unreadable or not {width}x{height} like the first")
                    square = cv2.cvtColor(image[top : top + side, left : left + side], cv2.COLOR_BGR2RGB)
                    writer.write(cv2.resize(square, (config.size, config.size), interpolation=interpolation))
            if audio is not None:
                write_wav(folder / "audio.wav", audio)
            save_landmarks(folder / "landmarks.npz", arrays)
            entry.update(
                status="kept",
                detection_rate=round(float(valid.mean()), 4),
                jitter_px=_rounded(landmark_jitter(arrays["lmks"], valid, config.size)),
                face_size_px=None,
                audio=audio_status(audio),
            )
            entry["record"] = {
                "id": clip_id, "fps": config.fps, "frames": count, "width": config.size, "height": config.size,
                "duration_s": round(count / config.fps, 6), "source": video_name,
                "video": str(relative / "video.mp4"), "landmarks": str(relative / "landmarks.npz"),
                "audio": None if audio is None else str(relative / "audio.wav"),
                "detection_rate": entry["detection_rate"], "blendshapes_missing": blendshapes_missing,
            }
            (folder / CLIP_INFO).write_text(json.dumps(entry, indent=1))
    except _Unusable as problem:
        entry.update(status="rejected", reason=str(problem))
    return entry


def import_official_dataset(config: ImportConfig) -> Path:
    """Import every clip of the training JSON; returns the manifest path."""
    json_path = Path(config.training_json)
    if not json_path.is_file():
        raise AniPortraitError(f"training JSON not found: {json_path}; give the file preprocess_dataset.py wrote (--training_json)")
    try:
        table = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise AniPortraitError(f"{json_path} is not valid JSON ({error})") from error
    if not isinstance(table, dict) or not all(isinstance(v, dict) and "clip_data_list" in v for v in table.values()):
        raise AniPortraitError(
            f"{json_path} is not an official AniPortrait training JSON ({{video: {{'clip_data_list': [...]}}}})"
        )
    root = Path(config.output)
    root.mkdir(parents=True, exist_ok=True)
    converter = MetricConverter(GeometryMetadata.from_task_file(resolve_landmarker_model(config.landmarker_model)))
    sources, clips = [], []
    for video_name in sorted(table):
        entries = [
            _import_clip(video_name, index, clip, json_path.parent, config, converter, root)
            for index, clip in enumerate(table[video_name]["clip_data_list"])
        ]
        clips += entries
        kept = any(entry["status"] == "kept" for entry in entries)
        sources.append({"source": video_name, "status": "done" if kept else "rejected",
                        "reason": None if kept else "no usable clip", "warnings": []})
    kept = sorted((entry for entry in clips if entry["status"] == "kept"), key=lambda entry: entry["id"])
    identities = {entry["id"]: identity_of(entry["source"], config.identity) for entry in kept}
    splits = assign_splits(identities.values(), config.val_fraction, config.test_fraction, config.split_seed)
    records = [
        ClipRecord.from_dict({**entry["record"], "identity": identities[entry["id"]], "split": splits[identities[entry["id"]]]},
                             str(root / MANIFEST_NAME))
        for entry in kept
    ]
    manifest = Manifest(root, records).save()
    write_report(root, asdict(config), sources, clips)
    return manifest


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    positional = [a for a in arguments if "=" not in a]
    overrides = [a for a in arguments if "=" in a]
    if len(positional) != 2 or any(a in ("-h", "--help") for a in arguments):
        print(__doc__.strip())
        return 0 if any(a in ("-h", "--help") for a in arguments) else 2
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(ImportConfig(training_json=positional[0], output=positional[1])),
            OmegaConf.from_dotlist(overrides),
        )
        config = OmegaConf.to_object(merged)
        manifest = import_official_dataset(config)
    except OmegaConfBaseException as error:
        print(f"error: bad option: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    except AniPortraitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"manifest: {manifest} ({len(Manifest.load(manifest.parent))} clips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
