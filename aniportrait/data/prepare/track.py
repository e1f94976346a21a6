"""Pass 1 over a source video: where the face is in every output frame, where the scenes cut, and from
that the clips (frame ranges) and one fixed square crop per clip.

Tracking runs MediaPipe's FaceLandmarker in VIDEO mode on frames downscaled to ``analysis_max_side``;
with several faces the largest is taken first and then followed (nearest to the previous frame). When no
face is found at all, sampled frames are searched tile by tile for a small face (the short-range face
detector misses faces below about a tenth of the frame); a hit restricts tracking to a region around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from aniportrait.data.prepare.config import PrepareConfig
from aniportrait.data.prepare.source import DecodeError, SourceVideo, chunk_frames, read_frames
from aniportrait.face.geometry import smooth_pose_sequence
from aniportrait.face.landmarks import FaceLandmarker, find_face_in_tiles

__all__ = ["FaceTrack", "Segment", "track_faces", "find_small_face", "split_segments", "fit_crop"]

_SMALL_FACE_SAMPLES = 5


@dataclass
class FaceTrack:
    """Per output frame of one source."""

    boxes: np.ndarray  # (N, 4) float64 x0, y0, x1, y1 in upright source pixels; NaN where no face
    num_faces: np.ndarray  # (N,) int
    cut_scores: np.ndarray  # (N,) histogram distance to the previous frame (0 for the first)
    decoded: int  # output frames actually decoded; < N when the file is damaged part-way
    decode_error: str | None = None

    @property
    def found(self) -> np.ndarray:
        return np.isfinite(self.boxes[:, 0])

    @property
    def sizes(self) -> np.ndarray:
        """(N,) face size: the larger side of the landmark box (NaN where no face)."""
        return np.maximum(self.boxes[:, 2] - self.boxes[:, 0], self.boxes[:, 3] - self.boxes[:, 1])


@dataclass
class Segment:
    """A candidate clip: output frames [start, end) of one source."""

    start: int
    end: int
    reason: str | None = None  # why it is rejected (None: kept so far)
    crop_box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (may reach outside the frame)
    face_size: float = 0.0  # median, source pixels
    warnings: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return self.end - self.start


def _analysis_frame(frame: np.ndarray, roi: tuple[int, int, int, int] | None, max_side: int) -> tuple[np.ndarray, float, int, int]:
    """Crop to the region of interest and downscale; returns (frame, scale, x offset, y offset)."""
    x_offset = y_offset = 0
    if roi is not None:
        x0, y0, x1, y1 = roi
        frame = frame[y0:y1, x0:x1]
        x_offset, y_offset = x0, y0
    height, width = frame.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        frame = cv2.resize(frame, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(frame), scale, x_offset, y_offset


def _colour_histogram(frame: np.ndarray) -> np.ndarray:
    thumbnail = cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    histogram = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
    return cv2.normalize(histogram, histogram).astype(np.float32)


def track_faces(
    reader,
    source: SourceVideo,
    timeline: np.ndarray,
    config: PrepareConfig,
    roi: tuple[int, int, int, int] | None = None,
) -> FaceTrack:
    """Face boxes, face counts and scene-cut scores for every output frame (``timeline``: source indices)."""
    count = len(timeline)
    boxes = np.full((count, 4), np.nan)
    num_faces = np.zeros(count, dtype=np.int64)
    cut_scores = np.zeros(count)
    previous_histogram = None
    decoded, decode_error = count, None
    with FaceLandmarker(config.landmarker_model, mode="video", max_faces=config.max_faces) as landmarker:
        step = chunk_frames(source)
        for chunk_start in range(0, count, step):
            indices = timeline[chunk_start : chunk_start + step]
            try:
                frames = read_frames(reader, indices)
            except DecodeError as error:
                decoded, decode_error = chunk_start, str(error)
                break
            for offset, frame in enumerate(frames):
                index = chunk_start + offset
                small, scale, x_offset, y_offset = _analysis_frame(frame, roi, config.analysis_max_side)
                histogram = _colour_histogram(small)
                if previous_histogram is not None:
                    cut_scores[index] = cv2.compareHist(previous_histogram, histogram, cv2.HISTCMP_BHATTACHARYYA)
                previous_histogram = histogram
                face = landmarker.detect(small, round(index * 1000.0 / config.fps))
                if face is not None:
                    x0, y0, x1, y1 = face.bbox(small.shape[:2])
                    boxes[index] = (x0 / scale + x_offset, y0 / scale + y_offset, x1 / scale + x_offset, y1 / scale + y_offset)
                    num_faces[index] = face.num_faces
    return FaceTrack(boxes[:decoded], num_faces[:decoded], cut_scores[:decoded], decoded, decode_error)


def find_small_face(reader, timeline: np.ndarray, config: PrepareConfig) -> tuple[int, int, int, int] | None:
    """Search tiles of a few frames for a face too small for the full-frame detector; returns a square
    region (x0, y0, x1, y1) of five face sizes around it, to track in."""
    picks = np.unique(np.linspace(0, len(timeline) - 1, _SMALL_FACE_SAMPLES).round().astype(np.int64))
    try:
        frames = read_frames(reader, timeline[picks])
    except DecodeError:
        return None
    height, width = frames.shape[1:3]
    with FaceLandmarker(config.landmarker_model, mode="image", max_faces=config.max_faces) as landmarker:
        found = [box for box in (find_face_in_tiles(landmarker, frame) for frame in frames) if box is not None]
    if not found:
        return None
    x0, y0, x1, y1 = np.median(np.array(found), axis=0)
    side = min(min(height, width), int(round(5 * max(x1 - x0, y1 - y0))))
    left = int(np.clip(round((x0 + x1) / 2 - side / 2), 0, width - side))
    top = int(np.clip(round((y0 + y1) / 2 - side / 2), 0, height - side))
    return left, top, left + side, top + side


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the runs of True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def split_segments(track: FaceTrack, config: PrepareConfig) -> list[Segment]:
    """Cut the frames into candidate clips at face loss, scene cuts and face jumps, then by length."""
    found = track.found
    max_gap = int(round(config.max_gap_seconds * config.fps))
    # Short face-loss gaps between faces stay inside a clip.
    covered = found.copy()
    for start, end in _runs(~found):
        if 0 < start and end < len(found) and end - start <= max_gap:
            covered[start:end] = True

    centres = (track.boxes[:, :2] + track.boxes[:, 2:]) / 2
    jump = np.zeros(len(found), dtype=bool)
    previous = np.flatnonzero(found)
    for before, after in zip(previous[:-1], previous[1:]):
        distance = np.linalg.norm(centres[after] - centres[before])
        jump[after] = distance > config.max_face_jump * track.sizes[before]
    cuts = (track.cut_scores > config.scene_cut_threshold) | jump

    max_frames = max(1, int(round(config.max_clip_seconds * config.fps)))
    min_frames = int(round(config.min_clip_seconds * config.fps))
    segments: list[Segment] = []
    for run_start, run_end in _runs(covered):
        boundaries = [run_start, *[i for i in range(run_start + 1, run_end) if cuts[i]], run_end]
        for start, end in zip(boundaries[:-1], boundaries[1:]):
            detected = np.flatnonzero(found[start:end])
            if len(detected) == 0:
                continue
            start, end = start + int(detected[0]), start + int(detected[-1]) + 1  # begin and end on a face
            parts = -(-(end - start) // max_frames)
            edges = np.linspace(start, end, parts + 1).round().astype(int)
            for part_start, part_end in zip(edges[:-1], edges[1:]):
                segment = Segment(int(part_start), int(part_end))
                if segment.frames < min_frames:
                    segment.reason = (
                        f"too short: {segment.frames / config.fps:.2f} s < min_clip_seconds={config.min_clip_seconds}"
                    )
                segments.append(segment)
    return segments


def fit_crop(track: FaceTrack, segment: Segment, source: SourceVideo, config: PrepareConfig) -> None:
    """Set ``segment.crop_box``, ``face_size`` and a rejection reason when the face is too small.

    The boxes are smoothed over time first (a moving mean of ``crop_smooth_seconds``), then one square
    holds the face at ``crop_scale`` times its size plus the range the face centre moves over. If that
    does not fit in the frame the square shrinks down to ``min_crop_scale``; beyond that it is padded.
    """
    span = slice(segment.start, segment.end)
    found = track.found[span]
    boxes = track.boxes[span][found]  # (n, 4) frames with a face
    sizes = track.sizes[span][found]
    segment.face_size = float(np.median(sizes))
    window = max(1, int(round(config.crop_smooth_seconds * config.fps)))
    smoothed = smooth_pose_sequence(boxes, window)
    centres = (smoothed[:, :2] + smoothed[:, 2:]) / 2  # (n, 2)
    size = float(np.percentile(np.maximum(smoothed[:, 2] - smoothed[:, 0], smoothed[:, 3] - smoothed[:, 1]), 95))
    motion = float(np.max(centres.max(axis=0) - centres.min(axis=0)))
    centre_x, centre_y = (centres.max(axis=0) + centres.min(axis=0)) / 2
    centre_y += config.crop_offset_y * size
    wanted = motion + config.crop_scale * size
    smallest = motion + config.min_crop_scale * size
    side = int(round(max(smallest, min(wanted, min(source.width, source.height)))))
    side += side % 2
    left = int(round(centre_x - side / 2))
    top = int(round(centre_y - side / 2))
    if side <= source.width:
        left = min(max(left, 0), source.width - side)
    if side <= source.height:
        top = min(max(top, 0), source.height - side)
    segment.crop_box = (left, top, left + side, top + side)

    if segment.face_size < config.min_face_size:
        segment.reason = (
            f"face too small: {segment.face_size:.0f} px < min_face_size={config.min_face_size} (source pixels)"
        )
    elif segment.face_size / side < config.min_face_fraction:
        segment.reason = (
            f"face too small in the crop ({segment.face_size / side:.2f} of it < min_face_fraction="
            f"{config.min_face_fraction}): the head moves too far for one fixed crop"
        )
    faces = track.num_faces[span]
    if (faces > 1).any():
        segment.warnings.append(
            f"several faces (up to {int(faces.max())}) in {100 * np.mean(faces > 1):.0f}% of frames; the largest is tracked"
        )
