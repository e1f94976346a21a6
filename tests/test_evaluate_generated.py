"""``evaluate.py generated=DIR``: any method's videos scored against the test clips, bad input included."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aniportrait.audio.io import load_audio
from aniportrait.cli import _register_resolvers, config_dir
from aniportrait.data.clip import Manifest
from aniportrait.data.video import read_video, write_video
from aniportrait.evaluation import align_videos, evaluate_videos, markdown_table
from aniportrait.metrics.suite import MetricSuite

pytestmark = pytest.mark.filterwarnings("ignore")
LANDMARKER = SHARED / "samples" / "models" / "face_landmarker_v2_with_blendshapes.task"
FAST_PROTOCOL = ["protocol.frames_per_clip=24", "protocol.fid.frame_stride=4", "protocol.fvd.clips_per_video=1",
                 "metrics.random_init.enabled=true", "metrics.random_init.i3d_width=0.25", "metrics.download=false"]


@pytest.fixture(scope="module")
def six_test_clips(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset with its validation clips moved to the test split: six test clips."""
    root = tmp_path_factory.mktemp("six") / "data"
    shutil.copytree(tiny_dataset, root)
    manifest = Manifest.load(root)
    for record in manifest.records:
        if record.split == "val":
            record.split = "test"
    manifest.save()
    return root


@pytest.fixture(scope="module")
def generated_dir(six_test_clips, tmp_path_factory) -> tuple[Path, list[str]]:
    """One video per case: resized, shorter, silent, corrupt, missing, and at another frame rate."""
    out = tmp_path_factory.mktemp("generated")
    records = Manifest.load(six_test_clips).split("test")
    ids = [record.id for record in records]
    for case, record in enumerate(records):
        frames = read_video(six_test_clips / record.video)
        audio = load_audio(six_test_clips / record.audio)
        path = out / f"{record.id}.mp4"
        if case == 0:
            import cv2

            write_video(path, np.stack([cv2.resize(f, (96, 96)) for f in frames]), record.fps, audio=audio)
        elif case == 1:
            write_video(path, frames[:20], record.fps, audio=audio)
        elif case == 2:
            write_video(path, frames, record.fps)
        elif case == 3:
            path.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
        elif case == 5:
            write_video(path, frames[::2], record.fps / 2, audio=audio)
    return out, ids


@pytest.fixture(scope="module")
def cli_results(six_test_clips, generated_dir, tmp_path_factory):
    out, ids = generated_dir
    logs = tmp_path_factory.mktemp("logs")
    landmarker = f"metrics.face_landmarker={LANDMARKER}" if LANDMARKER.is_file() else "metrics.face_landmarker=null"
    result = run_cli("evaluate.py", f"generated={out}", f"data={six_test_clips}", *FAST_PROTOCOL, landmarker,
                     "logger=wandb", "num_workers=1",
                     env={"ANIPORTRAIT_LOGS": str(logs), "ANIPORTRAIT_CACHE": str(logs / "cache"),
                          "WANDB_API_KEY": "", "HOME": str(logs)})
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1].removeprefix("results: "))
    return result, json.loads(path.read_text()), path.parent, ids


def rows_of(results: dict, method: str) -> dict[str, dict]:
    return {row["clip"]: row for row in results["clips"] if row["method"] == method}


def test_bad_videos_are_reported_per_clip_and_the_rest_scored(cli_results):
    result, results, _, ids = cli_results
    assert results["missing"] == [ids[4]]
    assert list(results["unreadable"]) == [ids[3]] and "corrupt" in results["unreadable"][ids[3]]
    assert results["scored"] == [ids[0], ids[1], ids[2], ids[5]]
    assert f"1 missing ({ids[4]})" in result.stdout and f"1 unreadable ({ids[3]})" in result.stdout
    sanity = [row for row in results["clips"] if row["method"] != "generated" and row["clip"] in (ids[3], ids[4])]
    assert len(sanity) == 4 and all(row["status"].startswith("not scored: generated video") for row in sanity)
    assert "lse_d" in results["left_out"] and ids[2] in results["left_out"]["lse_d"]  # its video has no audio


def test_length_size_and_frame_rate_are_aligned_and_reported(cli_results):
    _, results, _, ids = cli_results
    generated = rows_of(results, "generated")
    assert "size: generated 96x96 -> 64x64" in generated[ids[0]]["alignment"]
    assert "length: generated 20 frames" in generated[ids[1]]["alignment"] and generated[ids[1]]["frames"] == 20
    assert "fps: generated 15 fps -> 30 fps" in generated[ids[5]]["alignment"]
    assert generated[ids[0]]["frames"] == 24  # protocol.frames_per_clip
    assert generated[ids[0]]["ssim"] > 0.5


def test_a_video_without_audio_has_no_sync_scores_and_says_why(cli_results):
    _, results, _, ids = cli_results
    generated = rows_of(results, "generated")
    assert "lse_d" not in generated[ids[2]] and "no audio track" in generated[ids[2]]["notes"]
    assert all(isinstance(generated[ids[i]].get("lse_d"), float) for i in (0, 1, 5))


def test_sanity_rows_bound_the_metrics(cli_results):
    result, results, _, _ = cli_results
    truth, copy = results["metrics"]["ground_truth"], results["metrics"]["copy_reference"]
    assert truth["ssim"] == pytest.approx(1.0, abs=1e-4) and truth["psnr"] == 100.0 and truth["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert truth["fid"] == pytest.approx(0.0, abs=1e-6) and truth["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert copy["ssim"] < truth["ssim"] and copy["lpips"] > truth["lpips"] and copy["fid"] > 0
    if LANDMARKER.is_file():
        assert truth["lmd_face"] == 0.0 and copy["lmd_mouth"] > 0 and truth["csim"] > 0
    else:
        assert "face landmarker" in results["unavailable"]["lmd_face"]
    assert "| metric | generated | ground truth vs itself | copy reference frame |" in result.stdout


def test_outputs_protocol_and_seeded_fvd_windows_are_written(cli_results):
    _, results, out_dir, ids = cli_results
    protocol = results["protocol"]
    assert protocol["frames_per_clip"] == 24 and protocol["fvd"]["seed"] == 0 and "nearest in time" in protocol["alignment_rule"]
    assert "random-init" in protocol["versions"]["weights"]["fvd"] and protocol["versions"]["packages"]["torchmetrics"]
    scored = {ids[i] for i in (0, 1, 2, 5)}  # every row, the ground truth's FVD set too, covers the scored clips only
    assert set(results["fvd_windows"]) == scored and all(len(starts) == 1 for starts in results["fvd_windows"].values())
    with open(out_dir / "clips.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 3 and {"clip", "method", "status", "ssim", "alignment", "notes"} <= set(rows[0])
    assert {Path(p).name for p in results["plots"]} == {"metric_distributions.png", "per_clip.png"}
    assert all(Path(p).stat().st_size > 1000 for p in results["plots"])
    assert list(out_dir.glob("wandb/offline-run-*/files")) or list(out_dir.glob("wandb/offline-run-*"))


def test_alignment_rule_on_arrays():
    reference = np.zeros((30, 64, 64, 3), np.uint8)
    generated = np.zeros((20, 80, 100, 3), np.uint8)  # 15 fps, 100x80
    generated[:, :, :10] = 255  # a left border that the centre crop to square removes
    ref, gen, fps, notes = align_videos(reference, 30.0, generated, 15.0, {"frames_per_clip": 25})
    assert fps == 30.0 and ref.shape == gen.shape == (25, 64, 64, 3)
    assert set(notes) == {"fps", "length", "size"} and gen.max() == 0
    ref, gen, _, notes = align_videos(reference, 30.0, None, None, {"resolution": 32, "fps": 15})
    assert gen is None and ref.shape == (15, 32, 32, 3) and set(notes) == {"reference_fps", "reference_size"}


def test_missing_weights_offline_make_metrics_unavailable_with_reasons(six_test_clips, tmp_path, monkeypatch):
    monkeypatch.setenv("ANIPORTRAIT_CACHE", str(tmp_path))
    monkeypatch.delenv("ANIPORTRAIT_FACE_LANDMARKER", raising=False)
    metrics = {"download": False, "enabled": ["fid", "fvd", "lpips", "ssim", "psnr", "sync", "identity"],
               "random_init": {"enabled": False}, "face_landmarker": str(tmp_path / "none.task")}
    protocol = {"frames_per_clip": 8, "sanity": False}
    suite = MetricSuite.from_config(metrics, protocol)
    assert set(suite.unavailable) == {"fid", "fvd", "lpips", "sync", "landmarks", "identity"}
    assert "metrics.inception=PATH" in suite.unavailable["fid"] and "metrics.syncnet=PATH" in suite.unavailable["sync"]
    records = Manifest.load(six_test_clips).split("test")[:1]
    results = evaluate_videos(six_test_clips, records, lambda record: six_test_clips / record.video, suite, protocol)
    assert results["metrics"]["generated"]["fid"] is None and results["metrics"]["generated"]["ssim"] > 0.99
    table = markdown_table(results)
    assert "| fid ↓ | n/a |" in table and "n/a fid: no Inception-v3" in table


def test_every_protocol_composes_and_an_unknown_metric_is_an_error(tmp_path):
    _register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for option in ("default", "self_reenactment", "audio_driven"):
            cfg = compose(config_name="evaluate", overrides=[f"protocol={option}", f"paths.log_dir={tmp_path}"])
            assert cfg.protocol.name == option and cfg.protocol.fvd.clip_frames == 16
            OmegaConf.to_container(cfg.protocol, resolve=True)
        assert compose(config_name="evaluate", overrides=["protocol=audio_driven"]).protocol.generation.seed == 0
    from aniportrait.errors import AniPortraitError

    with pytest.raises(AniPortraitError, match="unknown metrics"):
        MetricSuite.from_config({"enabled": ["fid", "sharpness"]}, {}, torch.device("cpu"))

