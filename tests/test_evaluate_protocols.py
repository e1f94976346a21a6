"""``evaluate.py bundle=B protocol=self_reenactment|audio_driven``: generate the test clips with a bundle, then score.

Runs only where issue 5's stage-B training and pose-to-video pipeline are present (skips with the reason).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from aniportrait.audio.io import load_audio
from aniportrait.data.video import read_video

pytestmark = pytest.mark.filterwarnings("ignore")


def _stage_b_bundle(out: Path) -> Path:
    """A tiny random stage-B bundle (the exported layout of issue 5's training)."""
    video = pytest.importorskip("aniportrait.training.video", reason="stage-B training (issue 5) is not in this checkout")
    pytest.importorskip("aniportrait.pipelines.pose2video", reason="the pose-to-video pipeline (issue 5) is absent")
    tiny = {"kind": "tiny", "seed": 0}
    stage1 = video.VideoStage1Module(tiny)
    module = video.VideoStage2Module(tiny)
    module.load_stage1_from_module(stage1)
    module.data_settings = {"width": 64, "height": 64, "n_sample_frames": 16, "fps": 30.0, "pose_scaling": "unit"}
    return module.export(out)


def _merged_bundle(stage_a: Path, stage_b: Path, out: Path) -> Path:
    """Both stages in one bundle folder: the components, settings and base models of each."""
    import yaml

    out.mkdir()
    documents = [yaml.safe_load((folder / "aniportrait.yaml").read_text()) for folder in (stage_a, stage_b)]
    merged = dict(documents[1])
    for key in ("components", "settings", "base_models"):
        merged[key] = {**documents[0][key], **documents[1][key]}
    for folder in (stage_a, stage_b):
        for file in folder.glob("*.safetensors"):
            shutil.copy(file, out / file.name)
    (out / "aniportrait.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return out


@pytest.mark.parametrize("protocol", ["self_reenactment", "audio_driven"])
def test_generation_protocols_generate_the_test_clips_then_score_them(protocol, tiny_bundle, tiny_dataset, tmp_path):
    bundle = _stage_b_bundle(tmp_path / "stage_b")
    if protocol == "audio_driven":
        bundle = _merged_bundle(tiny_bundle, bundle, tmp_path / "both")
    result = run_cli("evaluate.py", f"bundle={bundle}", f"data={tiny_dataset}", f"protocol={protocol}",
                     "protocol.frames_per_clip=10", "protocol.generation.steps=1", "metrics.enabled=[ssim,psnr]",
                     "num_workers=0", env={"ANIPORTRAIT_LOGS": str(tmp_path / "logs")})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(Path(result.stdout.strip().splitlines()[-1].removeprefix("results: ")).read_text())
    assert results["protocol"]["mode"] == protocol and results["protocol"]["bundle"] == str(bundle)
    assert results["protocol"]["generation"]["steps"] == 1 and len(results["scored"]) == 3
    generated = sorted(Path(results["protocol"]["generated_dir"]).glob("*.mp4"))
    assert [path.stem for path in generated] == results["scored"]
    assert len(read_video(generated[0])) == 10 and load_audio(generated[0]).size > 0
    assert 0 < results["metrics"]["generated"]["ssim"] < 1


def test_a_generation_protocol_needs_a_stage_b_bundle(tiny_bundle, tiny_dataset, tmp_path):
    result = run_cli("evaluate.py", f"bundle={tiny_bundle}", f"data={tiny_dataset}", "protocol=self_reenactment",
                     env={"ANIPORTRAIT_LOGS": str(tmp_path / "logs")})
    assert result.returncode == 2 and result.stderr.startswith("error:") and "reference_unet" in result.stderr


def test_generation_can_change_the_bundles_sampling_scheduler():
    """protocol.generation.scheduler: e.g. the official linear betas on a bundle trained from scratch (which samples
    with its training betas); the rest of the bundle's scheduler is kept, and a setting it lacks is refused."""
    from aniportrait.errors import AniPortraitError
    from aniportrait.inference import build_sampling_scheduler
    from aniportrait.models.schedulers import INFERENCE_V2_SCHEDULER, build_scheduler

    bundle_scheduler = build_scheduler({**INFERENCE_V2_SCHEDULER, "beta_schedule": "scaled_linear"})
    key = "protocol.generation.scheduler"
    changed = build_sampling_scheduler({"_target_": "DDIMScheduler", "beta_schedule": "linear"}, bundle_scheduler, key)
    official = build_scheduler(INFERENCE_V2_SCHEDULER)
    assert type(changed) is type(official) and changed.config.prediction_type == "v_prediction"
    assert changed.alphas_cumprod.equal(official.alphas_cumprod)
    assert not changed.alphas_cumprod.equal(bundle_scheduler.alphas_cumprod)
    with pytest.raises(AniPortraitError, match="protocol.generation.scheduler.*beta_shedule"):
        build_sampling_scheduler({"_target_": "DDIMScheduler", "beta_shedule": "linear"}, bundle_scheduler, key)


def test_generation_context_frames_auto_runs_and_a_bad_value_is_named(tiny_dataset, tmp_path):
    """protocol.generation.context_frames: auto (the fewest windows; the learning benchmark's auto_windows row)
    generates the clips; a value that is neither a count nor auto is one error naming the key."""
    bundle = _stage_b_bundle(tmp_path / "stage_b")
    common = [f"bundle={bundle}", f"data={tiny_dataset}", "protocol=self_reenactment", "protocol.frames_per_clip=10",
              "protocol.generation.steps=1", "metrics.enabled=[psnr]", "num_workers=0"]
    env = {"ANIPORTRAIT_LOGS": str(tmp_path / "logs")}
    auto = run_cli("evaluate.py", *common, "protocol.generation.context_frames=auto", f"output_dir={tmp_path / 'a'}",
                   env=env)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert len(list((tmp_path / "a").rglob("*.mp4"))) == 3
    bad = run_cli("evaluate.py", *common, "protocol.generation.context_frames=many", f"output_dir={tmp_path / 'b'}",
                  env=env)
    assert bad.returncode == 2 and "protocol.generation.context_frames='many'" in bad.stderr
