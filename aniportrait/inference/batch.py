"""mode=batch: a CSV / JSONL manifest of jobs of the other modes; every row is checked before anything runs."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from aniportrait.errors import AniPortraitError
from aniportrait.inference.options import AnimationOptions, AnimationResult
from aniportrait.utils.outputs import Overwrite, check_outputs

__all__ = ["BatchJobResult", "JOB_MODES", "normalise_job", "read_manifest", "batch_summary", "job_outputs",
           "check_batch_outputs"]


# manifest column / job key -> the AniPortrait method argument it names
_JOB_ALIASES = {"image": "image_path", "reference": "image_path", "audio": "audio_path", "video": "video_path",
                "landmarks": "landmarks_path", "pose": "landmarks_path", "output": "output_path"}
_JOB_PATHS = ("image_path", "audio_path", "video_path", "landmarks_path", "output_path", "pose_template")
JOB_MODES = ("audio", "video", "pose", "landmarks")


@dataclass(frozen=True)
class BatchJobResult:
    """One job of a batch: ``status`` is done, skipped (its output existed) or failed (``error`` says why)."""

    index: int
    output: Path | None
    status: str
    error: str | None = None
    result: AnimationResult | None = None


def _scalar(value: Any) -> Any:
    """Manifest cells are text: "" -> None, "25" -> 25, "true" -> True; other text stays text."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    parsed = yaml.safe_load(value)
    return parsed if isinstance(parsed, (int, float, bool)) or parsed is None else value


def normalise_job(job: Mapping[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """A job as method arguments: aliases mapped (``image`` -> ``image_path``, ...), text cells parsed, relative
    paths taken from ``base_dir``, ``mode`` inferred from the driver given (audio, video or pose)."""
    option_names = {field.name for field in fields(AnimationOptions)}
    known = option_names | set(_JOB_PATHS) | {"mode"}
    normalised: dict[str, Any] = {}
    for key, value in job.items():
        key = _JOB_ALIASES.get(str(key).strip(), str(key).strip())
        if key not in known:
            raise AniPortraitError(f"unknown job field {key!r}; use image, audio | video | landmarks, output, mode and "
                                   f"options ({', '.join(sorted(option_names))})")
        value = _scalar(value)
        if value is None:
            continue
        if key in _JOB_PATHS:
            path = Path(os.path.expanduser(str(value)))
            value = path if path.is_absolute() or base_dir is None else base_dir / path
        normalised[key] = value
    drivers = [key for key in ("audio_path", "video_path", "landmarks_path") if key in normalised]
    mode = normalised.setdefault("mode", {"audio_path": "audio", "video_path": "video",
                                          "landmarks_path": "pose"}.get(drivers[0]) if len(drivers) == 1 else None)
    if mode not in JOB_MODES:
        raise AniPortraitError(f"job mode {mode!r} unclear: give exactly one of audio, video, landmarks, or mode= one "
                               f"of {', '.join(JOB_MODES)}")
    for required in ("image_path", "output_path"):
        if required not in normalised:
            raise AniPortraitError(f"job lacks {required.removesuffix('_path')} (the {required} argument)")
    AnimationOptions.from_kwargs(**{key: value for key, value in normalised.items() if key in option_names})
    return normalised


def job_outputs(job: Mapping[str, Any], label: str = "output") -> dict[str, Path]:
    """The files a normalised job writes: its output, and mode=landmarks' .npz beside it."""
    output = Path(job["output_path"])
    files = {label: output}
    if job.get("mode") == "landmarks":
        files[f"{label} (its .npz)"] = output.with_suffix(".npz")
    return files


def check_batch_outputs(jobs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> None:
    """Before any job runs: every job writes files of its own, none of them one of its inputs (``labels`` name the
    jobs in the messages: "line 3", "job 2"). Whether an existing output is skipped or replaced is each job's."""
    everything: dict[str, Path] = {}
    for label, job in zip(labels, jobs):
        outputs = job_outputs(job, f"{label}: output")
        inputs = {f"{label}: {key.removesuffix('_path')}": job.get(key) for key in _JOB_PATHS if key != "output_path"}
        check_outputs(outputs, inputs, Overwrite(True, "overwrite=true"))
        everything.update(outputs)
    check_outputs(everything, overwrite=Overwrite(True, "overwrite=true"))


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Jobs of a batch: a CSV with a header row or JSON lines, one job per row; relative paths are relative to the
    manifest's folder. Every row is checked before anything runs."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise AniPortraitError(f"batch manifest not found: {path}; give a .csv or .jsonl file (manifest=PATH)")
    rows: list[tuple[int, Mapping[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise AniPortraitError(f"{path} line {number}: not JSON ({error.msg})") from error
                if not isinstance(row, dict):
                    raise AniPortraitError(f"{path} line {number}: expected a JSON object per line")
                rows.append((number, row))
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            rows = [(number, row) for number, row in enumerate(csv.DictReader(handle), 2)]
    else:
        raise AniPortraitError(f"batch manifest {path} must be .csv (with a header row) or .jsonl")
    jobs = []
    for number, row in rows:
        try:
            jobs.append(normalise_job(row, path.parent))
        except AniPortraitError as error:
            raise AniPortraitError(f"{path} line {number}: {error}") from error
    if not jobs:
        raise AniPortraitError(f"batch manifest {path} holds no jobs")
    check_batch_outputs(jobs, [f"{path} line {number}" for number, _ in rows])
    return jobs


def batch_summary(results: Sequence[BatchJobResult]) -> str:
    counts = {status: sum(result.status == status for result in results) for status in ("done", "skipped", "failed")}
    lines = [f"batch: {len(results)} jobs: {counts['done']} done, {counts['skipped']} skipped (finished before), "
             f"{counts['failed']} failed"]
    lines += [f"  job {result.index}: {result.output}: {result.error}" for result in results if result.status == "failed"]
    return "\n".join(lines)
