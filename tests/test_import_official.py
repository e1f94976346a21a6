"""`python -m aniportrait.bundle import-official`: official release files (.pt/.pth in the official key layout)
become bundles that infer.py and the API load; files of another architecture are refused with their keys listed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_cli, shared_path
from omegaconf import OmegaConf

from aniportrait.bundle import OFFICIAL_FILES, Bundle, component_architecture, import_official
from aniportrait.cli import bundle as bundle_command
from aniportrait.data.clip import Manifest
from aniportrait.data.video import probe_video
from aniportrait.errors import AniPortraitError
from aniportrait.models.audio2mesh import Audio2Mesh
from aniportrait.models.audio2pose import Audio2Pose
from aniportrait.models.video_backbone import build_video_models
from aniportrait.models.wav2vec2 import upgrade_weight_norm_keys
from aniportrait.pipelines.pose2video import INFERENCE_V2_SCHEDULER, Pose2VideoPipeline

pytestmark = pytest.mark.filterwarnings("ignore")

TINY_BASE_MODELS = {"kind": "tiny", "seed": 0}


@pytest.fixture(scope="module")
def tiny_modules() -> dict[str, torch.nn.Module]:
    """Random tiny models of every released component (the motion modules live in the denoising UNet)."""
    audio = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "backbone" / "tiny.yaml").audio)
    torch.manual_seed(0)
    video = build_video_models(TINY_BASE_MODELS)
    audio2mesh = Audio2Mesh(wav2vec2_config=audio["config"], latent_dim=audio["latent_dim"])
    torch.nn.init.normal_(audio2mesh.out_fn.weight, std=0.01)  # zero-initialised heads would hide a failed load
    return {"audio2mesh": audio2mesh,
            "audio2pose": Audio2Pose(wav2vec2_config=audio["config"], latent_dim=audio["pose_latent_dim"]),
            "reference_unet": video.reference_unet, "denoising_unet": video.denoising_unet,
            "motion_module": video.denoising_unet, "pose_guider": video.pose_guider}


def _official_state(name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the official training scripts save: the stage-1 UNet without, motion_module.pth only, motion modules."""
    state = module.state_dict()
    if name in ("denoising_unet", "motion_module"):
        return {key: value for key, value in state.items() if (".motion_modules." in key) == (name == "motion_module")}
    return state


def _legacy_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The torch < 2.1 spelling of wav2vec2's weight norm, as the released audio .pt files likely have it."""
    return {key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                  "weight_v"): value
            for key, value in state.items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_modules):
    """A folder laid out like the release: audio2mesh.pt with today's keys, audio2pose.pt with legacy ones."""
    folder = tmp_path_factory.mktemp("release")
    for name, file in OFFICIAL_FILES.items():
        state = _official_state(name, tiny_modules[name])
        torch.save(_legacy_weight_norm(state) if name == "audio2pose" else state, folder / file)
    assert any(key.endswith("weight_g") for key in torch.load(folder / "audio2pose.pt", weights_only=True))
    return folder


@pytest.fixture(scope="module")
def imported(release, tiny_modules, tmp_path_factory) -> Bundle:
    out = tmp_path_factory.mktemp("bundles") / "official"
    result = import_official(release, out, base_models=TINY_BASE_MODELS, architecture=tiny_modules)
    assert set(result.found) == set(OFFICIAL_FILES) and result.missing == ()
    return Bundle.open(result.path)


def test_every_release_file_loads_bit_exactly_with_the_official_settings(imported, tiny_modules):
    for name in ("audio2mesh", "audio2pose", "reference_unet", "pose_guider"):
        loaded = imported.load(name).state_dict()
        expected = tiny_modules[name].state_dict()
        assert loaded.keys() == expected.keys(), name
        assert all(torch.equal(loaded[key], expected[key]) for key in expected), name
    pipeline = Pose2VideoPipeline.from_bundle(imported, "cpu")  # the denoising UNet with its motion modules
    unet = tiny_modules["denoising_unet"].state_dict()
    assert all(torch.equal(value, unet[key]) for key, value in pipeline.denoising_unet.state_dict().items())
    audio, video = imported.settings["audio"], imported.settings["video"]
    assert audio["fps"] == 30 and audio["pose"]["rotation_scale"] == 0.5 and audio["pose"]["smooth_window"] == 7
    assert audio["pose"]["chunk_frames"] == 150 and audio["pose"]["context_frames"] > 0
    assert video["pose_scaling"] == "official_inference" and video["scheduler"] == INFERENCE_V2_SCHEDULER
    assert video["sampling"] == "official" and pipeline.preset.name == "official"  # infer.py needs no flag for it
    assert (video["num_inference_steps"], video["guidance_scale"], video["fps"]) == (25, 3.5, 30)
    assert (video["width"], video["height"], video["context_frames"], video["context_overlap"]) == (512, 512, 16, 4)
    assert imported.base_models["video"] == TINY_BASE_MODELS and "wav2vec2-base-960h" in imported.base_models["wav2vec2"]


def test_imported_bundle_animates_through_infer_py(imported, tiny_dataset, tmp_path):
    record = Manifest.load(tiny_dataset).split("test")[0]
    output = tmp_path / "official.mp4"
    result = run_cli("infer.py", "mode=audio", f"bundle={imported.path}", f"audio={tiny_dataset / record.audio}",
                     f"reference={tiny_dataset / record.landmarks}", f"output={output}", "width=64", "height=64",
                     "steps=1", "length=6", "progress=false", env={"ANIPORTRAIT_LOGS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    info = probe_video(output)
    assert (info.frames, info.width, info.height, info.fps, info.has_audio) == (6, 64, 64, 30, True)


def test_a_subset_imports_and_the_command_says_what_it_found(release, tiny_modules, tmp_path, capsys):
    partial = tmp_path / "audio_only"
    partial.mkdir()
    for file in ("audio2mesh.pt", "audio2pose.pt"):
        (partial / file).symlink_to(release / file)
    architecture = tmp_path / "architecture"
    import_official(release, architecture, base_models=TINY_BASE_MODELS, architecture=tiny_modules)
    assert bundle_command(["import-official", str(partial), str(tmp_path / "b"), "--architecture-from", str(architecture),
                 "--link"]) == 0
    out = capsys.readouterr().out
    assert "found: audio2mesh.pt -> audio2mesh, audio2pose.pt -> audio2pose" in out
    assert "not found (the bundle lacks them): reference_unet.pth, denoising_unet.pth, motion_module.pth, pose_guider.pth" in out
    bundle = Bundle.open(out.strip().splitlines()[-1].removeprefix("bundle: "))
    assert set(bundle.components) == {"audio2mesh", "audio2pose"} and "video" not in bundle.settings
    assert bundle.components["audio2mesh"]["file"] == str((partial / "audio2mesh.pt").resolve())  # linked, not copied
    assert not list(bundle.path.glob("*.safetensors"))
    assert torch.equal(bundle.load("audio2mesh").out_fn.weight, tiny_modules["audio2mesh"].out_fn.weight)


def test_a_file_of_another_architecture_is_refused_with_its_keys(release, tiny_modules, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save(tiny_modules["pose_guider"].state_dict(), wrong / "reference_unet.pth")
    with pytest.raises(AniPortraitError, match=r"reference_unet \(.*reference_unet\.pth\).*missing keys: conv_in\.weight"
                                               r".*unexpected keys: scale, conv_layers\.0\.weight"):
        import_official(wrong, tmp_path / "never", architecture=tiny_modules)
    assert not (tmp_path / "never").exists()
    assert bundle_command(["import-official", str(wrong), str(tmp_path / "never")]) == 2  # the official SD-1.5 architecture
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: reference_unet") and "missing keys" in error[0]
    assert not (tmp_path / "never").exists()


def test_a_folder_without_release_files_names_them(tmp_path):
    with pytest.raises(AniPortraitError, match="none of the official release files.*audio2mesh.pt.*ZJYang/AniPortrait"):
        import_official(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", list(OFFICIAL_FILES))
def test_official_architecture_has_the_release_keys_and_shapes(name):
    """The architecture import-official checks against (built on the meta device) equals the release manifests."""
    manifest = json.loads(shared_path("reference", "official_checkpoints", f"{name}.json").read_text())
    state = component_architecture(name).state_dict()
    ours = {key: list(value.shape) for key, value in state.items() if name != "motion_module" or "motion_module" in key}
    assert ours == manifest
    if name in ("audio2mesh", "audio2pose"):
        legacy = json.loads(shared_path("reference", "official_checkpoints",
                                        f"{name}.legacy_weight_norm.json").read_text())
        assert set(upgrade_weight_norm_keys({key: torch.empty(0) for key in legacy})) == set(ours)
