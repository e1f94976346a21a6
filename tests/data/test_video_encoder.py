"""EncoderProcess: VideoWriter's file byte for byte from a child process, written atomically, with the child's
errors and bad input raised in the caller; VideoWriter's keyframe spacing."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from conftest import keyframes

from aniportrait.data.video import VideoWriter, read_video, write_video
from aniportrait.data.video_encoder import EncoderProcess
from aniportrait.errors import AniPortraitError


@pytest.fixture(scope="module")
def media():
    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(120, 40, (9, 48, 64, 3)), 0, 255).astype(np.uint8)
    return frames, rng.normal(0, 0.1, 16_000).astype(np.float32)


def test_gop_size_spaces_the_keyframes_and_keeps_the_frames(tmp_path, media):
    frames, _ = media
    long = np.concatenate([frames] * 4)  # 36 frames
    write_video(tmp_path / "default.mp4", long, 25)
    write_video(tmp_path / "short.mp4", long, 25, gop_size=8)
    assert keyframes(tmp_path / "default.mp4") == [0]  # x264's default interval is 250 frames
    spaced = keyframes(tmp_path / "short.mp4")
    assert spaced[0] == 0 and len(spaced) >= 5 and max(np.diff(spaced + [36])) <= 8
    np.testing.assert_allclose(read_video(tmp_path / "short.mp4").astype(float),
                               read_video(tmp_path / "default.mp4").astype(float), atol=40)  # the same frames, lossy
    with pytest.raises(AniPortraitError, match="gop_size=0"):
        VideoWriter(tmp_path / "bad.mp4", 25, gop_size=0)


def _leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_same_file_as_the_in_process_writer(tmp_path, media):
    frames, audio = media
    for writer_class, name in ((VideoWriter, "thread.mp4"), (EncoderProcess, "process.mp4")):
        with writer_class(tmp_path / name, 25, preset="veryfast") as writer:
            writer.set_audio(audio)
            writer.write(frames[:4])  # a batch, then single frames
            for frame in frames[4:]:
                writer.write(frame)
        assert writer.frames_written == 9
    assert filecmp.cmp(tmp_path / "thread.mp4", tmp_path / "process.mp4", shallow=False)
    assert read_video(tmp_path / "process.mp4").shape == (9, 48, 64, 3)
    assert not _leftovers(tmp_path)


def test_more_threads_encode_the_same_picture(tmp_path):
    """x264 frame threads change the bitstream, not what it decodes to beyond the codec's loss."""
    y, x = np.mgrid[:48, :64]
    source = np.stack([np.stack([(x * 4 + 3 * t) % 256, (y * 5 + t) % 256, np.full_like(x, 60 + 4 * t)], -1)
                       for t in range(27)]).astype(np.uint8)  # smooth moving ramps
    for threads in (1, 4):
        with EncoderProcess(tmp_path / f"{threads}.mp4", 25, threads=threads) as writer:
            writer.write(source)
    one, four = (read_video(tmp_path / f"{threads}.mp4").astype(float) for threads in (1, 4))
    assert one.shape == four.shape == source.shape
    errors = [np.abs(decoded - source).mean() for decoded in (one, four)]
    assert max(errors) < 6 and abs(errors[0] - errors[1]) < 0.5, errors  # each as close to the source


def test_an_error_in_the_block_keeps_no_file(tmp_path, media):
    frames, _ = media
    with pytest.raises(RuntimeError, match="sampling failed"):
        with EncoderProcess(tmp_path / "out.mp4", 25) as writer:
            writer.write(frames[:3])
            raise RuntimeError("sampling failed")
    assert not (tmp_path / "out.mp4").exists() and not _leftovers(tmp_path)


def test_the_childs_error_is_raised_here(tmp_path, media):
    frames, _ = media
    with pytest.raises(AniPortraitError, match=r"video encoder for .*out\.mp4.*exit code 1.*nonexistent"):
        with EncoderProcess(tmp_path / "out.mp4", 25, preset="nonexistent") as writer:
            for frame in frames:
                writer.write(frame)
    assert not (tmp_path / "out.mp4").exists() and not _leftovers(tmp_path)


def test_bad_input_is_refused_before_it_reaches_the_child(tmp_path, media):
    frames, audio = media
    with pytest.raises(AniPortraitError, match="even frame sizes; got 63x48"):
        with EncoderProcess(tmp_path / "odd.mp4", 25) as writer:
            writer.write(frames[:, :, :63])
    with pytest.raises(AniPortraitError, match="a 32x48 frame after 64x48 ones"):
        with EncoderProcess(tmp_path / "sizes.mp4", 25) as writer:
            writer.write(frames[0])
            writer.write(frames[1, :, :32])
    with pytest.raises(AniPortraitError, match="set_audio must be called before the first frame"):
        with EncoderProcess(tmp_path / "late.mp4", 25) as writer:
            writer.write(frames[0])
            writer.set_audio(audio)
    with pytest.raises(AniPortraitError, match="uint8 RGB frames"):
        with EncoderProcess(tmp_path / "float.mp4", 25) as writer:
            writer.write(frames.astype(np.float32))
    with pytest.raises(AniPortraitError, match="no frames were written"):
        with EncoderProcess(tmp_path / "empty.mp4", 25):
            pass
    assert not list(tmp_path.glob("*.mp4")) and not _leftovers(tmp_path)
