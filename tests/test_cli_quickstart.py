"""The main job: `python train.py` trains every stage and exports one bundle (here with debug=fast)."""

import pytest

from aniportrait.bundle import Bundle

pytestmark = pytest.mark.filterwarnings("ignore")


def test_default_run_trains_both_stages_into_one_bundle(full_run):
    result = full_run  # `python train.py debug=fast data=synthetic_tiny`, shared with the tests that use its bundle
    assert result.returncode == 0, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("bundle: ")
    bundle = Bundle.open(last.removeprefix("bundle: "))
    assert bundle.has("audio2mesh", "audio2pose", "vae", "reference_unet", "denoising_unet", "pose_guider",
                      "motion_module")  # vae: model=vae fitted it first, and stage B used it frozen
    assert {"audio", "video"} <= set(bundle.settings)
    assert bundle.settings["video"]["stage"] == 2
    run_dir = bundle.path.parent
    for stage in ("vae", "audio", "video_stage1", "video_stage2"):
        assert (run_dir / "checkpoints" / stage / "last.ckpt").is_file(), stage
        assert f"| {stage}/val/" in result.stdout
    for metric in ("video/test/psnr ", "video/test/psnr_copy_reference"):  # the held-out re-animation check
        assert f"| {metric}" in result.stdout, metric
    assert list(run_dir.glob("held_out_strip_*.png"))
    assert list((run_dir / "samples").glob("*.mp4"))  # stage-B validation videos
