"""``model=vae``: fit the backbone's AutoencoderKL on the dataset's frames, for backbones without a pretrained VAE.

SD-1.5's VAE is pretrained; the random-init backbones (``tiny``, ``small``) have none, and a random VAE
reconstructs nothing, so stage B could not learn through it. This stage trains one the way SD's VAE was trained,
minus the perceptual and adversarial terms (their networks are pretrained weights this project cannot assume)::

    posterior = encode(x)                    x: frames in [-1, 1], (b, 3, H, W)
    z         ~ posterior                    (b, 4, H/8, W/8)
    loss      = mean |decode(z) - x|  +  kl_weight * KL(posterior || N(0, I)) / (3 H W)

(the LDM autoencoder's L1 reconstruction and KL weight, with both terms averaged per pixel). It sets
``scaling_factor = 1 / std`` of the latents (how SD's 0.18215 was chosen), so the diffusion stages see unit-variance
latents: measured over ``calibration_batches`` training batches when training ends (a running estimate during
training, which checkpoints carry). Later stages use the result frozen, exactly where SD's VAE would
be: ``model=all`` hands it over in memory, ``backbone.video.vae=BUNDLE`` names an exported one, and stage-B bundles
carry it as their ``vae`` component.

Validation: ``val/l1`` and ``val/psnr`` of the posterior-mean reconstructions of the validation clips' frames.

Opt-in switches (both off by default): ``train_patch_size`` fits random square patches of every training frame
instead of whole frames, as SD's autoencoder was fitted on crops (a 128 px patch holds a quarter of a 256 px frame's
pixels); validation and the scaling factor still use whole frames. ``channels_last`` stores the convolution weights
and activations NHWC (the same function). For backbone=small on an H200 both measured worse (benchmarks/README.md):
the patch-fitted VAE reconstructed whole frames 1 dB worse in the same two minutes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from aniportrait.bundle import export_bundle, load_vae
from aniportrait.errors import AniPortraitError
from aniportrait.models.video_backbone import RANDOM_BACKBONES, build_frozen_encoders
from aniportrait.training.schedules import with_scheduler

__all__ = ["VAEModule", "VAE_LOSS"]

VAE_LOSS: dict[str, Any] = {"l1": 1.0, "mse": 0.0, "kl_weight": 1.0e-6}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


class VAEModule(pl.LightningModule):
    """Trains ``backbone``'s AutoencoderKL (random init, or fine-tunes ``backbone.vae``) on frames.

    loss: ``l1`` and ``mse`` reconstruction weights and ``kl_weight`` (SD: 1e-6), see the module docstring.
    scaling_momentum: EMA momentum of the running latent statistics (checkpoints); calibration_batches: training
    batches the final ``scaling_factor`` is measured on. train_patch_size, channels_last: see the module docstring.
    """

    def __init__(self, backbone: Mapping[str, Any], loss: Mapping[str, Any] | None = None,
                 optimizer: Mapping[str, Any] | None = None, scheduler: Mapping[str, Any] | None = None,
                 scaling_momentum: float = 0.9, calibration_batches: int = 8, seed: int = 0,
                 callbacks: Mapping[str, Any] | None = None, train_patch_size: int | None = None,
                 channels_last: bool = False):
        super().__init__()
        self.save_hyperparameters({"backbone": _plain(backbone), "loss": _plain(loss), "optimizer": _plain(optimizer),
                                   "scheduler": _plain(scheduler), "scaling_momentum": scaling_momentum,
                                   "calibration_batches": calibration_batches, "seed": seed,
                                   "callbacks": _plain(callbacks), "train_patch_size": train_patch_size,
                                   "channels_last": bool(channels_last)})
        if train_patch_size is not None and (int(train_patch_size) <= 0 or int(train_patch_size) % 8):
            raise AniPortraitError(f"model.train_patch_size={train_patch_size}: a positive multiple of 8 (the VAE "
                                   "downsamples by 8), or null for whole frames")
        backbone = dict(self.hparams.backbone or {})
        if backbone.get("kind") not in RANDOM_BACKBONES:
            raise AniPortraitError(
                f"model=vae fits the VAE of a random-init backbone ({', '.join(sorted(RANDOM_BACKBONES))}); "
                f"backbone.video.kind={backbone.get('kind')!r} brings its own pretrained VAE (backbone.video.vae)"
            )
        given = dict(self.hparams.loss or {})
        unknown = sorted(set(given) - set(VAE_LOSS))
        if unknown:
            raise AniPortraitError(f"model.loss has unknown keys {unknown}; known: {sorted(VAE_LOSS)}")
        self.loss_weights = {**VAE_LOSS, **given}
        if backbone.get("vae"):  # fine-tune a trained one
            self.vae = load_vae(backbone["vae"], "backbone.video.vae")
        else:
            self.vae = build_frozen_encoders(backbone)[0]
        self.vae.requires_grad_(True).train()
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if not 0.0 <= float(scaling_momentum) < 1.0:
            raise AniPortraitError(f"model.scaling_momentum={scaling_momentum}: expected a value in [0, 1)")
        # running first and second moments of the sampled latents (checkpointed with the module)
        self.register_buffer("latent_moments", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.register_buffer("moments_seen", torch.tensor(0, dtype=torch.long))
        self.data_settings: dict[str, Any] = {}
        self.last_validated_step = -1

    # -- data and steps ------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "settings"):
            self.data_settings = dict(datamodule.settings)

    @staticmethod
    def _frames(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Every frame of the batch, targets and references: (n, 3, H, W) in [-1, 1]."""
        return torch.cat([batch["pixel_values"].flatten(0, 1), batch["reference_image"]])

    def _generator(self, stream: int, device: torch.device | str | None = None) -> torch.Generator:
        """Posterior noise seeded by (seed, stream, step, rank): a resumed run draws what an uninterrupted one did."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        seed = np.random.SeedSequence([int(self.hparams.seed), stream, int(self.global_step), rank]).generate_state(1)[0]
        return torch.Generator(device=self.device if device is None else device).manual_seed(int(seed))

    def _loss(self, frames: torch.Tensor, stream: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        posterior = self.vae.encode(frames).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=self._generator(stream), device=self.device)
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        reconstruction = self.vae.decode(latents).sample.float()
        weights = self.loss_weights
        l1 = F.l1_loss(reconstruction, frames.float())
        mse = F.mse_loss(reconstruction, frames.float())
        kl = posterior.kl().float().mean() / frames[0].numel()  # per-sample sum over latents, per pixel
        loss = weights["l1"] * l1 + weights["mse"] * mse + weights["kl_weight"] * kl
        return loss, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach(), "latents": latents.detach()}

    def _patches(self, frames: torch.Tensor) -> torch.Tensor:
        """(n, 3, P, P) random patches of (n, 3, H, W) frames, one place per frame, seeded by (seed, step, rank);
        the frames themselves when ``train_patch_size`` is null or not smaller than them."""
        size = self.hparams.train_patch_size
        height, width = frames.shape[-2:]
        if size is None or (int(size) >= height and int(size) >= width):
            return frames
        size = int(size)
        if size > height or size > width:
            raise AniPortraitError(f"model.train_patch_size={size} is larger than the {height} x {width} frames")
        corners = torch.rand(len(frames), 2, generator=self._generator(3, device="cpu"))
        tops = (corners[:, 0] * (height - size + 1)).long().tolist()
        lefts = (corners[:, 1] * (width - size + 1)).long().tolist()
        return torch.stack([frame[:, top : top + size, left : left + size]
                            for frame, top, left in zip(frames, tops, lefts)])

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        frames = self._patches(self._frames(batch))
        if self.hparams.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)
        loss, parts = self._loss(frames, stream=0)
        self._track_latents(parts["latents"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(frames))
        self.log("train/l1", parts["l1"], batch_size=len(frames))
        return loss

    @torch.no_grad()
    def _track_latents(self, latents: torch.Tensor) -> None:
        values = latents.double()
        current = torch.stack([values.mean(), (values**2).mean()])
        if self.trainer.world_size > 1:  # the same statistics on every rank
            current = self.all_gather(current).mean(0)
        momentum = float(self.hparams.scaling_momentum) if int(self.moments_seen) > 0 else 0.0
        self.latent_moments.mul_(momentum).add_(current * (1.0 - momentum))
        self.moments_seen += 1

    def scaling_factor(self) -> float:
        """1 / std of the latents seen in training (SD's 0.18215 was found this way)."""
        mean, second = (float(value) for value in self.latent_moments)
        return 1.0 / math.sqrt(max(second - mean * mean, 1e-12))

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        frames = self._frames(batch)
        reconstruction = self.vae.decode(self.vae.encode(frames).latent_dist.mean).sample.float().clamp(-1, 1)
        l1 = F.l1_loss(reconstruction, frames.float())
        mse = ((reconstruction - frames.float()) ** 2).mean(dim=(1, 2, 3))  # images in [-1, 1]: peak-to-peak 2
        psnr = (10.0 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean()
        self.log("val/l1", l1, batch_size=len(frames), sync_dist=True)
        self.log("val/psnr", psnr, batch_size=len(frames), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step

    @torch.no_grad()
    def on_train_end(self) -> None:
        """Measure the latents' statistics on training batches with the final weights (the running ones lag)."""
        count = int(self.hparams.calibration_batches)
        datamodule = getattr(self.trainer, "datamodule", None)
        if count > 0 and datamodule is not None:
            was_training = self.vae.training
            self.vae.eval()
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # sum, sum of squares, count
            for index, batch in enumerate(datamodule.train_dataloader()):
                if index >= count:
                    break
                frames = self._frames(batch).to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    posterior = self.vae.encode(frames).latent_dist
                    noise = torch.randn(posterior.mean.shape, generator=self._generator(2 + index), device=self.device)
                    latents = (posterior.mean + posterior.std * noise.to(posterior.mean.dtype)).double()
                sums += torch.stack([latents.sum(), (latents**2).sum(), torch.tensor(float(latents.numel()),
                                                                                    device=self.device)])
            if self.trainer.world_size > 1:
                sums = self.all_gather(sums).sum(0)
            if sums[2] > 0:
                self.latent_moments.copy_(torch.stack([sums[0] / sums[2], sums[1] / sums[2]]))
                self.moments_seen += 1
            self.vae.train(was_training)
        self._set_scaling_factor()

    def _set_scaling_factor(self) -> None:
        if int(self.moments_seen) > 0:
            self.vae.register_to_config(scaling_factor=self.scaling_factor())

    # -- optimisation --------------------------------------------------------------------------------------

    def configure_optimizers(self):
        config = dict(self.hparams.optimizer or {"_target_": "torch.optim.AdamW", "lr": 1.0e-4})
        optimizer = hydra.utils.instantiate(config, params=list(self.vae.parameters()))
        return with_scheduler(self, optimizer, self.hparams.scheduler)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [hydra.utils.instantiate(config) for config in (self.hparams.callbacks or {}).values() if config]

    # -- checkpoints and export ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["aniportrait"] = {"module_class": f"{type(self).__module__}.{type(self).__qualname__}",
                                     "data_settings": self.data_settings}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.data_settings = dict(checkpoint.get("aniportrait", {}).get("data_settings", {}))

    def trained_vae(self) -> torch.nn.Module:
        """The fitted VAE with its scaling factor set (what later stages use frozen)."""
        self._set_scaling_factor()
        return self.vae

    def bundle_parts(self) -> tuple[dict, dict, dict, dict]:
        """(components, state_dicts, settings, base_models) for :func:`aniportrait.bundle.export_bundle`."""
        vae = self.trained_vae()
        settings = {"vae": {"scaling_factor": float(vae.config.scaling_factor), "steps": int(self.global_step),
                            "width": self.data_settings.get("width"), "height": self.data_settings.get("height")}}
        return {"vae": vae}, {"vae": {key: value.float() for key, value in vae.state_dict().items()}}, settings, {}

    def export(self, out_dir: str | Path, provenance: dict | None = None) -> Path:
        components, state_dicts, settings, base_models = self.bundle_parts()
        return export_bundle(out_dir, components, settings=settings, base_models=base_models, provenance=provenance,
                             state_dicts=state_dicts)
