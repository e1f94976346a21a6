"""Stage B training: the two official AniPortrait stages as LightningModules.

* :class:`VideoStage1Module`: single frames; trains the ReferenceNet (minus ``up_blocks.3``, as official), the
  denoising UNet's 2-D part (built without motion modules) and the PoseGuider. VAE and CLIP are frozen.
* :class:`VideoStage2Module`: 16-frame clips; trains only the motion modules. Everything else is frozen (in eval
  mode, so its weights and BatchNorm statistics stay bit-identical) and comes from stage 1 (``model.stage1``, or
  :meth:`VideoStage2Module.load_stage1_from_module` in a multi-stage run).

One training step (``_diffusion_loss``), as the official ``train_stage_{1,2}.py``::

    latents  = VAE(frames) * scaling                       (b, 4, f, h, w)   posterior sample
    noise    = N(0, I) + noise_offset * N(0, I) per channel
    t        ~ U{0, ..., 999};  x_t = add_noise(latents, noise, t);  target = v (or noise)
    uncond   ~ Bernoulli(uncond_ratio)                      whole batch (official) or per sample
    CLIP     = image_encoder(reference; zeros if uncond)    (b, 1, D)
    bank     = ReferenceNet(VAE(reference), t=0, CLIP)      skipped (empty bank) where uncond
    pred     = UNet3D(x_t, t, CLIP, PoseGuider(pose, reference pose), reading the bank)
    loss     = mean_b( min(SNR_t (+1 for v), gamma) / SNR_t * mean(|pred - target|^2) )

A sample's randomness (VAE posterior sample, noise, timestep, reference dropout when per sample) comes from generators
seeded by ``(seed, sample number)``: a resumed run repeats an uninterrupted run's losses exactly, and DDP ranks
holding parts of a batch draw what one process holding all of it would (with ``trainer.sync_batchnorm`` for the
PoseGuider's BatchNorm, as conf/trainer/ddp.yaml sets).

The VAE and CLIP image encoder are not registered submodules: checkpoints and exported bundles hold only what
trains (and, in stage 2, the frozen stage-1 weights); they are moved to the device on first use, in the
training precision's half dtype under mixed precision (the official code keeps them in fp16).

Validation: ``val/loss`` on fixed samples with fixed noise (no reference dropout), and :class:`ValidationVideos`
(configured under ``model.callbacks``) samples a few short videos with DDIM into mp4 files (and Weights & Biases).
Exported bundles hold ``reference_unet``, ``denoising_unet`` (2-D keys only, the official layout),
``pose_guider``, and after stage 2 ``motion_module``; with EMA on and ``ema.export: true`` these are the EMA
weights (the raw weights stay in the Lightning checkpoints).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.strategies import DDPStrategy
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from aniportrait.bundle import BUNDLE_FILE, Bundle, export_bundle, load_component_weights, load_vae
from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpointing import parse_checkpointing, random_modules, set_gradient_checkpointing
from aniportrait.models.checkpoints import load_state_dict_checked, read_checkpoint
from aniportrait.models.reference_attention import ReferenceAttentionControl
from aniportrait.models.unet3d import MOTION_MODULE_KEYS
from aniportrait.models.video_backbone import RANDOM_BACKBONES, build_video_models
from aniportrait.pipelines.pose2video import INFERENCE_V2_SCHEDULER, Pose2VideoPipeline, build_scheduler
from aniportrait.training.graphed import GraphedPrediction, conditional_prediction, use_cuda_graphs
from aniportrait.training.schedules import with_scheduler

__all__ = ["VideoStage1Module", "VideoStage2Module", "ValidationVideos", "ParameterEMA",
           "OFFICIAL_TRAIN_NOISE_SCHEDULER", "OFFICIAL_LOSS", "OFFICIAL_OPTIMIZER", "DEFAULT_SAMPLING"]

log = logging.getLogger(__name__)

# train_stage_{1,2}.py: DDIMScheduler(noise_scheduler_kwargs + zero-SNR settings) with beta_schedule forced to
# scaled_linear for the training noise (the validation/inference scheduler keeps the config's, linear in v2).
OFFICIAL_TRAIN_NOISE_SCHEDULER: dict[str, Any] = {
    "_target_": "diffusers.DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
}
# configs/train/stage{1,2}.yaml; uncond_clip "zero_image": train_stage_*.py zeroes the CLIP *pixels* of an
# unconditional step (inference uses a zero *embedding*: "zero_embedding").
OFFICIAL_LOSS: dict[str, Any] = {"noise_offset": 0.05, "snr_gamma": 5.0, "uncond_ratio": 0.1,
                                 "uncond_per_sample": False, "uncond_clip": "zero_image"}
OFFICIAL_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.AdamW", "lr": 1.0e-5, "betas": [0.9, 0.999],
                                      "weight_decay": 1.0e-2, "eps": 1.0e-8}
DEFAULT_SAMPLING: dict[str, Any] = {"scheduler": INFERENCE_V2_SCHEDULER, "num_inference_steps": 25,
                                    "guidance_scale": 3.5, "context_frames": "auto", "context_overlap": 4}
_EMA_DEFAULTS: dict[str, Any] = {"decay": None, "export": True}
# model.performance: the plain path, plus CUDA graphs wherever they apply (auto: they compute the same function);
# see _apply_performance_settings and benchmarks/README.md.
_PERFORMANCE_DEFAULTS: dict[str, Any] = {"channels_last": False, "compile": None, "cuda_graphs": "auto",
                                         "compile_vae_encoder": False}
_STAGE1_COMPONENTS = ("reference_unet", "denoising_unet", "pose_guider")
_UNCOND_CLIP = ("zero_image", "zero_embedding")


def _shards_parameters(trainer: pl.Trainer) -> bool:
    """FSDP and DeepSpeed ZeRO-3 keep only a shard of every parameter on each rank."""
    strategy = type(trainer.strategy).__name__
    return strategy == "FSDPStrategy" or (strategy == "DeepSpeedStrategy" and trainer.strategy.zero_stage_3)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def resolve_channels_last(setting: bool | str, device_type: str, backbone_kind: str | None) -> bool:
    """``model.performance.channels_last``: true / false, or auto: NHWC on CUDA at SD-1.5 widths, where it measured
    faster (an H200: part of graphs_fast, 1.08-1.23x the default step, benchmarks/README.md); not at backbone=small's
    widths, where it measured 1.14x slower, nor on the CPU. The same function either way."""
    if setting in (True, False):
        return setting
    if setting != "auto":
        raise AniPortraitError(f"model.performance.channels_last={setting!r}: expected true, false or auto")
    chosen = device_type == "cuda" and backbone_kind == "sd15"
    log.info("model.performance.channels_last=auto: %s (device %s, backbone %s)", "on" if chosen else "off",
             device_type, backbone_kind)
    return chosen


def resolve_compile_vae_encoder(setting: bool | str, device_type: str) -> bool:
    """``model.performance.compile_vae_encoder``: true / false, or auto: on CUDA, where the compiled channels-last
    encoder measured 1.5x the eager one (8 images at 512 px on an H200: 31 against 47 ms, 19 s to compile;
    benchmarks/results/encoder_speed.json); not on the CPU. The same posterior up to rounding."""
    if setting in (True, False):
        return setting
    if setting != "auto":
        raise AniPortraitError(f"model.performance.compile_vae_encoder={setting!r}: expected true, false or auto")
    chosen = device_type == "cuda"
    log.info("model.performance.compile_vae_encoder=auto: %s (device %s)", "on" if chosen else "off", device_type)
    return chosen


# Strategies whose optimizer is torch's own on the device (DeepSpeed and FSDP may shard or offload its states)
_FUSED_ADAMW_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")


def auto_fused_adamw(config: Mapping[str, Any], device_type: str, strategy: str | None,
                     precision: str | None = None) -> bool:
    """Whether torch.optim.AdamW gets ``fused=True``: on CUDA, one device or DDP, not under fp16 mixed precision
    (there a fused AdamW unscales the gradients itself, and Lightning then cannot clip them first), unless the
    config chose ``fused`` or ``foreach`` itself. The fused kernel computes the same update in one launch for all
    parameters (the step is launch-bound: benchmarks/README.md)."""
    return (config.get("_target_") == "torch.optim.AdamW" and device_type == "cuda"
            and "fused" not in config and "foreach" not in config
            and (strategy is None or strategy in _FUSED_ADAMW_STRATEGIES)
            and not str(precision or "").startswith("16"))


def _settings(name: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``given``; a key the defaults lack is a typo, named in the error."""
    given = dict(_plain(given) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise AniPortraitError(f"model.{name} has unknown keys {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


@dataclass
class FrozenEncoders:
    """VAE and CLIP image encoder: frozen, never exported, kept out of the module tree (and its checkpoints)."""

    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    clip_image_processor: CLIPImageProcessor

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        self.vae.to(device=device, dtype=dtype)
        self.image_encoder.to(device=device, dtype=dtype)


class ParameterEMA:
    """Exponential moving average of named parameters: fp32 shadows on the parameters' device."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise AniPortraitError(f"model.ema.decay={decay}: expected a value in (0, 1), e.g. 0.9999, or null (off)")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, named_parameters: Sequence[tuple[str, torch.Tensor]]) -> None:
        if not self.shadow:
            self.shadow = {name: param.detach().float().clone() for name, param in named_parameters}
            return
        shadows = [self.shadow[name] for name, _ in named_parameters]
        if shadows[0].device != named_parameters[0][1].device:  # restored from a checkpoint on the CPU
            self.shadow = {name: tensor.to(named_parameters[0][1].device) for name, tensor in self.shadow.items()}
            shadows = [self.shadow[name] for name, _ in named_parameters]
        torch._foreach_lerp_(shadows, [param.detach().float() for _, param in named_parameters], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.shadow = {name: tensor.float() for name, tensor in state.items()}


class _VideoDiffusionModule(pl.LightningModule):
    """What both stages share; the subclasses say what trains and where the initial weights come from."""

    stage: int

    def __init__(self, hparams: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({key: _plain(value) for key, value in hparams.items()})
        hp = self.hparams
        self.loss_settings = _settings("loss", hp.loss, OFFICIAL_LOSS)
        if self.loss_settings["uncond_clip"] not in _UNCOND_CLIP:
            raise AniPortraitError(f"model.loss.uncond_clip={self.loss_settings['uncond_clip']!r}: expected one of "
                                   f"{_UNCOND_CLIP}")
        self.sampling = _settings("sampling", hp.sampling, DEFAULT_SAMPLING)
        self.ema_settings = _settings("ema", hp.ema, _EMA_DEFAULTS)
        self.performance = _settings("performance", hp.get("performance"), _PERFORMANCE_DEFAULTS)
        self.init_sources = dict(hp.init or {})
        self.noise_scheduler = build_scheduler(hp.noise_scheduler or OFFICIAL_TRAIN_NOISE_SCHEDULER)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise AniPortraitError(f"model.noise_scheduler.prediction_type={self.prediction_type!r}: training supports "
                                   "'epsilon' and 'v_prediction'")

        backbone = dict(hp.backbone or {})
        random_init = backbone.get("kind") in RANDOM_BACKBONES
        trained_vae = load_vae(backbone["vae"], "backbone.video.vae") if random_init and backbone.get("vae") else None
        try:
            models = build_video_models(backbone, use_motion_module=self.stage == 2,
                                        motion_module_kwargs=hp.get("motion_module"), pose_guider_kwargs=hp.pose_guider,
                                        vae=trained_vae)
        except AniPortraitError as error:  # the models name backbone.<key>; the config nests them under video
            raise AniPortraitError(str(error).replace("backbone.", "backbone.video.")) from error
        self.reference_unet = models.reference_unet
        self.denoising_unet = models.denoising_unet
        self.pose_guider = models.pose_guider
        self.frozen = FrozenEncoders(models.vae.requires_grad_(False).eval(),
                                     models.image_encoder.requires_grad_(False).eval(), models.clip_image_processor)
        self.vae_trained = models.vae_trained
        # a trained VAE of a random-init backbone travels in the bundle (fp32, as fitted; the frozen copy may be cast)
        self._vae_export: dict[str, torch.Tensor] | None = (
            self._vae_state(models.vae) if random_init and models.vae_trained else None)
        self.reference_control = ReferenceAttentionControl(self.reference_unet, self.denoising_unet)
        self._set_trainable()
        checkpointing = parse_checkpointing(hp.gradient_checkpointing)  # true, false, or resolution levels
        if checkpointing:
            set_gradient_checkpointing(self.denoising_unet, checkpointing)
            if self.stage == 1:
                set_gradient_checkpointing(self.reference_unet, checkpointing)
        decay = self.ema_settings["decay"]
        self.ema = ParameterEMA(decay) if decay else None
        self.data_settings: dict[str, Any] = {}  # from the datamodule: fps, size, frames, pose scaling
        self._weights_initialised = False
        self._performance_applied = False
        self._graphed_prediction: GraphedPrediction | None = None
        self.last_validated_step = -1
        self.train()  # frozen modules to eval mode (Lightning restores per-module modes after validation)

    # -- what trains ---------------------------------------------------------------------------------------

    def _set_trainable(self) -> None:
        raise NotImplementedError

    def _frozen_modules(self) -> list[torch.nn.Module]:
        """Registered modules that stay in eval mode during training."""
        return []

    def train(self, mode: bool = True) -> _VideoDiffusionModule:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def _trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, param) for name, param in self.named_parameters() if param.requires_grad]

    # -- the frozen VAE ------------------------------------------------------------------------------------

    @staticmethod
    def _vae_state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {key: value.detach().float().cpu().clone() for key, value in vae.state_dict().items()}

    def use_vae(self, vae: torch.nn.Module) -> None:
        """Use a trained VAE (``model=vae``'s, or a stage-1 bundle's) frozen, in place of the backbone's."""
        self.frozen.vae = copy.deepcopy(vae).requires_grad_(False).eval()
        self.vae_trained = True
        self._vae_export = self._vae_state(vae)

    def inherit(self, previous: Mapping[str, pl.LightningModule]) -> None:
        """Take over what earlier stages of a multi-stage run trained: the VAE of ``model=vae``."""
        if not dict(self.hparams.backbone or {}).get("vae"):
            for module in previous.values():
                if hasattr(module, "trained_vae"):
                    self.use_vae(module.trained_vae())

    def _check_vae(self) -> None:
        if dict(self.hparams.backbone or {}).get("require_trained_vae") and not self.vae_trained:
            kind = dict(self.hparams.backbone).get("kind")
            raise AniPortraitError(
                f"backbone.video.vae is not set: backbone {kind!r} has no pretrained VAE and a random one reconstructs "
                "nothing. Fit one first (`python train.py model=vae backbone=...`, or model=all, which runs it before "
                "stage B) and set backbone.video.vae=<the bundle it prints>"
            )

    # -- setup and initial weights -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "settings"):
            self.data_settings = dict(datamodule.settings)
            self._check_clip_image_size()
        if self._trainer is not None:
            self._check_strategy()
        if self.ema is not None and self._trainer is not None and _shards_parameters(self.trainer):
            raise AniPortraitError(f"model.ema works with single-device and DDP training, not with "
                                   f"{type(self.trainer.strategy).__name__}: set model.ema.decay=null")
        if stage == "fit" and not self._weights_initialised:
            self._initialise_weights()
        self._weights_initialised = True
        if stage == "fit":
            self._check_vae()
        self._apply_performance_settings()

    def _apply_performance_settings(self) -> None:
        """``model.performance``: channels-last convolution weights (tensor-core friendly NHWC kernels) and
        ``torch.compile`` of the trained networks (fewer, fused kernels: the step is launch-bound). Both compute
        the same function as the plain path (tests/training/test_video_performance.py)."""
        if self._performance_applied:
            return
        self._performance_applied = True
        trained = (self.reference_unet, self.denoising_unet, self.pose_guider)
        self.performance["channels_last"] = resolve_channels_last(
            self.performance["channels_last"], self._device_type(), dict(self.hparams.backbone or {}).get("kind"))
        if self.performance["channels_last"]:  # not the frozen VAE: its eager encoder is slower in NHWC (47 -> 63 ms)
            for module in trained:
                module.to(memory_format=torch.channels_last)
        self.performance["compile_vae_encoder"] = resolve_compile_vae_encoder(
            self.performance["compile_vae_encoder"], self._device_type())
        options = self.performance["compile"]
        if options is not None and options is not False:  # True or a dict of torch.compile options ({} = defaults)
            options = {} if options is True else dict(options)
            for module in trained:
                module.compile(**options)
        if self.performance["cuda_graphs"] is not False:
            self._capture_cuda_graphs_later()

    def _device_type(self) -> str:
        """Where the module trains: the trainer's root device (set up before the module is moved), else its own."""
        return self._trainer.strategy.root_device.type if self._trainer is not None else self.device.type

    def _capture_cuda_graphs_later(self) -> None:
        """``model.performance.cuda_graphs``: the conditional prediction is captured at the first training step
        (aniportrait/training/graphed.py); with true, the settings it cannot honour are refused here, before
        training; with auto, they keep the eager step (logged)."""
        trainer = self._trainer
        if trainer is None:  # a module stepped by hand (tests): its own device, full precision
            device, strategy, accumulate, precision = self.device.type, "SingleDeviceStrategy", 1, "32-true"
        else:
            device, strategy = trainer.strategy.root_device.type, type(trainer.strategy).__name__
            accumulate, precision = trainer.accumulate_grad_batches, str(trainer.precision)
        if not use_cuda_graphs(self.performance["cuda_graphs"], device_type=device, strategy=strategy,
                               compile_options=self.performance["compile"], accumulate_grad_batches=accumulate,
                               gradient_checkpointing=any(unet.is_gradient_checkpointing  # what the nets do
                                                          for unet in (self.reference_unet, self.denoising_unet)),
                               uncond_per_sample=bool(self.loss_settings["uncond_per_sample"]),
                               random_modules=random_modules(self.reference_unet, self.denoising_unet)):
            return
        autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self._graphed_prediction = GraphedPrediction(self.pose_guider, self.reference_unet, self.denoising_unet,
                                                     self.reference_control, autocast)

    def _check_strategy(self) -> None:
        """Stage 1 skips the ReferenceNet on reference-dropout steps (as official): DDP must expect unused parameters,
        else it fails at the first such step, possibly hours in; say so before training starts."""
        strategy = self.trainer.strategy
        expects_unused = getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)  # Lightning's DDP kwargs
        if self.stage == 1 and isinstance(strategy, DDPStrategy) and self.loss_settings["uncond_ratio"] > 0 and not expects_unused:
            raise AniPortraitError(
                "stage 1 under DDP: reference-dropout steps leave the ReferenceNet unused, which DDP must be told about: "
                "set trainer.strategy=ddp_find_unused_parameters_true (the official script sets find_unused_parameters)"
            )

    def _check_clip_image_size(self) -> None:
        data_size = self.data_settings.get("clip_image_size")
        model_size = self.frozen.image_encoder.config.image_size
        if data_size is not None and data_size != model_size:
            raise AniPortraitError(
                f"the loader's CLIP preprocessing crops to {data_size} px but the image encoder takes {model_size} px: "
                "set model.loader.clip_image_processor to the backbone's (backbone.video.clip_image_processor)"
            )

    def _initialise_weights(self) -> None:
        raise NotImplementedError

    def _load_init(self, component: str) -> None:
        """Fine-tuning source ``model.init.<component>``: an official .pth/.pt, a .safetensors or a bundle folder."""
        source = self.init_sources.get(component)
        if not source:
            return
        if component == "motion_module":
            state: Any = Bundle.open(source).state_dict("motion_module") if Path(source).is_dir() else source
            self.denoising_unet.load_motion_modules(state)
        else:
            allow = (MOTION_MODULE_KEYS,) if component == "denoising_unet" and self.stage == 2 else ()
            load_component_weights(getattr(self, component), source, component, allow_missing=allow)
        log.info("%s initialised from %s", component, source)

    # -- one step ------------------------------------------------------------------------------------------

    def _frozen_dtype(self) -> torch.dtype:
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision.startswith("bf16"):
            return torch.bfloat16
        return torch.float16 if precision.startswith("16") else torch.float32

    def _prepare_frozen(self) -> None:
        vae = self.frozen.vae
        dtype = self._frozen_dtype()
        if vae.device != self.device or vae.dtype != dtype:
            self.frozen.to(self.device, dtype)

    def _generators(self, batch: Mapping[str, torch.Tensor], stream: int) -> tuple[list[torch.Generator],
                                                                                     list[torch.Generator]]:
        """Per sample, (CPU, device) generators seeded by (seed, stream, sample number): a sample's noise, timestep and
        dropout do not depend on how samples are batched or sharded over ranks."""
        seeds = [int(np.random.SeedSequence([int(self.hparams.seed), stream, int(number)]).generate_state(1)[0])
                 for number in batch["sample_index"].tolist()]
        return ([torch.Generator().manual_seed(seed) for seed in seeds],
                [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds])

    def _randn(self, shape: Sequence[int], generators: list[torch.Generator]) -> torch.Tensor:
        """(b, *shape) standard normal noise, sample i from generator i."""
        return torch.stack([torch.randn(tuple(shape), generator=generator, device=self.device) for generator in generators])

    def _sample_latents(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(b n, 3, H, W) in [-1, 1], n images per sample -> (b n, 4, h, w) scaled latents sampled from the VAE
        posterior (official), each sample's noise from its generator."""
        encode = self._vae_encoder()
        posteriors = [encode(chunk) for chunk in images.split(int(self.hparams.vae_batch_size))]
        mean = torch.cat([posterior.mean for posterior in posteriors]).float()
        std = torch.cat([posterior.std for posterior in posteriors]).float()
        return self._posterior_sample(mean, std, generators)

    def _vae_encoder(self) -> Callable[[torch.Tensor], DiagonalGaussianDistribution]:
        """Images -> the frozen VAE's posterior: ``vae.encode``, or with ``model.performance.compile_vae_encoder`` a
        compiled channels-last copy of its encoder and quant_conv (the same function; pipelines keep the eager VAE),
        made again when the VAE, its device or its dtype change."""
        vae = self.frozen.vae
        if not self.performance.get("compile_vae_encoder"):
            return lambda images: vae.encode(images.to(vae.dtype)).latent_dist
        key = (id(vae), vae.device, vae.dtype)
        if getattr(self, "_compiled_vae_encoder", (None, None))[0] != key:
            layers = torch.nn.Sequential(vae.encoder, vae.quant_conv if vae.quant_conv is not None else torch.nn.Identity())
            layers = copy.deepcopy(layers).to(memory_format=torch.channels_last).requires_grad_(False).eval()
            self._compiled_vae_encoder = (key, torch.compile(layers))
        layers = self._compiled_vae_encoder[1]

        def encode(images: torch.Tensor) -> DiagonalGaussianDistribution:
            with torch.no_grad():
                return DiagonalGaussianDistribution(layers(images.to(vae.dtype).contiguous(memory_format=torch.channels_last)))
        return encode

    def _posterior_sample(self, mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(b n, 4, h, w) posterior mean and std -> scaled latents, each sample's noise from its generator."""
        eps = self._randn((len(mean) // len(generators), *mean.shape[1:]), generators).flatten(0, 1)
        return (mean.to(eps.device).float() + std.to(eps.device).float() * eps) * self.frozen.vae.config.scaling_factor

    def _batch_latents(self, batch: Mapping[str, torch.Tensor], generators: list[torch.Generator],
                       uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target latents (b, 4, f, h, w), reference latents (b, 4, h, w) and CLIP embeddings (b, 1, D) of a batch:
        encoded from its pixels, or drawn from its precomputed posteriors (``model.loader.latent_cache``) with the
        same noise."""
        if "latent_mean" in batch:
            batch_size, num_frames = batch["latent_mean"].shape[:2]
            latents = self._posterior_sample(batch["latent_mean"].flatten(0, 1), batch["latent_std"].flatten(0, 1),
                                             generators)
            reference_latents = self._posterior_sample(batch["reference_latent_mean"], batch["reference_latent_std"],
                                                       generators)
            clip_embeds = self._cached_clip_embeds(batch["clip_embeds"], uncond)
        else:
            batch_size, num_frames = batch["pixel_values"].shape[:2]
            latents = self._sample_latents(batch["pixel_values"].flatten(0, 1), generators)  # (b f, 4, h, w)
            reference_latents = self._sample_latents(batch["reference_image"], generators)  # (b, 4, h, w)
            clip_embeds = self._clip_embeds(batch["clip_image"], uncond)  # (b, 1, D)
        return latents.unflatten(0, (batch_size, num_frames)).transpose(1, 2), reference_latents, clip_embeds

    def _cached_clip_embeds(self, embeds: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """(b, D) precomputed embeddings -> (b, 1, D), unconditional samples per ``loss.uncond_clip`` as
        :meth:`_clip_embeds` makes them (``zero_image``: the encoder's embedding of a zero image, computed here)."""
        embeds = embeds.to(self.device).float()
        drop = uncond.to(self.device)[:, None]
        if self.loss_settings["uncond_clip"] == "zero_image" and bool(drop.any()):
            encoder = self.frozen.image_encoder
            key = (encoder.device, encoder.dtype)
            if getattr(self, "_zero_image_embeds", (None, None))[0] != key:  # once per device and dtype
                size = int(encoder.config.image_size)
                zeros = torch.zeros(1, 3, size, size, device=encoder.device, dtype=encoder.dtype)
                self._zero_image_embeds = (key, encoder(zeros).image_embeds.float())
            embeds = torch.where(drop, self._zero_image_embeds[1].to(self.device).expand_as(embeds), embeds)
        elif self.loss_settings["uncond_clip"] == "zero_embedding":
            embeds = torch.where(drop, torch.zeros_like(embeds), embeds)
        return embeds.unsqueeze(1)

    def _latent_cache_datasets(self) -> list[Any]:
        """The datamodule's datasets that read precomputed latents (none without a trainer)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return [dataset for dataset in getattr(datamodule, "datasets", {}).values()
                if getattr(dataset, "latent_cache", False)]

    def _build_latent_cache(self) -> None:
        """``model.loader.latent_cache``: every clip's posteriors and CLIP embeddings, built where missing or stale
        (each rank its share), before the first step reads them."""
        from aniportrait.training.latent_cache import ensure_latent_cache

        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "latent_cache_mode", False) == "auto":
            self._use_prepared_latents(datamodule)
            return
        datasets = self._latent_cache_datasets()
        if not datasets:
            return
        self._prepare_frozen()
        ensure_latent_cache(datasets, self.frozen.vae, self.frozen.image_encoder,
                            dtype=str(getattr(datamodule, "latent_cache_dtype", "float16")),
                            batch_size=int(self.hparams.vae_batch_size), rank=self.trainer.global_rank,
                            world_size=self.trainer.world_size, progress=self.trainer.is_global_zero)
        self.trainer.strategy.barrier("latent_cache")

    def _use_prepared_latents(self, datamodule: Any) -> None:
        """``model.loader.latent_cache: auto``: the train and val datasets read precomputed latents when every one of
        their clips has a file made by this stage's VAE and image encoder at this size (logged either way); they
        encode pixels otherwise. The same samples either way, up to the cache dtype's rounding (float16's mantissa
        is finer than the bf16 a trainer=gpu encoder computes in)."""
        from aniportrait.training.latent_cache import cache_coverage

        datasets = [datamodule.datasets[split] for split in ("train", "val") if split in datamodule.datasets]
        blockers = [blocker for blocker in (dataset.latent_cache_blocker() for dataset in datasets) if blocker]
        if not datasets or blockers:
            log.info("model.loader.latent_cache=auto: the steps encode pixels (%s)", blockers[0] if blockers else
                     "no datasets")
            return
        self._prepare_frozen()
        dtype = str(getattr(datamodule, "latent_cache_dtype", "float16"))
        matching, needed = cache_coverage(datasets, self.frozen.vae, self.frozen.image_encoder, dtype)
        if matching < needed:
            log.info("model.loader.latent_cache=auto: %d of %d clips have precomputed latents made by this VAE and "
                     "image encoder (%s), so the steps encode pixels; model.loader.latent_cache=true builds the "
                     "rest once, and later runs read them", matching, needed, dtype)
            return
        for dataset in datasets:
            dataset.latent_cache = True
        log.info("model.loader.latent_cache=auto: every clip (%d) has precomputed latents made by this VAE and "
                 "image encoder (%s): the steps read them instead of encoding pixels", needed, dtype)

    def _clip_embeds(self, clip_images: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """(b, 3, S, S) CLIP pixels -> (b, 1, D) embeddings; unconditional samples per ``loss.uncond_clip``."""
        drop = uncond.to(clip_images.device)
        encoder = self.frozen.image_encoder
        if self.loss_settings["uncond_clip"] == "zero_image":
            clip_images = torch.where(drop[:, None, None, None], torch.zeros_like(clip_images), clip_images)
        embeds = encoder(clip_images.to(encoder.dtype)).image_embeds.float()  # (b, D)
        if self.loss_settings["uncond_clip"] == "zero_embedding":
            embeds = torch.where(drop[:, None], torch.zeros_like(embeds), embeds)
        return embeds.unsqueeze(1)

    def _draw_uncond(self, generators: list[torch.Generator]) -> torch.Tensor:
        """(b,) bool on the CPU: which samples train the unconditional (reference-free) branch for CFG."""
        ratio = float(self.loss_settings["uncond_ratio"])
        if self.loss_settings["uncond_per_sample"]:
            return torch.cat([torch.rand(1, generator=generator) for generator in generators]) < ratio
        return (torch.rand(1, generator=generators[0]) < ratio).expand(len(generators))

    def _predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, reference_latents: torch.Tensor,
                 clip_embeds: torch.Tensor, pose_images: torch.Tensor, reference_pose: torch.Tensor,
                 uncond: torch.Tensor) -> torch.Tensor:
        """The denoising UNet's prediction (b, 4, f, h, w), reading the ReferenceNet's tokens where conditional."""
        if bool(uncond.all()):  # official: an unconditional step skips the ReferenceNet and reads an empty bank
            pose_features = self.pose_guider(pose_images.transpose(1, 2), reference_pose)  # 5 x (b, C, f, h, w)
            self.reference_control.clear()
            return self.denoising_unet(noisy_latents, timesteps, clip_embeds, pose_cond_fea=pose_features).sample
        inputs = (noisy_latents, timesteps, reference_latents, clip_embeds, pose_images, reference_pose)
        if self._graphed_prediction is not None and not bool(uncond.any()) and self.training and torch.is_grad_enabled():
            return self._graphed_prediction(*inputs)
        return conditional_prediction(self.pose_guider, self.reference_unet, self.denoising_unet, self.reference_control,
                                      *inputs, uncond_mask=uncond if uncond.any() else None)

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (b,) (ones when ``loss.snr_gamma`` is 0 or null)."""
        gamma = self.loss_settings["snr_gamma"]
        if not gamma:
            return torch.ones(len(timesteps), device=timesteps.device)
        snr = compute_snr(self.noise_scheduler, timesteps)
        if self.prediction_type == "v_prediction":
            snr = snr + 1.0  # official: the velocity objective adds one before dividing
        return torch.where(snr > 0, snr.clamp(max=float(gamma)) / snr.clamp(min=1e-12), torch.ones_like(snr))

    def _diffusion_loss(self, batch: Mapping[str, torch.Tensor], stream: int, allow_uncond: bool) -> torch.Tensor:
        cpu_generators, generators = self._generators(batch, stream)
        batch_size = len(batch["sample_index"])
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=generator) for generator in cpu_generators])
        timesteps = timesteps.to(self.device)  # (b,)
        uncond = self._draw_uncond(cpu_generators) if allow_uncond else torch.zeros(batch_size, dtype=torch.bool)
        self._prepare_frozen()
        with torch.no_grad():
            latents, reference_latents, clip_embeds = self._batch_latents(batch, generators, uncond)

        noise = self._randn(latents.shape[1:], generators)  # (b, 4, f, h, w)
        if self.loss_settings["noise_offset"]:
            offset = self._randn((latents.shape[1], 1, 1, 1), generators)  # one shift per sample and channel
            noise = noise + float(self.loss_settings["noise_offset"]) * offset
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)

        prediction = self._predict(noisy_latents, timesteps, reference_latents, clip_embeds, batch["pose_images"],
                                   batch["reference_pose"], uncond)
        per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3, 4))  # (b,)
        return (per_sample * self._snr_weights(timesteps)).mean()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._diffusion_loss(batch, stream=0, allow_uncond=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["sample_index"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.reference_control.clear()  # the bank held the graph until backward had run

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer's step, then the EMA's: inside the training batch, so that a checkpoint written at its end
        (callbacks run before the module's batch-end hook) holds every update (a resumed run's EMA is the same)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self._trainable_named_parameters())

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._diffusion_loss(batch, stream=1, allow_uncond=False)  # fixed noise per sample: comparable runs
        self.reference_control.clear()
        self.log("val/loss", loss, batch_size=len(batch["sample_index"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_validated_step = self.global_step

    # -- optimisation --------------------------------------------------------------------------------------

    def _use_eight_bit_adam(self, optimizer_target: str) -> bool:
        """``model.eight_bit_adam``: true (bitsandbytes AdamW8bit or an error), false, or auto (8-bit where it runs;
        the decision is logged)."""
        choice = self.hparams.eight_bit_adam
        if choice is False:
            return False
        is_adamw = optimizer_target == "torch.optim.AdamW"
        installed = importlib.util.find_spec("bitsandbytes") is not None
        if choice is True:
            if not is_adamw:
                raise AniPortraitError(f"model.eight_bit_adam=true replaces torch.optim.AdamW with bitsandbytes' "
                                       f"AdamW8bit, but model.optimizer._target_ is {optimizer_target}")
            if not installed:
                raise AniPortraitError("model.eight_bit_adam=true but bitsandbytes is not installed: `pip install "
                                       "bitsandbytes` (CUDA), or set model.eight_bit_adam=false (or auto)")
            return True
        if choice != "auto":
            raise AniPortraitError(f"model.eight_bit_adam={choice!r}: expected true, false or auto")
        reasons = [reason for failed, reason in ((not is_adamw, f"the optimizer is {optimizer_target}"),
                                                 (not installed, "bitsandbytes is not installed"),
                                                 (self.device.type != "cuda", f"the device is {self.device.type}"))
                   if failed]
        if reasons:
            log.warning("model.eight_bit_adam=auto: using %s, not 8-bit AdamW, because %s", optimizer_target,
                        " and ".join(reasons))
            return False
        log.info("model.eight_bit_adam=auto: using bitsandbytes AdamW8bit")
        return True

    def configure_optimizers(self):
        config = dict(self.hparams.optimizer or OFFICIAL_OPTIMIZER)
        if self._use_eight_bit_adam(config.get("_target_", "")):
            config["_target_"] = "bitsandbytes.optim.AdamW8bit"
        elif auto_fused_adamw(config, self._device_type(),
                              type(self._trainer.strategy).__name__ if self._trainer is not None else None,
                              str(self._trainer.precision) if self._trainer is not None else None):
            config["fused"] = True
            log.info("torch.optim.AdamW with fused=True (one kernel for all parameters, the same update; set "
                     "model.optimizer.fused=false or foreach=true for the multi-tensor one)")
        optimizer = hydra.utils.instantiate(config, params=[param for _, param in self._trainable_named_parameters()])
        return with_scheduler(self, optimizer, self.hparams.scheduler)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning refuses to clip before a fused optimizer (under fp16 such optimizers unscale internally).
        Without a gradient scaler (bf16 or fp32) the gradients are final here, so clip them directly."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and not str(self.trainer.precision).startswith("16"):
            parameters = [p for p in self.parameters() if p.grad is not None]
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(parameters, float(gradient_clip_val))
            else:
                torch.nn.utils.clip_grad_value_(parameters, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [hydra.utils.instantiate(config) for config in (self.hparams.callbacks or {}).values() if config]

    # -- checkpoints ---------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["aniportrait"] = {"module_class": f"{type(self).__module__}.{type(self).__qualname__}",
                                     "data_settings": self.data_settings,
                                     "ema": self.ema.state_dict() if self.ema is not None else None}

    def on_fit_start(self) -> None:
        if getattr(self, "_stage1_missing", False) and not getattr(self, "_restored_from_checkpoint", False):
            raise AniPortraitError(
                "model.stage1 is not set: stage 2 trains only the motion modules on top of trained stage-1 weights. "
                "Set model.stage1=PATH to a stage-1 bundle folder (the `bundle: ...` a model=video_stage1 run prints), "
                "a stage-1 Lightning checkpoint (.ckpt), or a folder with the official reference_unet.pth, "
                "denoising_unet.pth and pose_guider.pth"
            )
        self._build_latent_cache()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored_from_checkpoint = True
        info = checkpoint.get("aniportrait", {})
        self.data_settings = dict(info.get("data_settings", {}))
        if self.ema is not None and info.get("ema"):
            self.ema.load_state_dict(info["ema"])
        self._weights_initialised = True  # the checkpoint holds the weights

    # -- sampling and export -------------------------------------------------------------------------------

    def sampling_pipeline(self) -> Pose2VideoPipeline:
        """A pipeline on this module's models (current weights; frozen encoders on this device)."""
        self._prepare_frozen()
        return Pose2VideoPipeline(
            self.frozen.vae, self.frozen.image_encoder, self.frozen.clip_image_processor, self.reference_unet,
            self.denoising_unet, self.pose_guider, build_scheduler(self.sampling["scheduler"]),
            pose_scaling=self.data_settings.get("pose_scaling", "unit"), reference_control=self.reference_control,
        )

    def _exported_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per stage-B module, the weights to export: EMA shadows where EMA is on and exported."""
        use_ema = self.ema is not None and self.ema.shadow and self.ema_settings["export"]
        result = {}
        for name in _STAGE1_COMPONENTS:
            state = getattr(self, name).state_dict()
            if use_ema:
                prefix = f"{name}."
                for key, tensor in self.ema.shadow.items():
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = tensor.to(state[key[len(prefix):]].dtype)
            result[name] = state
        return result

    def exported_sampling(self) -> dict[str, Any]:
        """The sampling settings the bundle records as its default (a distilled student adds its own beside)."""
        return self.sampling

    def bundle_settings(self) -> dict[str, Any]:
        data = self.data_settings
        sampling = self.exported_sampling()
        return {"video": {
            "stage": self.stage,
            "width": data.get("width"),
            "height": data.get("height"),
            "frames_per_clip": data.get("n_sample_frames"),
            "sample_rate": data.get("sample_rate"),
            "fps": data.get("fps"),
            "pose_scaling": data.get("pose_scaling", "unit"),
            "scheduler": dict(sampling["scheduler"]),
            "num_inference_steps": sampling["num_inference_steps"],
            "guidance_scale": sampling["guidance_scale"],
            "context_frames": sampling["context_frames"],
            "context_overlap": sampling["context_overlap"],
            "weights": "ema" if self.ema is not None and self.ema_settings["export"] else "raw",
        }}

    def base_models(self) -> dict[str, Any]:
        """The frozen base models a bundle needs besides its own weights (the backbone, minus what it replaces)."""
        return {"video": {key: value for key, value in dict(self.hparams.backbone).items() if key != "motion_module"}}

    def bundle_parts(self) -> tuple[dict[str, torch.nn.Module], dict[str, dict[str, torch.Tensor]], dict, dict]:
        """(components, state_dicts, settings, base_models) for :func:`aniportrait.bundle.export_bundle`, so a
        multi-stage run can merge them with stage A's into one bundle."""
        states = self._exported_state_dicts()
        unet_state = states["denoising_unet"]
        components: dict[str, torch.nn.Module] = {name: getattr(self, name) for name in _STAGE1_COMPONENTS}
        state_dicts = {
            "reference_unet": states["reference_unet"],
            "denoising_unet": {key: value for key, value in unet_state.items() if ".motion_modules." not in key},
            "pose_guider": states["pose_guider"],
        }
        if self.stage == 2:
            components["motion_module"] = self.denoising_unet
            state_dicts["motion_module"] = {key: value for key, value in unet_state.items() if ".motion_modules." in key}
        if self._vae_export is not None:
            components["vae"] = self.frozen.vae
            state_dicts["vae"] = self._vae_export
        return components, state_dicts, self.bundle_settings(), self.base_models()

    def export(self, out_dir: str | Path, provenance: dict | None = None) -> Path:
        components, state_dicts, settings, base_models = self.bundle_parts()
        return export_bundle(out_dir, components, settings=settings, base_models=base_models, provenance=provenance,
                             state_dicts=state_dicts)


class VideoStage1Module(_VideoDiffusionModule):
    """Stage 1 (official defaults; every argument is a ``model.*`` config key, see conf/model/video_stage1.yaml).

    reference_unet_frozen: name fragments of ReferenceNet parameters kept frozen (official: ``up_blocks.3``,
    whose outputs after the last self-attention input never reach the bank).
    init: fine-tuning sources for ``reference_unet``, ``denoising_unet``, ``pose_guider`` (official .pth files or
    bundle folders), loaded strictly.
    """

    stage = 1

    def __init__(
        self,
        backbone: Mapping[str, Any],
        pose_guider: Mapping[str, Any] | None = None,
        noise_scheduler: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        eight_bit_adam: bool | str = "auto",
        scheduler: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool | Sequence[int] = False,
        reference_unet_frozen: Sequence[str] = ("up_blocks.3",),
        vae_batch_size: int = 8,
        ema: Mapping[str, Any] | None = None,
        init: Mapping[str, Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        callbacks: Mapping[str, Any] | None = None,
        seed: int = 0,
        performance: Mapping[str, Any] | None = None,
    ):
        super().__init__({
            "backbone": backbone, "pose_guider": pose_guider, "noise_scheduler": noise_scheduler, "loss": loss,
            "optimizer": optimizer, "eight_bit_adam": eight_bit_adam, "scheduler": scheduler,
            "gradient_checkpointing": gradient_checkpointing, "reference_unet_frozen": list(_plain(reference_unet_frozen)),
            "vae_batch_size": vae_batch_size, "ema": ema, "init": init, "sampling": sampling, "callbacks": callbacks,
            "seed": seed, "performance": performance,
        })

    def _set_trainable(self) -> None:
        frozen = tuple(self.hparams.reference_unet_frozen)
        for name, param in self.reference_unet.named_parameters():
            param.requires_grad_(not any(fragment in name for fragment in frozen))
        self.denoising_unet.requires_grad_(True)
        self.pose_guider.requires_grad_(True)

    def _initialise_weights(self) -> None:
        unknown = sorted(set(self.init_sources) - set(_STAGE1_COMPONENTS))
        if unknown:
            raise AniPortraitError(f"model.init has keys {unknown} that stage 1 does not train; known: {list(_STAGE1_COMPONENTS)}")
        for component in _STAGE1_COMPONENTS:
            self._load_init(component)


class VideoStage2Module(_VideoDiffusionModule):
    """Stage 2 (official defaults; see conf/model/video_stage2.yaml): only the motion modules train.

    stage1: the stage-1 weights, required unless handed over in memory (:meth:`load_stage1_from_module`) or all
    three given under ``init``: a stage-1 bundle folder, a stage-1 Lightning checkpoint (.ckpt; its raw, non-EMA
    weights), or a folder with the official reference_unet.pth, denoising_unet.pth and pose_guider.pth.
    motion_module: motion-module settings (null: official inference_v2.yaml). Their initial weights come from
    ``backbone.video.motion_module`` (sd15: official motion_module.pth or AnimateDiff mm_sd_v15_v2.ckpt) or
    ``init.motion_module`` (a file or bundle; wins), else they start as identities (zero output projection).
    """

    stage = 2

    def __init__(
        self,
        backbone: Mapping[str, Any],
        stage1: str | None = None,
        pose_guider: Mapping[str, Any] | None = None,
        motion_module: Mapping[str, Any] | None = None,
        noise_scheduler: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        eight_bit_adam: bool | str = "auto",
        scheduler: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool | Sequence[int] = True,
        vae_batch_size: int = 8,
        ema: Mapping[str, Any] | None = None,
        init: Mapping[str, Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        callbacks: Mapping[str, Any] | None = None,
        seed: int = 0,
        performance: Mapping[str, Any] | None = None,
    ):
        super().__init__({
            "backbone": backbone, "stage1": stage1, "pose_guider": pose_guider, "motion_module": motion_module,
            "noise_scheduler": noise_scheduler, "loss": loss, "optimizer": optimizer, "eight_bit_adam": eight_bit_adam,
            "scheduler": scheduler, "gradient_checkpointing": gradient_checkpointing, "vae_batch_size": vae_batch_size,
            "ema": ema, "init": init, "sampling": sampling, "callbacks": callbacks, "seed": seed,
            "performance": performance,
        })
        self._stage1_loaded = False

    def _set_trainable(self) -> None:
        self.reference_unet.requires_grad_(False)
        self.pose_guider.requires_grad_(False)
        self.denoising_unet.requires_grad_(False)
        for param in self.denoising_unet.motion_module_parameters():
            param.requires_grad_(True)

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [self.reference_unet, self.pose_guider]

    def inherit(self, previous: Mapping[str, pl.LightningModule]) -> None:
        """The VAE (see the base class) and, unless ``stage1`` names other weights, the run's stage-1 result."""
        super().inherit(previous)
        stage1 = [module for module in previous.values() if isinstance(module, VideoStage1Module)]
        if stage1 and not self.hparams.stage1:
            self.load_stage1_from_module(stage1[-1])

    def load_stage1_from_module(self, stage1_module: VideoStage1Module) -> None:
        """Take the stage-1 weights (the ones its bundle would hold: EMA if exported) from a trained module."""
        _, state_dicts, _, _ = stage1_module.bundle_parts()
        self._load_stage1_state(state_dicts, f"stage-1 module {type(stage1_module).__name__}")
        self.data_settings = {**stage1_module.data_settings, **self.data_settings}

    def _load_stage1_state(self, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
        for name in _STAGE1_COMPONENTS:
            motion = (MOTION_MODULE_KEYS,) if name == "denoising_unet" else ()
            load_state_dict_checked(getattr(self, name), state_dicts[name], f"{name} (stage 1: {source})",
                                    allow_missing=motion, allow_unexpected=motion)
        self._stage1_loaded = True

    def _load_stage1(self, source: str) -> None:
        path = Path(source).expanduser()
        if path.is_dir() and (path / BUNDLE_FILE).is_file():
            bundle = Bundle.open(path)
            bundle.require(*_STAGE1_COMPONENTS, purpose="model.stage1")
            self._load_stage1_state({name: bundle.state_dict(name) for name in _STAGE1_COMPONENTS}, str(path))
            if bundle.has("vae") and not dict(self.hparams.backbone or {}).get("vae"):
                self.use_vae(bundle.load("vae"))  # stage 1 was trained through this VAE
        elif path.is_dir():
            files = {name: path / f"{name}.pth" for name in _STAGE1_COMPONENTS}
            absent = [str(file.name) for file in files.values() if not file.is_file()]
            if absent:
                raise AniPortraitError(f"model.stage1={source}: a folder that is neither a bundle (no {BUNDLE_FILE}) nor "
                                       f"holds the official release files (missing {', '.join(absent)})")
            self._load_stage1_state({name: read_checkpoint(file) for name, file in files.items()}, str(path))
        elif path.is_file():
            state = read_checkpoint(path)  # a Lightning checkpoint: {"state_dict": {"<module>.<key>": ...}, ...}
            parts = {}
            for name in _STAGE1_COMPONENTS:
                prefix = f"{name}."
                parts[name] = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
                if not parts[name]:
                    raise AniPortraitError(
                        f"model.stage1={source} has no {name} weights (keys {prefix}*): give a Lightning checkpoint of "
                        "model=video_stage1, a stage-1 bundle folder, or the folder of the official release files"
                    )
            self._load_stage1_state(parts, str(path))
        else:
            raise AniPortraitError(f"model.stage1={source}: no such file or folder")

    def _initialise_weights(self) -> None:
        unknown = sorted(set(self.init_sources) - {*_STAGE1_COMPONENTS, "motion_module"})
        if unknown:
            raise AniPortraitError(f"model.init has unknown keys {unknown}; known: "
                                   f"{[*_STAGE1_COMPONENTS, 'motion_module']}")
        stage1 = self.hparams.stage1
        if not self._stage1_loaded:
            if stage1:
                self._load_stage1(stage1)
            elif not all(self.init_sources.get(name) for name in _STAGE1_COMPONENTS):
                # Lightning restores a resumed run's checkpoint after setup: decide in on_fit_start.
                self._stage1_missing = True
        for component in (*_STAGE1_COMPONENTS, "motion_module"):
            self._load_init(component)


class ValidationVideos(pl.Callback):
    """After each validation: ``num_videos`` clips of the validation set sampled with the module's sampling
    scheduler (DDIM by default) into ``out_dir/step_<step>_<i>_<clip>.mp4`` as
    ``reference | pose | generated | ground truth``; also logged to Weights & Biases when that logger is active.
    Runs on global rank 0 and is skipped where parameters are sharded (FSDP, DeepSpeed ZeRO-3): one rank cannot
    run the models alone there.
    """

    def __init__(self, out_dir: str, num_videos: int = 2, num_frames: int = 16, num_inference_steps: int = 25,
                 guidance_scale: float = 3.5, seed: int = 0):
        self.out_dir = Path(out_dir)
        self.num_videos, self.num_frames = int(num_videos), int(num_frames)
        self.num_inference_steps, self.guidance_scale, self.seed = int(num_inference_steps), float(guidance_scale), int(seed)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_videos < 1:
            return
        if _shards_parameters(trainer):
            log.warning("ValidationVideos: skipped under %s (one rank cannot run sharded models alone)",
                        type(trainer.strategy).__name__)
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "preview_samples"):
            return
        from aniportrait.data.video import write_video

        previews = datamodule.preview_samples(self.num_videos, self.num_frames)
        pipeline = pl_module.sampling_pipeline()
        sampling = pl_module.sampling
        was_training = pl_module.training
        pl_module.eval()
        paths = []
        try:
            with trainer.precision_plugin.forward_context():
                for index, preview in enumerate(previews):
                    frames = pipeline(
                        preview["reference_image"], preview["pose_images"], preview["reference_pose"],
                        num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                        context_frames=sampling["context_frames"], context_overlap=sampling["context_overlap"],
                        generator=torch.Generator().manual_seed(self.seed + index), progress=False,
                    )  # (T, H, W, 3)
                    reference = np.broadcast_to(preview["reference_image"], frames.shape)
                    grid = np.concatenate([reference, preview["pose_images"], frames, preview["frames"]], axis=2)
                    path = self.out_dir / f"step_{trainer.global_step:06d}_{index}_{preview['clip_id']}.mp4"
                    paths.append(write_video(path, np.ascontiguousarray(grid), preview["fps"], preset="veryfast"))
        finally:
            pl_module.train(was_training)
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                import wandb

                logger.experiment.log({f"samples/video_{index}": wandb.Video(str(path), format="mp4")
                                       for index, path in enumerate(paths)}, step=trainer.global_step)
