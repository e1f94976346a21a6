"""The fixtures made by the official pipeline (tests/fixtures/official): their configs, our modules with their
weights, their inputs, and the official preset's denoising of a case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from aniportrait.bundle import import_official
from aniportrait.models.checkpoints import load_state_dict_checked
from aniportrait.models.pose_guider import PoseGuider
from aniportrait.models.reference_unet import ReferenceNet
from aniportrait.models.unet3d import MOTION_MODULE_KEYS, UNet3DConditionModel
from aniportrait.pipelines.pose2video import Pose2VideoPipeline

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
CONFIG = json.loads((FIXTURES / "config.json").read_text())
CASES = sorted(CONFIG["cases"])


def weights(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "weights" / f"{name}.safetensors"))


def load_models() -> dict[str, torch.nn.Module]:
    """Our modules with the official fixture weights (official key layout), loaded strictly."""
    motion = CONFIG["motion"]
    reference_unet = ReferenceNet(**CONFIG["unet_2d"])
    denoising_unet = UNet3DConditionModel.from_unet2d_config(
        CONFIG["unet_2d"], motion_module_kwargs=motion["motion_module_kwargs"],
        motion_module_resolutions=motion["motion_module_resolutions"],
        motion_module_mid_block=motion["motion_module_mid_block"],
        motion_module_decoder_only=motion["motion_module_decoder_only"])
    pose_guider = PoseGuider(**CONFIG["pose_guider"])
    vae = AutoencoderKL(**CONFIG["vae"])
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CONFIG["clip"]))
    for name, module in (("reference_unet", reference_unet), ("pose_guider", pose_guider), ("vae", vae),
                         ("image_encoder", image_encoder)):
        load_state_dict_checked(module, weights(name), f"{name} (fixture)")
    load_state_dict_checked(denoising_unet, weights("denoising_unet"), "denoising_unet (fixture)",
                            allow_missing=(MOTION_MODULE_KEYS,))
    denoising_unet.load_motion_modules(weights("motion_module"))
    modules = {"vae": vae, "image_encoder": image_encoder, "reference_unet": reference_unet,
               "denoising_unet": denoising_unet, "pose_guider": pose_guider}
    return {name: module.eval() for name, module in modules.items()}


def pipeline(models, preset) -> Pose2VideoPipeline:
    return Pose2VideoPipeline(models["vae"], models["image_encoder"], CLIPImageProcessor(), models["reference_unet"],
                              models["denoising_unet"], models["pose_guider"], DDIMScheduler(**CONFIG["scheduler"]),
                              pose_scaling="official_inference", preset=preset)


def case_inputs(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(FIXTURES / f"{name}.npz") as arrays:
        return CONFIG["cases"][name], {key: arrays[key] for key in arrays.files}


def denoise(pipe: Pose2VideoPipeline, call: dict, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    return pipe.denoise(arrays["reference_image"], arrays["pose_images"], arrays["reference_pose"],
                        num_inference_steps=call["steps"], guidance_scale=call["guidance"], width=call["width"],
                        height=call["height"], generator=torch.Generator().manual_seed(call["seed"]), progress=False)


def write_official_bundle(models: dict[str, torch.nn.Module], root: Path) -> Path:
    """The fixture weights as release files (.pth) imported with ``import_official`` into ``root/bundle``; the VAE
    and image encoder saved as its base models (``root/vae``, ``root/image_encoder``)."""
    release = root / "release"
    release.mkdir()
    unet = models["denoising_unet"].state_dict()
    states = {"reference_unet.pth": models["reference_unet"].state_dict(),
              "pose_guider.pth": models["pose_guider"].state_dict(),
              "denoising_unet.pth": {k: v for k, v in unet.items() if ".motion_modules." not in k},
              "motion_module.pth": {k: v for k, v in unet.items() if ".motion_modules." in k}}
    for file, state in states.items():
        torch.save(state, release / file)
    models["vae"].save_pretrained(root / "vae")
    models["image_encoder"].save_pretrained(root / "image_encoder")
    base_models = {"kind": "sd15", "vae": str(root / "vae"), "image_encoder": str(root / "image_encoder"),
                   "local_files_only": True}
    architecture = {"reference_unet": models["reference_unet"], "pose_guider": models["pose_guider"],
                    "denoising_unet": models["denoising_unet"], "motion_module": models["denoising_unet"]}
    return import_official(release, root / "bundle", base_models=base_models, architecture=architecture).path
