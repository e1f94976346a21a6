"""Precomputed latents (model.loader.latent_cache): the cache holds what the pixel path computes, a step on it gives
the pixel path's loss (float32 cache), building resumes and rebuilds what is stale, a stage trains on it, and the
augmentations it cannot hold are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_video_training import TINY, datamodule, trainer

from aniportrait.data.sources import ClipSource
from aniportrait.errors import AniPortraitError
from aniportrait.training.latent_cache import ensure_latent_cache
from aniportrait.training.video import VideoStage1Module, VideoStage2Module


@pytest.fixture
def source(tiny_dataset: Path, tmp_path: Path) -> ClipSource:
    """A copy of the session's tiny dataset: cache files are written into the clip folders."""
    return ClipSource(str(shutil.copytree(tiny_dataset, tmp_path / "data")))


def _pair(source, **settings):
    pixels, cached = datamodule(source, batch_size=4, **settings), datamodule(source, batch_size=4, latent_cache=True,
                                                                             latent_cache_dtype="float32", **settings)
    pixels.setup("fit"), cached.setup("fit")
    return pixels, cached


@pytest.mark.parametrize("module_class,settings,uncond_clip", [
    (VideoStage1Module, {}, "zero_image"),
    (VideoStage2Module, {"n_sample_frames": 4, "sample_rate": 2}, "zero_embedding"),
])
def test_a_step_on_the_cache_computes_the_pixel_paths_loss(source, module_class, settings, uncond_clip):
    pixels, cached = _pair(source, **settings)
    module = module_class(TINY, loss={"uncond_per_sample": True, "uncond_ratio": 0.5, "uncond_clip": uncond_clip})
    module.eval()
    counts = ensure_latent_cache(cached.datasets.values(), module.frozen.vae, module.frozen.image_encoder,
                                 dtype="float32", progress=False)
    assert counts["built"] == len({dataset.latent_cache_path(i) for dataset in cached.datasets.values()
                                   for i in range(len(dataset.records))}) and counts["kept"] == 0
    batch, cached_batch = next(iter(pixels.train_dataloader())), next(iter(cached.train_dataloader()))
    assert "pixel_values" not in cached_batch and cached_batch["latent_mean"].shape[1] == batch["pixel_values"].shape[1]
    torch.testing.assert_close(cached_batch["pose_images"], batch["pose_images"])
    with torch.no_grad():
        expected = module._diffusion_loss(batch, stream=0, allow_uncond=True)
        loss = module._diffusion_loss(cached_batch, stream=0, allow_uncond=True)
        # the comparison can tell: another stream draws other noise and timesteps
        other = module._diffusion_loss(cached_batch, stream=1, allow_uncond=True)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert abs(float(other) - float(expected)) > 1e-4


def test_building_resumes_and_rebuilds_what_is_stale(source, tmp_path):
    _, cached = _pair(source)
    module = VideoStage1Module(TINY)
    datasets = list(cached.datasets.values())
    first = ensure_latent_cache(datasets, module.frozen.vae, module.frozen.image_encoder, progress=False)
    again = ensure_latent_cache(datasets, module.frozen.vae, module.frozen.image_encoder, progress=False)
    assert again == {"built": 0, "kept": first["built"] + first["kept"]}
    path = datasets[0].latent_cache_path(0)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("mean").dtype == torch.float16 and handle.metadata()["dtype"] == "float16"
        frames = handle.get_tensor("mean").shape[0]
    assert frames == datasets[0].records[0].frames
    path.write_bytes(b"torn")  # a stopped write, or another VAE, is rebuilt; nothing else is
    with torch.no_grad():
        module.frozen.vae.decoder.conv_out.bias.add_(1.0)  # the decoder is not in the cache's fingerprint: kept
    assert ensure_latent_cache(datasets, module.frozen.vae, module.frozen.image_encoder, progress=False)["built"] == 1
    with torch.no_grad():
        module.frozen.vae.quant_conv.bias.add_(0.5)  # the posterior changes: every file is stale
    rebuilt = ensure_latent_cache(datasets, module.frozen.vae, module.frozen.image_encoder, progress=False)
    assert rebuilt == {"built": first["built"] + first["kept"], "kept": 0}
    shares = [ensure_latent_cache(datasets, module.frozen.vae, module.frozen.image_encoder, dtype="bfloat16", rank=rank,
                                  world_size=2, progress=False)["built"] for rank in (0, 1)]
    assert sum(shares) == rebuilt["built"] and min(shares) > 0  # ranks split the clips


def test_a_stage_builds_its_cache_and_trains_on_it(source, tmp_path):
    module = VideoStage1Module(TINY, optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3}, eight_bit_adam=False)
    data = datamodule(source, batch_size=2, latent_cache=True)
    trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    assert all(dataset.latent_cache_path(index).is_file() for dataset in data.datasets.values()
               for index in range(len(dataset.records)))


def test_auto_reads_a_complete_cache_and_encodes_pixels_otherwise(source, tmp_path):
    """model.loader.latent_cache=auto (stages 1 and 2's default): without files, or with one missing, or with
    augmentations the cache cannot hold, the steps encode pixels and nothing is written; once a run with true has
    built every file, a run with auto reads them (and rewrites none)."""
    def fit(name, **settings):
        module = VideoStage1Module(TINY, optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-3}, eight_bit_adam=False)
        data = datamodule(source, batch_size=2, **settings)
        trainer(tmp_path / name, max_steps=1).fit(module, datamodule=data)
        return data

    def files(data):
        return sorted({dataset.latent_cache_path(i) for dataset in data.datasets.values()
                       for i in range(len(dataset.records))})

    data = fit("none", latent_cache="auto")
    assert not data.datasets["train"].latent_cache and not any(path.exists() for path in files(data))
    built = fit("build", latent_cache=True)
    stamps = {path: path.stat().st_mtime_ns for path in files(built)}
    data = fit("auto", latent_cache="auto")
    assert data.datasets["train"].latent_cache and data.datasets["val"].latent_cache
    assert "latent_mean" in next(iter(data.train_dataloader()))
    assert {path: path.stat().st_mtime_ns for path in files(data)} == stamps
    jittered = fit("jitter", latent_cache="auto", color_jitter=[0.2, 0.0, 0.0, 0.0])  # no error: pixels
    assert not jittered.datasets["train"].latent_cache
    train_files = sorted({data.datasets["train"].latent_cache_path(i) for i in range(len(data.datasets["train"].records))})
    train_files[0].unlink()
    assert not fit("partial", latent_cache="auto").datasets["train"].latent_cache
    with pytest.raises(AniPortraitError, match="latent_cache='yes'"):
        datamodule(source, latent_cache="yes")


def test_augmentations_the_cache_cannot_hold_are_refused(source):
    for settings in ({"horizontal_flip": 0.5}, {"color_jitter": [0.2, 0.0, 0.0, 0.0]}, {"crop_scale": [0.8, 1.0]}):
        with pytest.raises(AniPortraitError, match="latent_cache"):
            datamodule(source, latent_cache=True, **settings).setup("fit")
    data = datamodule(source, latent_cache=True)
    data.setup("fit")
    with pytest.raises(AniPortraitError, match="no precomputed latents"):
        data.datasets["train"][0]


def test_the_loader_keys_compose(tmp_path):
    """model.loader.latent_cache / latent_cache_dtype reach the datamodule of stages 1 and 2."""
    from hydra import compose, initialize_config_dir

    from aniportrait.data.video_frames import VideoFrameDataModule

    config_dir = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        for model in ("video_stage1", "video_stage2"):
            cfg = compose(config_name="train", overrides=[f"model={model}", "backbone=tiny",
                                                         "model.loader.latent_cache=true"])
            assert cfg.model.loader.latent_cache is True and cfg.model.loader.latent_cache_dtype == "float16"
            loader = VideoFrameDataModule(ClipSource(str(tmp_path)), **{
                key: value for key, value in cfg.model.loader.items() if key not in ("_target_", "source")})
            assert loader.dataset_options["latent_cache"] is True and loader.latent_cache_dtype == "float16"
            default = compose(config_name="train", overrides=[f"model={model}", "backbone=tiny"])
            assert default.model.loader.latent_cache == "auto"
            loader = VideoFrameDataModule(ClipSource(str(tmp_path)), **{
                key: value for key, value in default.model.loader.items() if key not in ("_target_", "source")})
            assert loader.latent_cache_mode == "auto" and loader.dataset_options["latent_cache"] is False


def test_the_fingerprint_does_not_depend_on_the_memory_format():
    """A VAE turned channels-last (trainer=gpu's stage-1 default at SD-1.5 widths) keeps its cache: the same
    weights, the same fingerprint; other weights, another."""
    import torch

    from aniportrait.training.latent_cache import fingerprint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 4, 1))
    before = fingerprint(net)
    net.to(memory_format=torch.channels_last)
    assert fingerprint(net) == before
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(net) != before
