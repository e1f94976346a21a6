"""Stage-A training windows: alignment, relative poses, determinism, padding."""

import numpy as np
import torch

from aniportrait.data.audio_windows import AudioLandmarkDataModule, choose_reference_frame
from aniportrait.data.clip import load_landmarks
from aniportrait.data.sources import ClipSource
from aniportrait.metrics.landmarks import mouth_opening


def _module(root, **kwargs):
    module = AudioLandmarkDataModule(ClipSource(str(root)), window_frames=20, eval_window_frames=30, **kwargs)
    module.setup("fit")
    return module


def test_windows_are_aligned_and_deterministic(tiny_dataset):
    dataset = _module(tiny_dataset).datasets["train"]
    first, again = dataset[5], dataset[5]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["audio"].shape == (round(20 * 16000 / 30),) and first["mesh"].shape == (20, 468, 3)
    clip = dataset.clip(int(first["clip_index"]))
    start = int(first["start"])
    np.testing.assert_array_equal(first["mesh"].numpy(), clip.mesh3d[start:start + 20])
    # poses are relative to the window's first frame
    torch.testing.assert_close(first["poses"][0], torch.zeros(6), atol=1e-5, rtol=0)
    per_frame = 16000 / 30
    expected = clip.audio[round(start * per_frame): round(start * per_frame) + len(first["audio"])]
    np.testing.assert_array_equal(first["audio"].numpy()[: len(expected)], expected)


def test_eval_windows_cover_every_clip_with_padding(tiny_dataset):
    module = _module(tiny_dataset)
    dataset = module.datasets["val"]
    covered = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        clip = int(sample["clip_index"])
        covered[clip] = covered.get(clip, 0) + int(sample["audio_mask"].sum())
    assert covered == {i: dataset.clip(i).frames for i in range(len(dataset.records))}
    last = dataset[len(dataset) - 1]
    assert not last["audio_mask"][-1] and not last["frame_mask"][-1]


def test_reference_frame_is_closed_mouth_open_eyes(tiny_dataset):
    record = next(iter(_module(tiny_dataset).datasets["train"].records))
    arrays = load_landmarks(tiny_dataset / record.landmarks)
    index = choose_reference_frame(arrays["mesh3d"], arrays["valid"])
    gaps = mouth_opening(arrays["mesh3d"])
    assert gaps[index] <= np.quantile(gaps, 0.1) + 1e-6
    assert arrays["blink"][index].max() < 0.5


def test_identities_index_the_manifest(tiny_dataset):
    module = _module(tiny_dataset)
    assert module.identities == {f"synthetic_{i:02d}": i for i in range(3)}
    assert module.fps == 30.0
