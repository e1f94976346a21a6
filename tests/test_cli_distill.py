"""Stage 3 from the command line: `train.py model=video_distill model.teacher=BUNDLE` distils the quickstart's
stage 2 into a bundle whose student `infer.py fast=true` samples with; a bundle without one is a clear error."""

from __future__ import annotations

from conftest import run_cli

from aniportrait.bundle import Bundle
from aniportrait.data.video import probe_video


def test_distil_then_infer_with_the_student(full_bundle, tiny_dataset, tmp_path):
    env = {"ANIPORTRAIT_DATA": str(tiny_dataset.parent), "ANIPORTRAIT_LOGS": str(tmp_path / "logs")}
    result = run_cli("train.py", "model=video_distill", f"model.teacher={full_bundle}", "debug=fast",
                     "data=synthetic_tiny", "model.distillation.validation_teacher_steps=4", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/teacher_gap" in result.stdout
    bundle = Bundle.open(result.stdout.strip().splitlines()[-1].removeprefix("bundle: "))
    assert bundle.has("distilled_denoising_unet", "distilled_motion_module", "vae", "motion_module")
    assert bundle.settings["video"]["distilled"]["num_inference_steps"] == 4

    landmarks = next(tiny_dataset.rglob("landmarks.npz"))
    common = [f"reference={landmarks}", f"landmarks={landmarks}", "mode=pose", "length=5", "progress=false"]
    fast = run_cli("infer.py", f"bundle={bundle.path}", f"output={tmp_path / 'fast.mp4'}", "fast=true", *common)
    assert fast.returncode == 0, fast.stderr[-3000:]
    assert probe_video(tmp_path / "fast.mp4").frames == 5

    refused = run_cli("infer.py", f"bundle={full_bundle}", f"output={tmp_path / 'no.mp4'}", "fast=true", *common)
    assert refused.returncode == 2 and "has no distilled student" in refused.stderr
    assert not (tmp_path / "no.mp4").exists()
