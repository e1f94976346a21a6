"""SyncNet LSE-D / LSE-C / AV offset against syncnet_python's algorithm, step by step, on random-init weights.

The reference functions below restate SyncNetInstance.evaluate, calc_pdist and run_pipeline.crop_video
(joonson/syncnet_python) loop by loop; our batched implementation must give the same numbers.
"""

import math

import cv2
import numpy as np
import pytest
import torch
from scipy import signal

from aniportrait.metrics.sync import (
    SyncMetric,
    SyncNet,
    crop_boxes,
    crop_faces,
    mfcc,
    random_syncnet,
    resample_indices,
    to_pcm16,
)


def reference_calc_pdist(feat1, feat2, vshift=10):
    win_size = vshift * 2 + 1
    feat2p = torch.nn.functional.pad(feat2, (0, 0, vshift, vshift))
    dists = []
    for i in range(0, len(feat1)):
        dists.append(torch.nn.functional.pairwise_distance(feat1[[i], :].repeat(win_size, 1), feat2p[i : i + win_size, :]))
    return dists


def reference_evaluate(model, images, audio, cepstra, vshift=15, batch_size=20):
    """SyncNetInstance.evaluate after the ffmpeg steps: images = list of BGR (224, 224, 3), audio int16 at 16 kHz."""
    im = np.stack(images, axis=3)
    im = np.expand_dims(im, axis=0)
    im = np.transpose(im, (0, 3, 4, 1, 2))
    imtv = torch.from_numpy(im.astype(float)).float()
    cc = np.expand_dims(np.expand_dims(cepstra, axis=0), axis=0)
    cct = torch.from_numpy(cc.astype(float)).float()
    min_length = min(len(images), math.floor(len(audio) / 640))
    lastframe = min_length - 5
    im_feat, cc_feat = [], []
    with torch.no_grad():
        for i in range(0, lastframe, batch_size):
            im_batch = [imtv[:, :, vframe : vframe + 5, :, :] for vframe in range(i, min(lastframe, i + batch_size))]
            im_feat.append(model.forward_lip(torch.cat(im_batch, 0)))
            cc_batch = [cct[:, :, :, vframe * 4 : vframe * 4 + 20] for vframe in range(i, min(lastframe, i + batch_size))]
            cc_feat.append(model.forward_aud(torch.cat(cc_batch, 0)))
    im_feat, cc_feat = torch.cat(im_feat, 0), torch.cat(cc_feat, 0)
    dists = reference_calc_pdist(im_feat, cc_feat, vshift=vshift)
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    offset = vshift - minidx
    conf = torch.median(mdist) - minval
    return int(offset), float(conf), float(minval)


def reference_mfcc(audio):
    python_speech_features = pytest.importorskip("python_speech_features")
    return np.stack([np.array(i) for i in zip(*python_speech_features.mfcc(audio, 16000))])  # (13, M)


@pytest.fixture(scope="module")
def model() -> SyncNet:
    return random_syncnet(seed=0)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.3 * envelope * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def test_mfcc_equals_python_speech_features():
    audio = to_pcm16(speech_like(1.3, seed=0))
    np.testing.assert_allclose(mfcc(audio), reference_mfcc(audio).T, rtol=1e-10, atol=1e-10)
    silence = np.zeros(1000, np.int16)  # zero energy: both put eps in the log
    np.testing.assert_allclose(mfcc(silence), reference_mfcc(silence).T, rtol=1e-10, atol=1e-10)


def test_lse_d_lse_c_and_offset_equal_the_reference_evaluate(model):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (14, 224, 224, 3), dtype=np.uint8)
    audio = to_pcm16(speech_like(14 / 25 + 0.05, seed=2))
    try:
        import python_speech_features  # noqa: F401  (the reference's MFCC; ours is checked against it above)

        cepstra = reference_mfcc(audio)
    except ImportError:
        cepstra = mfcc(audio).T
    offset, conf, minval = reference_evaluate(model, list(frames), audio, cepstra)
    scores = SyncMetric(model, batch_size=4)(frames, audio)  # other batching: BatchNorm is in eval mode
    assert scores.windows == 14 - 5
    assert scores.offset == offset
    assert scores.lse_c == pytest.approx(conf, rel=1e-4, abs=1e-5)
    assert scores.lse_d == pytest.approx(minval, rel=1e-5)


def test_offset_sign_follows_the_reference_for_a_known_shift():
    """Audio features equal to lip features delayed by 3 windows: the reference calls that offset -3."""
    lip = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    audio = torch.cat([torch.randn(3, 8), lip[:-3]])  # audio window j+3 matches lip window j

    class Designed(SyncMetric):
        def features(self, crops_bgr, audio_pcm16):
            return lip, audio

    scores = Designed(random_syncnet(0), vshift=15)(np.zeros((1, 1, 1, 3), np.uint8), np.zeros(1, np.int16))
    dists = reference_calc_pdist(lip, audio, vshift=15)
    mdist = torch.mean(torch.stack(dists, 1), 1)
    assert scores.offset == 15 - int(torch.argmin(mdist)) == -3
    assert scores.lse_d == pytest.approx(float(mdist.min()))


def test_state_dict_has_syncnet_v2_names_and_shapes(model):
    state = model.state_dict()
    expected = {
        "netcnnaud.0.weight": (64, 1, 3, 3), "netcnnaud.1.running_var": (64,), "netcnnaud.4.weight": (192, 64, 3, 3),
        "netcnnaud.8.weight": (384, 192, 3, 3), "netcnnaud.11.weight": (256, 384, 3, 3),
        "netcnnaud.14.weight": (256, 256, 3, 3), "netcnnaud.18.weight": (512, 256, 5, 4),
        "netfcaud.0.weight": (512, 512), "netfcaud.1.running_mean": (512,), "netfcaud.3.weight": (1024, 512),
        "netfclip.0.weight": (512, 512), "netfclip.3.bias": (1024,),
        "netcnnlip.0.weight": (96, 3, 5, 7, 7), "netcnnlip.4.weight": (256, 96, 1, 5, 5),
        "netcnnlip.8.weight": (256, 256, 1, 3, 3), "netcnnlip.11.weight": (256, 256, 1, 3, 3),
        "netcnnlip.14.weight": (256, 256, 1, 3, 3), "netcnnlip.18.weight": (512, 256, 1, 6, 6),
        "netcnnlip.19.num_batches_tracked": (),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected
    convs = sum(key.endswith(".weight") and state[key].ndim >= 4 for key in state)
    assert convs == 6 + 6  # six audio and six lip convolutions
    assert len(state) == 102


def reference_crop(image, bbox_per_frame, frame_index, cs=0.4):
    """run_pipeline.crop_video for one frame of a track (dets from boxes, median filter 13, pad 110)."""
    dets = {"x": [], "y": [], "s": []}
    for det in bbox_per_frame:
        dets["s"].append(max((det[3] - det[1]), (det[2] - det[0])) / 2)
        dets["y"].append((det[1] + det[3]) / 2)
        dets["x"].append((det[0] + det[2]) / 2)
    dets = {key: signal.medfilt(value, kernel_size=13) for key, value in dets.items()}
    bs = dets["s"][frame_index]
    bsi = int(bs * (1 + 2 * cs))
    frame = np.pad(image, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=(110, 110))
    my, mx = dets["y"][frame_index] + bsi, dets["x"][frame_index] + bsi
    face = frame[int(my - bs) : int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)) : int(mx + bs * (1 + cs))]
    return cv2.resize(face, (224, 224))


def test_face_crop_from_landmarks_is_run_pipelines_crop_of_the_landmark_box():
    rng = np.random.default_rng(3)
    count = 20
    image = rng.integers(0, 256, (count, 120, 160, 3), dtype=np.uint8)
    centre = np.stack([80 + 3 * np.sin(np.arange(count)), 60 + 2 * np.cos(np.arange(count))], axis=1)
    landmarks = centre[:, None, :] + rng.uniform(-30, 30, (count, 468, 2))  # a face-sized cloud per frame
    landmarks[5, 0] = (150, 110)  # one outlier frame: the median filter removes it, as for S3FD jitter
    boxes = np.concatenate([landmarks.min(axis=1), landmarks.max(axis=1)], axis=1)  # (x0, y0, x1, y1)
    crops = crop_faces(image, crop_boxes(landmarks))
    assert crops.shape == (count, 224, 224, 3)
    for index in (0, 5, 12, count - 1):
        np.testing.assert_array_equal(crops[index], reference_crop(image[index], boxes, index))


def test_face_near_the_border_is_padded_with_grey_110():
    frames = np.zeros((13, 64, 64, 3), np.uint8)
    landmarks = np.repeat(np.array([[[0.0, 0.0], [20.0, 20.0]]]), 13, axis=0)  # a face in the top-left corner
    crop = crop_faces(frames, crop_boxes(landmarks))[6]
    assert crop[0, 0].tolist() == [110, 110, 110] and crop[-1, -1].tolist() == [0, 0, 0]


def test_tracks_shorter_than_the_median_filter_keep_their_median_box():
    landmarks = np.array([[[10.0, 10.0], [30.0, 40.0]]] * 6)
    np.testing.assert_allclose(crop_boxes(landmarks), [[20.0, 25.0, 15.0]] * 6)


def test_resampling_to_25_fps_takes_the_nearest_frame_in_time():
    assert resample_indices(25, 25).tolist() == list(range(25))
    assert resample_indices(30, 30)[:7].tolist() == [0, 1, 2, 4, 5, 6, 7]  # frame k at k/25 s -> round(k * 30 / 25)
    assert len(resample_indices(60, 30)) == 50 and resample_indices(10, 50).tolist() == [0, 2, 4, 6, 8]


def test_too_short_videos_are_an_error_naming_the_minimum(model):
    with pytest.raises(ValueError, match="at least 6 frames"):
        SyncMetric(model)(np.zeros((5, 224, 224, 3), np.uint8), np.zeros(16000, np.int16))


def test_pcm16_conversion_matches_a_wav_round_trip():
    assert to_pcm16(np.array([0.0, 0.5, -1.0, 1.0])).tolist() == [0, 16384, -32768, 32767]
