"""Dataset preparation: the parts (timeline, audio alignment, crops, segmentation, identities, splits,
options) on synthetic inputs, and end-to-end runs on the shared sample videos and bad inputs.

The default run prepares two short clips at 256 px (plus three inputs rejected before any clip); the
full-length sample set and the awkward-input collection are ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import keyframes

from aniportrait.data.clip import Manifest, load_landmarks
from aniportrait.data.prepare import (
    PrepareConfig,
    assign_splits,
    identity_of,
    parse_overrides,
    prepare_dataset,
    read_split_file,
)
from aniportrait.data.prepare.__main__ import main as prepare_main
from aniportrait.data.prepare.clips import audio_level_dbfs, audio_status, crop_square
from aniportrait.data.prepare.source import SourceVideo, audio_for_frames, output_timeline
from aniportrait.data.prepare.track import FaceTrack, Segment, fit_crop, split_segments
from aniportrait.errors import AniPortraitError

SHARED = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
SAMPLES = SHARED / "samples"
MODEL = SAMPLES / "models" / "face_landmarker_v2_with_blendshapes.task"
needs_shared = pytest.mark.skipif(not MODEL.is_file(), reason=f"shared sample media not found at {SHARED}")


# --------------------------------------------------------------------------------------------- helpers


def write_test_video(path: Path, frames: np.ndarray, fps: float = 25, rotation: int | None = None,
                     pix_fmt: str = "yuv420p", audio: np.ndarray | None = None) -> Path:
    """Encode frames (T, H, W, 3) with PyAV; ``rotation`` sets display-matrix metadata like a phone does."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        stream.options = {"preset": "ultrafast"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=16000)
            audio_stream.layout = "mono"
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(format=pix_fmt)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if audio_stream is not None:
            size = audio_stream.codec_context.frame_size or 1024
            for start in range(0, len(audio), size):
                chunk = av.AudioFrame.from_ndarray(audio[None, start : start + size].astype(np.float32), format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                for packet in audio_stream.encode(chunk):
                    container.mux(packet)
            for packet in audio_stream.encode(None):
                container.mux(packet)
    return path


def make_source(frame_starts: np.ndarray, duration: float, video_start: float = 0.0, audio_start: float = 0.0) -> SourceVideo:
    return SourceVideo(Path("x.mp4"), "x.mp4", len(frame_starts) / duration, 64, 64, len(frame_starts), duration,
                       True, 0, False, np.asarray(frame_starts, dtype=np.float64), video_start, audio_start)


def make_track(found: np.ndarray, centre=(300.0, 300.0), size: float = 200.0, cuts=()) -> FaceTrack:
    count = len(found)
    boxes = np.full((count, 4), np.nan)
    boxes[found] = [centre[0] - size / 2, centre[1] - size / 2, centre[0] + size / 2, centre[1] + size / 2]
    scores = np.zeros(count)
    scores[list(cuts)] = 0.9
    return FaceTrack(boxes, found.astype(int), scores, count)


def config(**overrides) -> PrepareConfig:
    values = {"input": "in", "output": "out", "fps": 25.0, "progress": False, "landmarker_model": str(MODEL)}
    values.update(overrides)
    return PrepareConfig(**values)


def eyes_above_mouth(lmks: np.ndarray) -> bool:
    return bool(np.all((lmks[:, 33, 1] + lmks[:, 263, 1]) / 2 < lmks[:, 13, 1]))


# ------------------------------------------------------------------------------------------ unit tests


def test_timeline_resamples_variable_frame_rate_by_time() -> None:
    starts = np.array([0.0, 0.07, 0.1, 0.135, 0.2, 0.24, 0.27, 0.34])  # irregular, ~22 fps
    timeline = output_timeline(make_source(starts, 0.37), fps=30)
    assert len(timeline) == 11  # floor(0.37 * 30)
    expected = [int(np.argmin(np.abs(starts - k / 30))) for k in range(11)]
    assert timeline.tolist() == expected
    constant = output_timeline(make_source(np.arange(50) / 25, 2.0), fps=25)
    assert constant.tolist() == list(range(50))  # same rate: every frame exactly once
    assert len(output_timeline(make_source(np.arange(50) / 25, 2.0), fps=30, max_seconds=1.0)) == 30


def test_audio_for_frames_is_aligned_and_padded() -> None:
    audio = np.arange(16000 * 2, dtype=np.float32)  # 2 s, sample value = index
    source = make_source(np.arange(50) / 25, 2.0, video_start=0.1, audio_start=0.0)
    clip = audio_for_frames(audio, source, fps=25, start_frame=5, frames=10)
    assert len(clip) == 6400  # exactly 10 frames at 25 fps
    assert clip[0] == (5 / 25 + 0.1) * 16000  # the video starts 0.1 s into the audio clock
    tail = audio_for_frames(audio, source, fps=25, start_frame=45, frames=10)
    assert len(tail) == 6400 and tail[-1] == 0.0  # past the end of the track: silence


def test_crop_square_pads_outside_the_frame_with_black() -> None:
    frames = np.full((2, 100, 80, 3), 200, dtype=np.uint8)
    crops = crop_square(frames, (-20, 10, 100, 130), size=64)  # 120 px square, 20 px past each side
    assert crops.shape == (2, 64, 64, 3)
    assert crops[0, 32, 2].max() == 0 and crops[0, 32, 32].min() == 200


def test_audio_status_tells_quiet_speech_from_silence() -> None:
    rng = np.random.default_rng(0)
    quiet_speech = np.zeros(16000 * 4, dtype=np.float32)
    quiet_speech[8000:12000] = 0.02 * rng.standard_normal(4000)  # one short quiet word in 4 s of pause
    assert audio_level_dbfs(quiet_speech) < -40 and audio_status(quiet_speech) == "present"
    assert audio_status(np.zeros(16000, dtype=np.float32)) == "silent"
    assert audio_status(np.full(16000, 1e-4, dtype=np.float32)) == "silent"  # codec noise floor
    assert audio_status(None) == "none" and audio_level_dbfs(np.zeros(10, dtype=np.float32)) == -120.0


def test_segments_cut_at_face_loss_scene_cuts_and_length() -> None:
    found = np.ones(300, dtype=bool)
    found[40:43] = False  # a short gap: stays inside the clip
    found[100:130] = False  # a long face loss: a cut
    track = make_track(found, cuts=[200])
    segments = split_segments(track, config(max_clip_seconds=2.0, min_clip_seconds=1.0, max_gap_seconds=0.2))
    spans = [(s.start, s.end) for s in segments]
    assert spans == [(0, 50), (50, 100), (130, 165), (165, 200), (200, 250), (250, 300)]  # max 50 frames, equal parts
    assert all(s.reason is None for s in segments)
    short = split_segments(make_track(np.r_[np.ones(20, bool), np.zeros(30, bool), np.ones(60, bool)]), config())
    assert short[0].reason == "too short: 0.80 s < min_clip_seconds=2.0"
    assert short[1].reason is None and (short[1].start, short[1].end) == (50, 110)


def test_face_jump_is_a_cut() -> None:
    track = make_track(np.ones(100, dtype=bool))
    track.boxes[60:] += 300.0  # the tracked face is suddenly elsewhere: another shot or another person
    assert [(s.start, s.end) for s in split_segments(track, config(min_clip_seconds=1.0))] == [(0, 60), (60, 100)]


def test_crop_is_one_square_inside_the_frame_or_padded() -> None:
    source = make_source(np.arange(100) / 25, 4.0)
    source.width, source.height = 1920, 1080
    track = make_track(np.ones(100, dtype=bool), centre=(1800.0, 540.0), size=300.0)
    segment = Segment(0, 100)
    fit_crop(track, segment, source, config())
    x0, y0, x1, y1 = segment.crop_box
    assert x1 - x0 == y1 - y0 == 540 and x1 == 1920 and y0 >= 0  # 1.8 x 300, shifted inside the frame
    assert segment.reason is None and segment.face_size == pytest.approx(300.0)

    big = make_track(np.ones(100, dtype=bool), centre=(960.0, 540.0), size=1000.0)
    segment = Segment(0, 100)
    fit_crop(big, segment, source, config())
    x0, y0, x1, y1 = segment.crop_box
    assert x1 - x0 == 1250 and y0 < 0  # min_crop_scale 1.25 x 1000 > frame height: padded

    tiny = make_track(np.ones(100, dtype=bool), size=60.0)
    segment = Segment(0, 100)
    fit_crop(tiny, segment, source, config())
    assert segment.reason == "face too small: 60 px < min_face_size=128 (source pixels)"


def test_identity_rules() -> None:
    assert identity_of("WDA_AmyKlobuchar1_000.mp4", "hdtf") == "AmyKlobuchar"
    assert identity_of("WDA_AmyKlobuchar0_001.mp4", "hdtf") == "AmyKlobuchar"
    assert identity_of("RD_Radio11_000.mp4", "hdtf") == "Radio11"
    assert identity_of("Clip+G0DGRma_p48+P0+C0+F11208-11383.mp4", "vfhq") == "G0DGRma_p48"
    assert identity_of("_0tf2n3rlJU_0.mp4", "celebvhq") == "_0tf2n3rlJU"
    assert identity_of("people/alice/talk_3.mp4", "parent") == "alice"
    assert identity_of("people/alice/talk_3.mp4", "stem") == "talk_3"
    assert identity_of("people/alice/talk_3.mp4", r"regex:^people/(\w+)/") == "alice"
    with pytest.raises(AniPortraitError, match="does not match"):
        identity_of("x.mp4", r"regex:^people/(\w+)/")
    with pytest.raises(AniPortraitError, match="unknown identity rule"):
        identity_of("x.mp4", "name")


def test_splits_are_by_identity_seeded_and_stable() -> None:
    identities = [f"person{i:02d}" for i in range(40)]
    splits = assign_splits(identities, val_fraction=0.1, test_fraction=0.1, seed=3)
    counts = {name: sum(split == name for split in splits.values()) for name in ("train", "val", "test")}
    assert counts == {"train": 32, "val": 4, "test": 4}
    assert assign_splits(reversed(identities), 0.1, 0.1, seed=3) == splits  # order does not matter
    assert assign_splits(identities, 0.1, 0.1, seed=4) != splits  # the seed does
    clips = [(f"clip{i}", identities[i % 40]) for i in range(200)]  # five clips per identity
    for identity in identities:
        assert len({splits[who] for _, who in clips if who == identity}) == 1
    small = assign_splits(["a", "b", "c"], 0.05, 0.05)
    assert sorted(small.values()) == ["test", "train", "val"]  # three identities: one each
    assert sorted(assign_splits(["a", "b"], 0.05, 0.05).values()) == ["train", "val"]  # validation comes first
    assert assign_splits(["a"], 0.05, 0.05) == {"a": "train"}
    assert assign_splits(["a", "b"], 0.05, 0.05, fixed={"a": "test"}) == {"a": "test", "b": "train"}


def test_split_file_formats(tmp_path: Path) -> None:
    text = tmp_path / "splits.txt"
    text.write_text("# official test list\nalice test\nbob val\n")
    assert read_split_file(text) == {"alice": "test", "bob": "val"}
    table = tmp_path / "splits.json"
    table.write_text(json.dumps({"carol": "train"}))
    assert read_split_file(table) == {"carol": "train"}
    table.write_text(json.dumps({"carol": "holdout"}))
    with pytest.raises(AniPortraitError, match="holdout"):
        read_split_file(table)


def test_options_are_checked() -> None:
    assert parse_overrides(["input=a", "output=b", "size=256", "max_source_seconds=2"]).max_source_seconds == 2.0
    with pytest.raises(AniPortraitError, match="input=DIR"):
        parse_overrides(["output=b"])
    with pytest.raises(AniPortraitError, match="unknown option 'siz'"):
        parse_overrides(["input=a", "output=b", "siz=256"])
    with pytest.raises(AniPortraitError, match="size"):
        parse_overrides(["input=a", "output=b", "size=big"])
    with pytest.raises(AniPortraitError, match="even"):
        parse_overrides(["input=a", "output=b", "size=255"])
    assert parse_overrides(["input=a", "output=b", "gop_size=null"]).gop_size is None
    with pytest.raises(AniPortraitError, match="gop_size must be a positive number of frames"):
        parse_overrides(["input=a", "output=b", "gop_size=0"])


def test_cli_reports_bad_input_with_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prepare_main([f"input={tmp_path / 'missing'}", f"output={tmp_path / 'out'}"]) == 2
    assert "input not found" in capsys.readouterr().err


# ------------------------------------------------------------------------ end to end on real media


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PrepareConfig]:
    """Two short sample clips at 256 px, plus an unreadable file, a truncated one and a faceless one."""
    if not MODEL.is_file():
        pytest.skip(f"shared sample media not found at {SHARED}")
    base = tmp_path_factory.mktemp("prepare")
    videos = base / "videos"
    videos.mkdir()
    (videos / "sadtalker_WDA_KatieHill_000.mp4").symlink_to(SAMPLES / "video" / "sadtalker_WDA_KatieHill_000.mp4")
    (videos / "no_audio_track.mp4").symlink_to(SAMPLES / "bad" / "no_audio_track.mp4")
    (videos / "not_a_video.mp4").write_text("this is text")
    data = (SAMPLES / "video" / "mimictalk_German_10s.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    gradient = np.broadcast_to(np.linspace(0, 255, 128, dtype=np.uint8)[None, None, :, None], (25, 128, 128, 3))
    write_test_video(videos / "no_face.mp4", gradient)
    settings = config(input=str(videos), output=str(base / "dataset"), size=256, max_source_seconds=2.5,
                      min_clip_seconds=1.0)
    prepare_dataset(settings)
    return base / "dataset", settings


@needs_shared
def test_sample_clips_end_to_end(prepared: tuple[Path, PrepareConfig]) -> None:
    from aniportrait.data.video import probe_video

    root, _ = prepared
    manifest = Manifest.load(root)
    assert sorted(r.id for r in manifest) == ["no_audio_track_000", "sadtalker_WDA_KatieHill_000_000"]
    for record in manifest:
        arrays = load_landmarks(record.path(root, "landmarks"), frames=record.frames)
        assert arrays["valid"].mean() >= 0.95
        info = probe_video(record.path(root, "video"))
        assert (info.width, info.height, info.frames) == (256, 256, record.frames)
        assert info.fps == pytest.approx(25.0)
        assert record.frames == 62 and record.duration_s == pytest.approx(2.48)
        assert (root / "clips" / record.id / "clip.json").is_file()
        assert max(np.diff(keyframes(record.path(root, "video")))) <= 16  # gop_size: cheap random reads


@needs_shared
def test_landmarks_agree_with_the_reference_in_the_crop(prepared: tuple[Path, PrepareConfig]) -> None:
    root, settings = prepared
    arrays = load_landmarks(root / "clips" / "sadtalker_WDA_KatieHill_000_000" / "landmarks.npz")
    with np.load(SAMPLES / "landmarks" / "sadtalker_WDA_KatieHill_000.npz") as reference:
        width, height = reference["frame_size_wh"]
        reference_px = reference["lmks"][arrays["source_frames"], :, :2] * [width, height]  # (T, 478, 2)
    x0, y0, x1, _ = arrays["crop_box"]
    mapped = (reference_px - [x0, y0]) * settings.size / (x1 - x0)
    ours = arrays["lmks"][:, :, :2] * settings.size
    error = np.linalg.norm(ours - mapped, axis=-1).mean()
    assert error < 0.01 * settings.size, f"mean landmark error {error:.2f} px in a {settings.size} px crop"


@needs_shared
def test_audio_matches_video_length_and_video_only_clip_has_none(prepared: tuple[Path, PrepareConfig]) -> None:
    import soundfile

    root, _ = prepared
    records = {record.id: record for record in Manifest.load(root)}
    talking = records["sadtalker_WDA_KatieHill_000_000"]
    samples, rate = soundfile.read(talking.path(root, "audio"))
    assert rate == 16000 and samples.ndim == 1
    assert abs(len(samples) / rate - talking.frames / talking.fps) <= 1 / talking.fps
    silent = records["no_audio_track_000"]
    assert silent.audio is None and not (root / "clips" / silent.id / "audio.wav").exists()


@needs_shared
def test_bad_files_are_rejected_with_reasons_and_the_run_goes_on(prepared: tuple[Path, PrepareConfig]) -> None:
    root, _ = prepared
    report = json.loads((root / "qc" / "report.json").read_text())
    sources = {entry["source"]: entry for entry in report["sources"]}
    assert sources["not_a_video.mp4"]["status"] == "rejected"
    assert sources["not_a_video.mp4"]["reason"].startswith("unreadable: ")
    assert sources["truncated.mp4"]["reason"].startswith("unreadable: ") and "truncated" in sources["truncated.mp4"]["reason"]
    assert sources["no_face.mp4"]["reason"] == "no face found in any frame"
    assert sources["no_audio_track.mp4"]["warnings"] == ["no audio track: video-only clips"]
    kept = [clip for clip in report["clips"] if clip["status"] == "kept"]
    assert len(kept) == 2
    for clip in kept:
        assert clip["detection_rate"] >= 0.95 and clip["jitter_px"] > 0 and clip["face_size_px"] > 128
    assert {clip["audio"] for clip in kept} == {"present", "none"}
    markdown = (root / "qc" / "report.md").read_text()
    assert "| clips kept | 2" in markdown and "sadtalker_WDA_KatieHill_000_000 | kept" in markdown


@needs_shared
def test_splits_never_share_an_identity(prepared: tuple[Path, PrepareConfig]) -> None:
    root, _ = prepared
    manifest = Manifest.load(root)
    seen: dict[str, str] = {}
    for record in manifest:
        assert seen.setdefault(record.identity, record.split) == record.split


@needs_shared
def test_rerun_skips_finished_work(prepared: tuple[Path, PrepareConfig], capsys: pytest.CaptureFixture) -> None:
    root, settings = prepared
    stamps = {path: path.stat().st_mtime_ns for path in (root / "clips").rglob("*") if path.is_file()}
    manifest_before = (root / "manifest.jsonl").read_text()
    status = prepare_main([f"input={settings.input}", f"output={root}", "size=256", "fps=25", "max_source_seconds=2.5",
                           "min_clip_seconds=1", "progress=false", f"landmarker_model={MODEL}"])
    assert status == 0
    assert "| clips kept | 2" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert (root / "manifest.jsonl").read_text() == manifest_before
    with pytest.raises(AniPortraitError, match="size"):
        prepare_dataset(config(input=settings.input, output=str(root), size=128, max_source_seconds=2.5,
                               min_clip_seconds=1.0))


@needs_shared
def test_interrupted_run_resumes(prepared: tuple[Path, PrepareConfig], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from aniportrait.data.prepare import clips as clips_module

    root, settings = prepared
    copy = tmp_path / "dataset"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "clips" / "sadtalker_WDA_KatieHill_000_000")
    (copy / ".prepare" / "sources" / "sadtalker_WDA_KatieHill_000.json").unlink()
    (copy / "clips" / ".left_by_a_killed_run.x.tmp").mkdir()
    kept_clip = copy / "clips" / "no_audio_track_000" / "video.mp4"
    kept_stamp = kept_clip.stat().st_mtime_ns

    real_extend = clips_module.LandmarkSequence.extend
    calls = []

    def interrupted_extend(self, frames):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing the clip
        return real_extend(self, frames)

    monkeypatch.setattr(clips_module.LandmarkSequence, "extend", interrupted_extend)
    resumed = config(input=settings.input, output=str(copy), size=256, max_source_seconds=2.5, min_clip_seconds=1.0)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(resumed)
    assert not list((copy / "clips").glob(".*")), "no partial clip folder may survive"
    assert not (copy / "clips" / "sadtalker_WDA_KatieHill_000_000").exists()
    assert not (copy / ".prepare" / "lock").exists()

    monkeypatch.setattr(clips_module.LandmarkSequence, "extend", real_extend)
    result = prepare_dataset(resumed)
    assert result.sources_skipped == 4 and result.clips_kept == 2
    assert (copy / "clips" / "sadtalker_WDA_KatieHill_000_000" / "clip.json").is_file()
    assert kept_clip.stat().st_mtime_ns == kept_stamp
    assert [r.id for r in Manifest.load(copy)] == [r.id for r in Manifest.load(root)]


@needs_shared
def test_overwrite_redoes_everything_with_new_settings(prepared: tuple[Path, PrepareConfig], tmp_path: Path) -> None:
    from aniportrait.data.video import probe_video

    root, settings = prepared
    copy = tmp_path / "dataset"
    shutil.copytree(root, copy)
    (copy / "clips" / "stale_clip").mkdir()
    result = prepare_dataset(config(input=settings.input, output=str(copy), size=128, max_source_seconds=1.5,
                                    min_clip_seconds=1.0, overwrite=True))
    assert result.clips_kept == 2 and result.sources_skipped == 0
    assert not (copy / "clips" / "stale_clip").exists()
    for record in Manifest.load(copy):
        assert probe_video(record.path(copy, "video")).width == 128 and record.frames == 37


@needs_shared
def test_a_second_run_on_the_same_root_is_refused(prepared: tuple[Path, PrepareConfig]) -> None:
    root, settings = prepared
    lock = root / ".prepare" / "lock"
    lock.write_text(str(os.getpid()))  # a live process holds it
    try:
        with pytest.raises(AniPortraitError, match="another prepare run"):
            prepare_dataset(config(input=settings.input, output=str(root), size=256, max_source_seconds=2.5,
                                   min_clip_seconds=1.0))
    finally:
        lock.unlink()


# ------------------------------------------------------------------------------------------ slow runs


@pytest.mark.slow
@needs_shared
def test_full_sample_videos_in_parallel(tmp_path: Path) -> None:
    """All four sample videos, full length, 512 px at 30 fps, two worker processes."""
    import soundfile

    root = tmp_path / "dataset"
    result = prepare_dataset(config(input=str(SAMPLES / "video"), output=str(root), fps=30.0, workers=2))
    assert result.clips_kept == 4 and result.clips_rejected == 0
    for record in Manifest.load(root):
        arrays = load_landmarks(record.path(root, "landmarks"), frames=record.frames)
        assert arrays["valid"].mean() >= 0.95, record.id
        stem = record.source.removesuffix(".mp4")
        with np.load(SAMPLES / "landmarks" / f"{stem}.npz") as reference:
            width, height = reference["frame_size_wh"]
            reference_px = reference["lmks"][arrays["source_frames"], :, :2] * [width, height]
        x0, y0, x1, _ = arrays["crop_box"]
        error = np.linalg.norm(arrays["lmks"][:, :, :2] * 512 - (reference_px - [x0, y0]) * 512 / (x1 - x0), axis=-1)
        assert error.mean() < 0.01 * 512, f"{record.id}: {error.mean():.2f} px"
        samples, rate = soundfile.read(record.path(root, "audio"))
        assert abs(len(samples) / rate - record.frames / record.fps) <= 1 / record.fps


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared bad inputs plus made-up ones: phone rotation, grayscale, two faces, a scene cut, 4K."""
    import cv2

    from aniportrait.audio.io import load_audio
    from aniportrait.data.video import read_video

    if not MODEL.is_file():
        pytest.skip(f"shared sample media not found at {SHARED}")
    base = tmp_path_factory.mktemp("awkward")
    videos = base / "videos"
    videos.mkdir()
    for path in sorted((SAMPLES / "bad").glob("*.mp4")):
        (videos / path.name).symlink_to(path)
    katie = SAMPLES / "video" / "sadtalker_WDA_KatieHill_000.mp4"
    frames = read_video(katie, np.arange(75))  # 3 s
    speech = load_audio(katie)[: 3 * 16000]
    upright = np.ascontiguousarray(frames[:, :, 64:448])  # 512 x 384, portrait orientation
    write_test_video(videos / "phone_rotated.mp4", np.ascontiguousarray(np.rot90(upright, k=-1, axes=(1, 2))),
                     rotation=90, audio=speech)
    gray = np.repeat(frames.mean(axis=3, keepdims=True).astype(np.uint8), 3, axis=3)
    write_test_video(videos / "grayscale.mp4", gray, pix_fmt="gray", audio=speech)
    other = read_video(SAMPLES / "video" / "mimictalk_German_10s.mp4", np.arange(75), size=(256, 256))
    two = np.zeros((75, 512, 800, 3), dtype=np.uint8)
    two[:, :, :512], two[:, 128:384, 528:784] = frames, other
    write_test_video(videos / "two_faces.mp4", two, audio=speech)
    second_shot = read_video(SAMPLES / "video" / "aniportrait_pose_ref_video.mp4", np.arange(75))
    write_test_video(videos / "scene_cut.mp4", np.concatenate([frames[:38], second_shot[:37]]), audio=speech)
    big = np.stack([cv2.resize(np.pad(f, ((0, 0), (328, 328), (0, 0))), (3840, 2160)) for f in frames[:50]])
    write_test_video(videos / "uhd_4k.mp4", big, audio=speech[: 2 * 16000])
    root = base / "dataset"
    prepare_dataset(config(input=str(videos), output=str(root), size=256, max_source_seconds=3.0,
                           min_clip_seconds=1.0, workers=2))
    return root


@pytest.mark.slow
@needs_shared
def test_awkward_inputs_are_handled_or_rejected_with_reasons(awkward: Path) -> None:
    root = awkward
    report = json.loads((root / "qc" / "report.json").read_text())
    sources = {entry["source"]: entry for entry in report["sources"]}
    clips: dict[str, list[dict]] = {}
    for clip in report["clips"]:
        clips.setdefault(clip["source"], []).append(clip)
    records = {record.source: record for record in Manifest.load(root)}

    def kept(name: str) -> list[dict]:
        return [clip for clip in clips[name] if clip["status"] == "kept"]

    assert records["no_audio_track.mp4"].audio is None
    assert kept("silent_audio_track.mp4")[0]["audio"] == "silent"
    assert records["silent_audio_track.mp4"].audio is not None  # silence is valid audio
    tiny = clips["tiny_face_full_body.mp4"][0]
    assert tiny["status"] == "rejected" and tiny["reason"].startswith("face too small")
    assert any("small face" in warning for warning in sources["tiny_face_full_body.mp4"]["warnings"])
    assert sources["variable_frame_rate.mp4"]["variable_frame_rate"]
    assert kept("variable_frame_rate.mp4")[0]["frames"] == 75  # 3 s at 25 fps from a ~22 fps file
    rotated = load_landmarks(records["phone_rotated.mp4"].path(root, "landmarks"))
    assert sources["phone_rotated.mp4"]["rotation"] == 90 and rotated["valid"].mean() >= 0.95
    assert eyes_above_mouth(rotated["lmks"]) and (sources["phone_rotated.mp4"]["width"], sources["phone_rotated.mp4"]["height"]) == (384, 512)
    assert load_landmarks(records["grayscale.mp4"].path(root, "landmarks"))["valid"].mean() >= 0.95
    two = kept("two_faces.mp4")[0]
    assert any("several faces" in warning for warning in two["warnings"]) and two["crop_box"][2] <= 560
    assert [(c["start_s"], c["end_s"]) for c in kept("scene_cut.mp4")] == [(0.0, 1.52), (1.52, 3.0)]
    uhd = kept("uhd_4k.mp4")[0]
    assert uhd["detection_rate"] >= 0.95 and uhd["crop_box"][2] - uhd["crop_box"][0] > 1000


@pytest.mark.slow
@needs_shared
def test_tiny_face_is_cropped_when_allowed(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    result = prepare_dataset(config(input=str(SAMPLES / "bad" / "tiny_face_full_body.mp4"), output=str(root),
                                    size=256, min_face_size=48, max_source_seconds=3.0, min_clip_seconds=1.0))
    assert result.clips_kept == 1
    record = next(iter(Manifest.load(root)))
    x0, y0, x1, y1 = record.extra["crop_box"]
    assert x1 - x0 < 300 and y0 < 300  # a head crop near the top of the 720x1080 frame
    assert load_landmarks(record.path(root, "landmarks"))["valid"].mean() >= 0.95
