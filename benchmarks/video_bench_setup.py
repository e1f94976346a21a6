"""Shared setup of the stage-B benchmarks (loader_speed.py, video_train_step.py, overfit_stage1.py).

* :class:`Timer`: seconds of a block (CUDA events on a GPU, the wall clock on the CPU).
* :func:`random_sd15_backbone`: SD-1.5-shaped models with random weights (UNet, VAE, CLIP ViT-L/14 image encoder),
  written once as local diffusers / transformers folders, so ``backbone.video`` of ``kind: sd15`` loads them through
  the real loading path with no download.
* :func:`sample_clip_root`: a clip-format dataset of the shared real talking-head videos with their reference
  MediaPipe landmarks (``samples/landmarks/*.npz``); frames can be held back from training by marking them
  invalid (targets and references are drawn from valid frames only). ``mesh3d`` is zero: stage B never reads it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aniportrait.bundle import OFFICIAL_SD15_UNET_CONFIG
from aniportrait.data.clip import ClipRecord, Manifest, save_landmarks

SHARED_SAMPLES = Path(os.environ.get("ANIPORTRAIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared")) / "samples"

SD15_UNET_CONFIG = OFFICIAL_SD15_UNET_CONFIG  # runwayml/stable-diffusion-v1-5 unet/config.json
# stabilityai/sd-vae-ft-mse config.json
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 256, "scaling_factor": 0.18215,
}
# lambdalabs/sd-image-variations-diffusers image_encoder/config.json (CLIP ViT-L/14 vision tower + projection)
CLIP_VIT_L14_CONFIG: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
}


class Timer:
    """Seconds of a block: CUDA events on GPU, the wall clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.seconds = cuda, 0.0

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.started


def random_sd15_backbone(folder: str | os.PathLike, width: int = 512, height: int = 512, seed: int = 0) -> dict[str, Any]:
    """``backbone.video`` settings for random-init SD-1.5-shaped models saved under ``folder`` (made once)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    done = folder / "complete"
    if not done.is_file():
        torch.manual_seed(seed)
        UNet2DConditionModel(**SD15_UNET_CONFIG).save_pretrained(folder / "unet")
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder / "vae")
        CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_CONFIG)).save_pretrained(folder / "image_encoder")
        done.write_text("random-init SD-1.5-shaped backbone\n")
    return {"kind": "sd15", "base_model": str(folder), "vae": None, "image_encoder": str(folder),
            "image_encoder_subfolder": "image_encoder", "motion_module": None, "local_files_only": True,
            "width": width, "height": height, "clip_image_processor": {}}


def sample_names(samples: Path) -> list[str]:
    """Sample videos that have reference landmarks."""
    return sorted(path.stem for path in (samples / "landmarks").glob("*.npz") if (samples / "video" / f"{path.stem}.mp4").is_file())


def sample_clip_root(samples: str | os.PathLike, out: str | os.PathLike, names: Sequence[str] | None = None,
                     held_back: dict[str, np.ndarray] | None = None) -> Path:
    """Write a clip-format root under ``out`` with the shared sample videos (linked) as train clips.

    held_back: clip name -> frame indices never used as training targets or references (marked invalid).
    """
    samples, out = Path(samples), Path(out)
    names = list(names or sample_names(samples))
    if not names:
        raise SystemExit(f"no sample videos with landmarks under {samples}: pass --samples (a copy of shared/samples)")
    records = []
    for name in names:
        video, landmarks = samples / "video" / f"{name}.mp4", samples / "landmarks" / f"{name}.npz"
        if not video.is_file() or not landmarks.is_file():
            raise SystemExit(f"{name}: need {video} and {landmarks}")
        with np.load(landmarks) as data:
            lmks, trans_mat, blendshapes = data["lmks"], data["trans_mat"], data["blendshapes"]
            detected, fps, (width, height) = data["detected"], float(data["fps"]), data["frame_size_wh"].tolist()
        frames = len(lmks)
        valid = detected.copy()
        if held_back and name in held_back:
            valid[held_back[name]] = False
        clip = out / "clips" / name
        clip.mkdir(parents=True, exist_ok=True)
        link = clip / "video.mp4"
        if not link.exists():
            link.symlink_to(video.resolve())
        save_landmarks(clip / "landmarks.npz", {"lmks": lmks, "mesh3d": np.zeros((frames, 468, 3), np.float32),
                                                "trans_mat": trans_mat, "blendshapes": blendshapes, "valid": valid})
        records.append(ClipRecord(id=name, split="train", identity=name, fps=fps, frames=frames, width=int(width),
                                  height=int(height), duration_s=frames / fps, source="shared/samples",
                                  video=f"clips/{name}/video.mp4", landmarks=f"clips/{name}/landmarks.npz"))
    Manifest(out, records).save()
    return out
