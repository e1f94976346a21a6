"""The preparation run: find the source videos, process each (in worker processes), then write the
manifest with identity splits and the QC report.

Resuming: a finished clip is a folder with ``clip.json`` (written last, inside an atomically renamed
folder); a finished source has a marker in ``<root>/.prepare/sources/`` holding its QC entries. A rerun
skips finished sources whose file is unchanged, and re-tracks unfinished ones while skipping their
finished clips, so an interrupted run resumes and nothing prepared is done twice or lost.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

from aniportrait.audio.io import load_audio
from aniportrait.data.clip import MANIFEST_NAME, ClipRecord, Manifest, clip_dir
from aniportrait.data.prepare.clips import CLIP_INFO, ClipRejected, write_clip
from aniportrait.data.prepare.config import PrepareConfig, processing_values
from aniportrait.data.prepare.qc import write_report
from aniportrait.data.prepare.source import DecodeError, open_source, output_timeline
from aniportrait.data.prepare.splits import assign_splits, identity_of, read_split_file
from aniportrait.data.prepare.track import Segment, find_small_face, fit_crop, split_segments, track_faces
from aniportrait.errors import AniPortraitError
from aniportrait.utils.atomic import atomic_path

__all__ = ["prepare_dataset", "process_source", "find_sources", "PrepareResult", "VIDEO_SUFFIXES"]

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp")
STATE_DIR = ".prepare"


@dataclass
class PrepareResult:
    root: Path
    manifest: Path
    report_json: Path
    report_markdown: Path
    summary: str
    sources: int
    sources_skipped: int  # finished in an earlier run
    clips_kept: int
    clips_rejected: int


def _safe_name(source_key: str) -> str:
    """A folder-safe name for a source: its relative path without suffix, ``/`` as ``__``."""
    stem = str(PurePosixPath(source_key).with_suffix(""))
    return re.sub(r"[^A-Za-z0-9._+-]", "_", stem.replace("/", "__"))


def find_sources(input_path: Path, exclude: Path | None = None) -> list[tuple[Path, str]]:
    """(path, key) of every video under ``input_path`` (or the file itself); key = relative posix path."""
    if input_path.is_file():
        return [(input_path, input_path.name)]
    if not input_path.is_dir():
        raise AniPortraitError(f"input not found: {input_path}; give input=DIR (a folder of videos) or one video file")
    found = []
    for path in sorted(input_path.rglob("*")):
        relative = path.relative_to(input_path)
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES and not any(p.startswith(".") for p in relative.parts):
            found.append((path, relative.as_posix()))
    if not found:
        raise AniPortraitError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {input_path}")
    return found


def _marker_path(root: Path, key: str) -> Path:
    return root / STATE_DIR / "sources" / f"{_safe_name(key)}.json"


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _finished(root: Path, path: Path, key: str) -> dict | None:
    """The stored result of a source finished earlier, if its file and its clips are unchanged."""
    marker = _marker_path(root, key)
    if not marker.is_file():
        return None
    try:
        stored = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    if stored.get("stamp") != _file_stamp(path):
        return None
    for clip in stored["clips"]:
        if clip["status"] == "kept" and not (clip_dir(root, clip["id"]) / CLIP_INFO).is_file():
            return None
    return stored


def _pass_one_entry(segment: Segment, key: str, clip_id: str, found_rate: float, fps: float, audio: str) -> dict:
    return {
        "id": clip_id, "source": key, "status": "rejected", "reason": segment.reason,
        "start_s": round(segment.start / fps, 3), "end_s": round(segment.end / fps, 3), "frames": segment.frames,
        "detection_rate": round(found_rate, 4), "jitter_px": None, "face_size_px": round(segment.face_size, 1) or None,
        "audio": audio, "warnings": list(segment.warnings),
    }


def process_source(path: Path, key: str, config: PrepareConfig, root: Path) -> dict:
    """Turn one source video into clips; returns {"source": QC entry, "clips": [QC entries]}.

    Input problems end up as a rejection reason in the QC entries, never as an exception.
    """
    report: dict = {"source": key, "status": "done", "reason": None, "warnings": []}
    clips: list[dict] = []
    warnings = report["warnings"]

    def finish(status: str | None = None, reason: str | None = None) -> dict:
        if status:
            report.update(status=status, reason=reason)
        elif not any(clip["status"] == "kept" for clip in clips):
            reasons = Counter((clip["reason"] or "").split(":")[0] for clip in clips)
            report.update(status="rejected", reason=f"no usable clip ({', '.join(reasons)})")
        result = {"source": report, "clips": clips}
        with atomic_path(_marker_path(root, key)) as tmp:
            tmp.write_text(json.dumps({"stamp": _file_stamp(path), **result}, indent=1))
        return result

    try:
        source, reader = open_source(path, key)
    except AniPortraitError as error:
        return finish("rejected", f"unreadable: {error}")
    report.update(fps=round(source.fps, 3), width=source.width, height=source.height, rotation=source.rotation,
                  variable_frame_rate=source.variable_frame_rate, has_audio=source.has_audio,
                  duration_s=round(source.duration_s, 3))
    if source.variable_frame_rate:
        warnings.append(f"variable frame rate (average {source.fps:.2f} fps): resampled to {config.fps:g} fps by frame time")
    if source.rotation:
        warnings.append(f"rotation metadata ({source.rotation} deg): frames used upright")

    timeline = output_timeline(source, config.fps, config.max_source_seconds)  # (N,) source frame per output frame
    if len(timeline) == 0:
        return finish("rejected", "too short: no output frame")
    track = track_faces(reader, source, timeline, config)
    if track.decode_error:
        warnings.append(
            f"decoding failed at {track.decoded / config.fps:.2f} s ({track.decode_error}): the file is truncated or "
            "damaged; only the frames before it are used"
        )
        timeline = timeline[: track.decoded]
        if track.decoded == 0:
            return finish("rejected", "unreadable: no frame could be decoded")
    if not track.found.any() and config.small_face_search:
        region = find_small_face(reader, timeline, config)
        if region is not None:
            warnings.append(f"small face: found by a tiled search; tracked inside the region {list(region)}")
            track = track_faces(reader, source, timeline, config, roi=region)
    if not track.found.any():
        return finish("rejected", "no face found in any frame")

    audio = None
    if source.has_audio:
        try:
            audio = load_audio(path)
        except AniPortraitError as error:
            warnings.append(f"audio track unreadable ({error}); clips are video-only")
    else:
        warnings.append("no audio track: video-only clips")
    audio_kind = "none" if audio is None else "present"

    for number, segment in enumerate(split_segments(track, config)):
        clip_id = f"{_safe_name(key)}_{number:03d}"
        if segment.reason is None:
            fit_crop(track, segment, source, config)
        if segment.reason is not None:
            found_rate = float(track.found[segment.start : segment.end].mean())
            clips.append(_pass_one_entry(segment, key, clip_id, found_rate, config.fps, audio_kind))
            continue
        finished = clip_dir(root, clip_id) / CLIP_INFO
        if finished.is_file():
            clips.append(json.loads(finished.read_text()))
            continue
        try:
            clips.append(write_clip(reader, source, timeline, segment, audio, clip_id, root, config))
        except ClipRejected as rejection:
            clips.append(rejection.qc)
        except DecodeError as error:
            segment.reason = f"unreadable: decoding failed inside the clip ({error})"
            clips.append(_pass_one_entry(segment, key, clip_id, 0.0, config.fps, audio_kind))
    return finish()


def _process_task(task: tuple[str, str, PrepareConfig, str]) -> dict:
    """Worker entry point: never raises for one bad video, so the run goes on."""
    path, key, config, root = task
    try:
        return process_source(Path(path), key, config, Path(root))
    except Exception as error:  # noqa: BLE001 - one broken video must not stop a dataset run
        log.exception("preparing %s failed", key)
        reason = f"error: {type(error).__name__}: {error} (not marked finished; a rerun retries this video)"
        return {"source": {"source": key, "status": "error", "reason": reason, "warnings": []}, "clips": []}


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


def _run_in_workers(pending: list[tuple], workers: int, progress) -> dict[str, dict]:
    """Process sources in spawned worker processes; a worker that dies (out of memory, a native crash)
    stops the run with a clear error instead of hanging, and everything finished so far is kept."""
    results = {}
    context = multiprocessing.get_context("spawn")  # MediaPipe and decord are not fork-safe
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as executor:
        futures = [executor.submit(_process_task, task) for task in pending]
        try:
            for future in as_completed(futures):
                outcome = future.result()
                results[outcome["source"]["source"]] = outcome
                progress.update()
        except BrokenProcessPool as error:
            raise AniPortraitError(
                "a prepare worker process died (out of memory, or a crash inside a native library); finished videos "
                "are kept: rerun to resume, with fewer workers, or workers=1 to see which video it was"
            ) from error
        finally:
            for future in futures:
                future.cancel()
    return results


class _RunLock:
    """``<root>/.prepare/lock`` holds the pid of the run writing to the root."""

    def __init__(self, root: Path):
        self.path = root / STATE_DIR / "lock"

    def __enter__(self) -> _RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError):
                    self.path.unlink(missing_ok=True)  # left by a run that died
                    continue
                except PermissionError:
                    pass
                raise AniPortraitError(
                    f"another prepare run (pid {pid}) is writing to {self.path.parent.parent}; wait for it, "
                    f"or delete {self.path} if no such run exists"
                ) from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(str(os.getpid()))
            return self
        raise AniPortraitError(f"cannot take the lock {self.path}; delete it and retry")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _check_state(root: Path, config: PrepareConfig, input_path: Path) -> None:
    """Refuse to mix clips made with different settings (or from another input) in one root."""
    state = root / STATE_DIR / "config.json"
    wanted = {"input": str(input_path.resolve()), "processing": processing_values(config)}
    if state.is_file():
        stored = json.loads(state.read_text())
        changed = [key for key in wanted["processing"] if stored["processing"].get(key) != wanted["processing"][key]]
        if stored["input"] != wanted["input"]:
            changed.insert(0, "input")
        if changed:
            previous = {"input": stored["input"], **stored["processing"]}
            before = ", ".join(f"{key}={previous.get(key)}" for key in changed)
            raise AniPortraitError(
                f"{root} was prepared with {before}; this run differs in {', '.join(changed)}. "
                "Use a new output folder, the same settings, or overwrite=true to redo everything"
            )
    with atomic_path(state) as tmp:
        tmp.write_text(json.dumps(wanted, indent=1))


def _remove_prepared(root: Path, keep: Path) -> None:
    """``overwrite=true``: delete the clips, the manifest, the report and the run state (but ``keep``)."""
    for name in ("clips", "qc"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for path in (root / STATE_DIR).iterdir():
        if path != keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _clean_partial(root: Path) -> None:
    """Remove temporary clip folders left by a killed run (atomic_dir names them ``.<id>.*.tmp``)."""
    clips = root / "clips"
    if clips.is_dir():
        for leftover in clips.glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in clips.glob(".*.old"):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_manifest(root: Path, config: PrepareConfig, clips: list[dict]) -> Path:
    kept = sorted((clip for clip in clips if clip["status"] == "kept"), key=lambda clip: clip["id"])
    identities = {clip["id"]: identity_of(clip["source"], config.identity) for clip in kept}
    fixed = read_split_file(config.split_file) if config.split_file else None
    splits = assign_splits(identities.values(), config.val_fraction, config.test_fraction, config.split_seed, fixed)
    records = []
    for clip in kept:
        data = dict(clip["record"])
        data["identity"] = identities[clip["id"]]
        data["split"] = splits[data["identity"]]
        records.append(ClipRecord.from_dict(data, str(root / MANIFEST_NAME)))
    return Manifest(root, records).save()


def prepare_dataset(config: PrepareConfig) -> PrepareResult:
    """Run the whole preparation described by ``config``; see the module docstring."""
    from tqdm import tqdm

    from aniportrait.face.landmarks import resolve_landmarker_model

    input_path = Path(config.input).expanduser()
    root = Path(config.output).expanduser()
    sources = find_sources(input_path, exclude=root.resolve())
    # Resolve (and if need be download) the model once, here, rather than in every worker.
    config = replace(config, landmarker_model=str(resolve_landmarker_model(config.landmarker_model)))
    root.mkdir(parents=True, exist_ok=True)
    with _RunLock(root) as lock:
        if config.overwrite:
            _remove_prepared(root, keep=lock.path)
        _check_state(root, config, input_path)
        _clean_partial(root)
        results: dict[str, dict] = {}
        pending = []
        for path, key in sources:
            stored = _finished(root, path, key)
            if stored is not None:
                results[key] = stored
            else:
                pending.append((str(path), key, config, str(root)))
        skipped = len(results)
        progress = tqdm(total=len(sources), initial=skipped, desc="prepare", unit="video", disable=not config.progress)
        try:
            if config.workers == 1 or len(pending) <= 1:
                for outcome in map(_process_task, pending):
                    results[outcome["source"]["source"]] = outcome
                    progress.update()
            else:
                results.update(_run_in_workers(pending, min(config.workers, len(pending)), progress))
        finally:
            progress.close()
        source_entries = [results[key]["source"] for _, key in sources]
        clip_entries = [clip for _, key in sources for clip in results[key]["clips"]]
        manifest = _write_manifest(root, config, clip_entries)
        json_path, markdown_path, summary = write_report(root, asdict(config), source_entries, clip_entries)
    kept = sum(clip["status"] == "kept" for clip in clip_entries)
    return PrepareResult(root, manifest, json_path, markdown_path, summary, len(sources), skipped, kept,
                         len(clip_entries) - kept)
