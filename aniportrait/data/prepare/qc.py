"""The quality-control report: every source and every candidate clip, kept or rejected, with the reason.

``qc/report.json`` holds all entries; ``qc/report.md`` has the summary and one table row per clip; the
summary table is also printed at the end of a run.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from aniportrait.utils.atomic import atomic_path

__all__ = ["write_report", "summary_table"]


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def summary_table(sources: list[dict], clips: list[dict]) -> str:
    """Markdown: totals, then the reasons sources and clips were rejected."""
    kept = [clip for clip in clips if clip["status"] == "kept"]
    hours = sum(clip["frames"] / clip["record"]["fps"] for clip in kept if "record" in clip) / 3600
    detection = [clip["detection_rate"] for clip in kept if clip.get("detection_rate") is not None]
    jitter = [clip["jitter_px"] for clip in kept if clip.get("jitter_px") is not None]
    audio = Counter(clip["audio"] for clip in kept)
    lines = [
        "| what | value |",
        "|---|---|",
        f"| source videos | {len(sources)} ({sum(s['status'] == 'done' for s in sources)} with clips) |",
        f"| clips kept | {len(kept)} ({hours:.3f} h) |",
        f"| clips rejected | {len(clips) - len(kept)} |",
        f"| mean detection rate (kept) | {_fmt(sum(detection) / len(detection) if detection else None, '.4f')} |",
        f"| mean landmark jitter, px (kept) | {_fmt(sum(jitter) / len(jitter) if jitter else None, '.3f')} |",
        f"| audio (kept) | {', '.join(f'{k}: {v}' for k, v in sorted(audio.items())) or '-'} |",
    ]
    reasons = Counter(_reason_kind(s["reason"]) for s in sources if s["status"] != "done")
    reasons.update(_reason_kind(c["reason"]) for c in clips if c["status"] != "kept")
    if reasons:
        lines += ["", "| rejected because | count |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in reasons.most_common()]
    return "\n".join(lines)


def _reason_kind(reason: str | None) -> str:
    """The reason without its numbers, so that the same cause is counted once."""
    return (reason or "unknown").split(":")[0]


def _clip_rows(clips: list[dict]) -> list[str]:
    rows = [
        "| clip | status | s | detection | jitter px | face px (crop px) | audio | reason / warnings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clip in sorted(clips, key=lambda c: c["id"]):
        notes = "; ".join(filter(None, [clip.get("reason"), *clip.get("warnings", [])]))
        audio = clip.get("audio", "-")
        if clip.get("audio_level_dbfs") is not None:
            audio += f" ({clip['audio_level_dbfs']:.0f} dBFS)"
        rows.append(
            f"| {clip['id']} | {clip['status']} | {clip['start_s']:.1f}-{clip['end_s']:.1f} | "
            f"{_fmt(clip.get('detection_rate'), '.3f')} | {_fmt(clip.get('jitter_px'), '.2f')} | "
            f"{_fmt(clip.get('face_size_px'), '.0f')} ({_fmt(clip.get('face_size_crop_px'), '.0f')}) | "
            f"{audio} | {notes or '-'} |"
        )
    return rows


def _source_rows(sources: list[dict]) -> list[str]:
    rows = ["| source | status | fps | size | rotation | audio | reason / warnings |", "|---|---|---|---|---|---|---|"]
    for source in sorted(sources, key=lambda s: s["source"]):
        notes = "; ".join(filter(None, [source.get("reason"), *source.get("warnings", [])]))
        size = f"{source['width']}x{source['height']}" if source.get("width") else "-"
        fps = _fmt(source.get("fps"), ".2f") + (" (variable)" if source.get("variable_frame_rate") else "")
        rows.append(
            f"| {source['source']} | {source['status']} | {fps} | {size} | {_fmt(source.get('rotation'))} | "
            f"{_fmt(source.get('has_audio'))} | {notes or '-'} |"
        )
    return rows


def write_report(root: Path, config: dict, sources: list[dict], clips: list[dict]) -> tuple[Path, Path, str]:
    """Write qc/report.json and qc/report.md; returns their paths and the summary table."""
    summary = summary_table(sources, clips)
    json_path = root / "qc" / "report.json"
    markdown_path = root / "qc" / "report.md"
    public_clips = [{key: value for key, value in clip.items() if key != "record"} for clip in clips]
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps({"config": config, "summary_markdown": summary, "sources": sources, "clips": public_clips}, indent=1))
    markdown = [f"# Dataset preparation report: {root}", "", "## Summary", "", summary, "", "## Sources", "",
                *_source_rows(sources), "", "## Clips", "", *_clip_rows(clips), ""]
    with atomic_path(markdown_path) as tmp:
        tmp.write_text("\n".join(markdown))
    return json_path, markdown_path, summary
