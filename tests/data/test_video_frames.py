"""Stage-B samples: layout, determinism, strides, short clips, augmentation geometry, CLIP input, resumable order."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from aniportrait.data.clip import ClipRecord, Manifest, load_landmarks, save_landmarks
from aniportrait.data.sources import ClipSource
from aniportrait.data.video import read_video, write_video
from aniportrait.data.video_frames import ResumableBatchLoader, VideoFrameDataModule
from aniportrait.errors import AniPortraitError
from aniportrait.face.drawing import draw_landmarks
from aniportrait.models.pose_image_scaling import scale_pose_images

TINY_CLIP = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


@pytest.fixture(scope="module")
def synthetic_root(tiny_dataset: Path) -> Path:
    """The session's tiny synthetic dataset (tests/conftest.py): 3 identities x 3 clips of 1.5 s at 64 px."""
    return tiny_dataset


def datamodule(root: Path, **settings) -> VideoFrameDataModule:
    settings = {"width": 64, "height": 64, "clip_image_processor": TINY_CLIP, "num_workers": 0, "batch_size": 2,
                "samples_per_epoch": 16, **settings}
    module = VideoFrameDataModule(ClipSource(str(root)), **settings)
    module.prepare_data()
    module.setup("fit")
    return module


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


def test_stage1_sample_is_a_frame_its_pose_image_and_a_reference_of_the_same_clip(synthetic_root):
    dataset = datamodule(synthetic_root).datasets["train"]
    sample = dataset[5]
    shapes = {key: tuple(value.shape) for key, value in sample.items()}
    assert shapes["pixel_values"] == shapes["pose_images"] == (1, 3, 64, 64)
    assert shapes["reference_image"] == shapes["reference_pose"] == (3, 64, 64)
    assert shapes["clip_image"] == (3, 32, 32)
    assert all(sample[key].dtype == torch.float32 for key in ("pixel_values", "pose_images", "reference_image"))
    assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1
    assert sample["pose_images"].min() >= -1 and sample["pose_images"].max() <= 1  # "unit" scaling

    record = dataset.records[int(sample["clip_index"])]
    frame, reference = int(sample["frame_indices"][0]), int(sample["reference_frame"])
    truth = read_video(synthetic_root / record.video, [frame, reference])
    np.testing.assert_array_equal(to_uint8(sample["pixel_values"][0]), truth[0])
    np.testing.assert_array_equal(to_uint8(sample["reference_image"]), truth[1])
    lmks = load_landmarks(synthetic_root / record.landmarks)["lmks"]
    expected_pose = scale_pose_images(torch.from_numpy(draw_landmarks(lmks[frame], (64, 64), normalized=True))
                                      .permute(2, 0, 1), "unit")
    torch.testing.assert_close(sample["pose_images"][0], expected_pose)

    again, other = dataset[5], dataset[6]
    assert all(torch.equal(sample[key], again[key]) for key in sample)
    assert not torch.equal(sample["pixel_values"], other["pixel_values"])


def test_clip_image_is_the_reference_through_the_clip_processor(synthetic_root):
    module = datamodule(synthetic_root)
    sample = module.datasets["train"][2]
    expected = module.clip_image_processor(images=to_uint8(sample["reference_image"]), return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(sample["clip_image"], expected)
    assert module.settings["clip_image_size"] == 32


def test_stage2_frames_are_strided_runs_of_one_clip(synthetic_root):
    dataset = datamodule(synthetic_root, n_sample_frames=8, sample_rate=[1, 4]).datasets["train"]
    strides = set()
    for index in range(24):
        sample = dataset[index]
        frames = sample["frame_indices"].numpy()
        assert sample["pixel_values"].shape == (8, 3, 64, 64) and len(frames) == 8
        steps = set(np.diff(frames).tolist())
        assert len(steps) == 1
        strides |= steps
        record = dataset.records[int(sample["clip_index"])]
        assert frames[-1] < record.frames and 0 <= int(sample["reference_frame"]) < record.frames
    assert strides == {1, 4}


def test_short_clips_are_skipped_with_a_count(synthetic_root, caplog):
    manifest = Manifest.load(synthetic_root)
    frames = sorted(record.frames for record in manifest.split("train"))
    need = frames[len(frames) // 2]  # about half the train clips are too short
    short = sum(count < need for count in frames)
    assert 0 < short < len(frames)
    with caplog.at_level(logging.WARNING, logger="aniportrait.data.video_frames"):
        dataset = datamodule(synthetic_root, n_sample_frames=need).datasets["train"]
    assert len(dataset.skipped_clips) == short and len(dataset.records) == len(frames) - short
    assert f"skipped {short} of {len(frames)} train clips shorter than {need} frames" in caplog.text
    assert all(dataset[index]["pixel_values"].shape[0] == need for index in range(3))
    with pytest.raises(AniPortraitError, match=r"none of the \d+ train clips has the 1000 frames"):
        datamodule(synthetic_root, n_sample_frames=1000)


@pytest.fixture(scope="module")
def pose_video_root(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One clip whose video frames ARE its pose images (128 px): any misalignment between the geometric
    augmentation of frames and of pose images shows up as a difference between the two."""
    root = tmp_path_factory.mktemp("posevideo")
    source = Manifest.load(synthetic_root).split("train")[0]
    arrays = load_landmarks(synthetic_root / source.landmarks)
    frames = np.stack([draw_landmarks(points, (128, 128), normalized=True) for points in arrays["lmks"]])
    clip = root / "clips" / "pose"
    write_video(clip / "video.mp4", frames, source.fps, crf=0)
    save_landmarks(clip / "landmarks.npz", arrays)
    record = ClipRecord(id="pose", split="train", identity="x", fps=source.fps, frames=len(frames), width=128,
                        height=128, duration_s=len(frames) / source.fps, source="test", video="clips/pose/video.mp4",
                        landmarks="clips/pose/landmarks.npz")
    Manifest(root, [record]).save()
    return root


def test_random_crop_and_flip_move_frames_and_pose_images_together(pose_video_root):
    cropped = datamodule(pose_video_root, crop_scale=[0.6, 0.6]).datasets["train"]
    flipped = datamodule(pose_video_root, crop_scale=[0.6, 0.6], horizontal_flip=1.0).datasets["train"]
    uncropped = datamodule(pose_video_root).datasets["train"]
    def lines(images: torch.Tensor) -> np.ndarray:  # (3, H, W) -> (H, W) bool: where lines are drawn
        return to_uint8(images).max(-1) > 40

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / (a | b).sum()

    for index in range(4):
        sample = cropped[index]
        frame = lines(sample["pixel_values"][0])
        aligned = overlap(frame, lines(sample["pose_images"][0]))
        misaligned = overlap(frame, lines(uncropped[index]["pose_images"][0]))  # the same frame's uncropped pose
        assert aligned > 0.2 and aligned > 5 * misaligned, (index, aligned, misaligned)
        mirror = flipped[index]
        for key in ("pixel_values", "pose_images", "reference_image", "reference_pose"):
            torch.testing.assert_close(mirror[key], sample[key].flip(-1))
    validation = datamodule(pose_video_root, crop_scale=[0.6, 0.6], horizontal_flip=1.0).datasets["val"]
    plain = uncropped[0]
    assert validation[0]["pixel_values"].shape == plain["pixel_values"].shape  # validation: no augmentation
    assert not validation.augment


def test_colour_jitter_changes_targets_reference_and_clip_pixels_alike_and_never_the_poses(synthetic_root):
    import torchvision.transforms.v2.functional as TF

    plain = datamodule(synthetic_root).datasets["train"]
    jittered_module = datamodule(synthetic_root, color_jitter=[0.3, 0.3, 0.4, 0.0])
    jittered = jittered_module.datasets["train"]
    for index in range(3):
        a, b = plain[index], jittered[index]
        assert int(a["frame_indices"][0]) == int(b["frame_indices"][0])  # the other draws stay put
        for key in ("pose_images", "reference_pose"):
            torch.testing.assert_close(a[key], b[key])
        color = jittered._draw(index).color
        assert color is not None and not np.allclose(color[:3], 1.0)
        for key in ("pixel_values", "reference_image"):  # torchvision's ColorJitter ops with the drawn factors
            expected = (a[key] + 1) / 2
            expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(expected, float(color[0])),
                                                               float(color[1])), float(color[2]))
            assert (to_uint8(b[key]).astype(int) - to_uint8(expected * 2 - 1).astype(int)).__abs__().max() <= 1, key
        assert not torch.allclose(a["clip_image"], b["clip_image"])  # CLIP sees the jittered reference
    sample = jittered[7]
    assert torch.equal(sample["pixel_values"], jittered[7]["pixel_values"])  # a pure function of the index
    validation = jittered_module.datasets["val"][0]
    unjittered = datamodule(synthetic_root).datasets["val"][0]
    torch.testing.assert_close(validation["pixel_values"], unjittered["pixel_values"])


def test_colour_jitter_hue_shift_matches_torchvision_up_to_8_bit_hsv():
    import torchvision.transforms.v2.functional as TF

    from aniportrait.data.video_frames import VideoFrameDataset

    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for hue in (0.05, -0.2):
        ours = VideoFrameDataset._jitter(images, np.array([1.0, 1.0, 1.0, hue])).astype(int)
        theirs = TF.adjust_hue(torch.from_numpy(images).permute(0, 3, 1, 2), hue).permute(0, 2, 3, 1).numpy()
        difference = np.abs(ours - theirs.astype(int))
        assert difference.mean() < 1.0 and difference.max() <= 8, (hue, difference.mean(), difference.max())
        assert np.abs(ours - images.astype(int)).mean() > 10  # it did shift


@pytest.mark.parametrize("jitter", [[0.3, 0.3, 0.3], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.6], [-0.1, 0, 0, 0]])
def test_colour_jitter_out_of_range_is_refused(synthetic_root, jitter):
    with pytest.raises(AniPortraitError, match="color_jitter"):
        datamodule(synthetic_root, color_jitter=jitter)


def test_resumable_loader_continues_with_the_next_batch_and_ranks_do_not_overlap(synthetic_root):
    dataset = datamodule(synthetic_root).datasets["train"]
    uninterrupted = [batch["sample_index"].tolist() for batch in ResumableBatchLoader(dataset, 2, 6)]
    assert uninterrupted == [[0, 1], [2, 3], [4, 5]]

    first = ResumableBatchLoader(dataset, 2, 6)
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    assert state == {"epoch": 0, "next_batch": 1}
    resumed = ResumableBatchLoader(dataset, 2, 6)
    resumed.load_state_dict(state)
    assert [batch["sample_index"].tolist() for batch in resumed] == uninterrupted[1:]
    assert [batch["sample_index"].tolist() for batch in resumed][0] == [6, 7]  # the next epoch goes on numbering

    ranks = [ResumableBatchLoader(dataset, 2, 8, rank=rank, world_size=2) for rank in (0, 1)]
    numbers = [[n for batch in loader for n in batch["sample_index"].tolist()] for loader in ranks]
    assert not set(numbers[0]) & set(numbers[1]) and sorted(numbers[0] + numbers[1]) == list(range(8))
    with pytest.raises(AniPortraitError, match="samples_per_epoch"):
        ResumableBatchLoader(dataset, 4, 6, world_size=2)


def test_preview_samples_give_uint8_material_for_sample_videos(synthetic_root):
    previews = datamodule(synthetic_root).preview_samples(2, 10)
    assert len(previews) == 2
    for preview in previews:
        assert preview["frames"].shape == preview["pose_images"].shape == (10, 64, 64, 3)
        assert preview["reference_image"].dtype == np.uint8 and preview["reference_pose"].shape == (64, 64, 3)
        assert preview["fps"] == 30.0


def test_workers_forked_after_the_main_process_read_clips_give_the_same_samples(synthetic_root):
    """Validation previews read clips in the main process before training forks its workers: inherited decoders
    must not be shared with (or destroyed in) the workers."""
    dataset = datamodule(synthetic_root).datasets["train"]
    in_main = [dataset[index]["pixel_values"] for index in range(6)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(6)), batch_size=1, num_workers=2,
                                         multiprocessing_context="fork")
    for expected, batch in zip(in_main, loader):
        torch.testing.assert_close(batch["pixel_values"][0], expected)
