"""The ``official`` sampling preset against fixtures made by the official pipeline itself (tests/fixtures/official,
made by its make.py with the official code and stack): the same weights and inputs give the official latents
(1e-4), frames (1 uint8 level) and float frames (1e-4), for 40 frames in 4 windows, another step count and
guidance, a non-square reference and output, pose images of another size, and no guidance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from official_fixtures import CASES, case_inputs, denoise, load_models, pipeline
from PIL import Image
from transformers import CLIPImageProcessor

from aniportrait.pipelines.context import uniform_context_windows
from aniportrait.pipelines.presets import SAMPLING_PRESETS


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return load_models()


@pytest.mark.parametrize("name", CASES)
def test_official_preset_gives_the_official_latents_and_frames(models, name):
    call, arrays = case_inputs(name)
    pipe = pipeline(models, "official")
    latents = denoise(pipe, call, arrays)
    torch.testing.assert_close(latents, torch.from_numpy(arrays["latents"]), atol=1e-4, rtol=0)
    frames = np.concatenate(list(pipe.decode(latents, output_type="uint8")))
    assert frames.shape == arrays["video_uint8"].shape
    assert np.abs(frames.astype(np.int16) - arrays["video_uint8"]).max() <= 1
    assert (frames != arrays["video_uint8"]).mean() < 0.01  # off by one level only where the float sits on a level
    floats = np.concatenate(list(pipe.decode(latents[:, :, arrays["float_frames"]], output_type="float")))
    np.testing.assert_allclose(floats, arrays["video_float"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["long", "non_square"])
def test_reference_reaches_the_vae_and_clip_as_official(models, name):
    """The VAE's reference latents and the CLIP embedding (non-square reference, other size than the output)."""
    call, arrays = case_inputs(name)
    pipe = pipeline(models, "official")
    pixels, clip_image = pipe._reference_inputs(arrays["reference_image"], call["height"], call["width"])
    with torch.no_grad():
        latents = models["vae"].encode(pixels).latent_dist.mean
        embeds = pipe._clip_embeds(clip_image)[:, 0]
    torch.testing.assert_close(latents, torch.from_numpy(arrays["reference_latents"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(embeds, torch.from_numpy(arrays["clip_embeds"]), atol=1e-5, rtol=0)


def test_clip_processor_leaves_a_224_image_as_it_is():
    """The official CLIP input is the reference stretched to 224 x 224; the processor's own resize and centre crop
    must then change nothing (true for the installed transformers: its torchvision backend included)."""
    processor = CLIPImageProcessor()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt").pixel_values[0]
    expected = (np.asarray(image, np.float32) / 255 - np.array(processor.image_mean, np.float32)) / np.array(
        processor.image_std, np.float32)
    torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6, rtol=0)


def test_every_official_choice_matters_here(models):
    """Without any one of the official choices the parity test above fails: the latents then miss the official
    ones by more than its tolerance (1e-4), so it checks each of them."""
    official = SAMPLING_PRESETS["official"]
    variants = {
        "long": {"project preset": SAMPLING_PRESETS["project"],
                 "blended windows": dataclasses.replace(official, context_schedule="blended"),
                 "float32 reference bank": dataclasses.replace(official, reference_bank_dtype=None)},
        "non_square": {"area-resampled reference": dataclasses.replace(official, reference_resampling="area"),
                       "CLIP on the resized reference": dataclasses.replace(official, clip_input="resized_reference"),
                       "area-resampled poses": dataclasses.replace(official, pose_resampling="area")},
        "no_guidance": {"blended windows (averaged)": dataclasses.replace(official, context_schedule="blended")},
    }
    errors = {}
    for name, presets in variants.items():
        call, arrays = case_inputs(name)
        expected = torch.from_numpy(arrays["latents"])
        for label, preset in presets.items():
            errors[f"{name}: {label}"] = (denoise(pipeline(models, preset), call, arrays) - expected).abs().max().item()
    assert min(errors.values()) > 1e-4, errors  # (the ReferenceNet's [uncond; cond] batch changes only rounding)


def test_uniform_windows_follow_the_official_order():
    assert uniform_context_windows(12, 16, 4) == [list(range(12))]
    windows = uniform_context_windows(40, 16, 4)
    assert [window[0] for window in windows] == [0, 12, 24, 36]
    assert windows[-1] == [36, 37, 38, 39, *range(12)]  # closed loop: the last window wraps to the start
    assert all(len(window) == 16 for window in windows)
