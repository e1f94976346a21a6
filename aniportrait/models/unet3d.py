"""The denoising UNet: SD-1.5's ``UNet2DConditionModel`` inflated to video, with AnimateDiff motion modules.

Frames are folded into the batch for every 2-D layer, ``(b, c, f, h, w) -> (b f, c, h, w)``, which is
exactly the official ``InflatedConv3d`` / ``InflatedGroupNorm`` (GroupNorm per frame) and keeps every 2-D
key of the SD UNet (the official 2-D -> 3-D key map is the identity). Motion modules are attached to the
diffusers blocks as ``motion_modules`` lists, so their keys are those of ``motion_module.pth``:
``down_blocks.i.motion_modules.j...``, ``mid_block.motion_modules.0...``, ``up_blocks.i.motion_modules.j...``.

The forward runs the diffusers blocks' layers itself, in the official ``unet_3d_blocks`` order:

* down / up blocks: per layer ``resnet -> attention (if any) -> motion module``, then down/upsampler;
* mid block: ``resnet``, then per layer ``attention -> motion module -> resnet``;
* PoseGuider features: ``pose_cond_fea[0]`` after ``conv_in``, ``pose_cond_fea[i + 1]`` after down block
  ``i`` (not into its skip connections), as in the official ``unet_3d.py``.

Deep-feature reuse across sampling steps (DeepCache, Ma et al. 2023), for samplers: ``keep_deep_features=True``
also returns the input of the last up block (``deep_features``: everything below the top level, computed at this
step); a later call given ``deep_features`` runs only the top level (``conv_in``, down block 0 without its
downsampler, the last up block) on top of them. Adjacent steps change the deep features little; the top level,
which sees the new latents, the poses (``pose_cond_fea[0]``) and the reference bank at full resolution, runs at
every step.

With ``motion_module_resolutions=(1, 2, 4, 8)`` and ``motion_module_mid_block=True`` (``inference_v2.yaml``)
an SD-1.5 UNet gets 2 modules per down block, 1 in the mid block and 3 per up block: 21.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from aniportrait.errors import AniPortraitError
from aniportrait.models.checkpoints import LoadReport, load_state_dict_checked, read_checkpoint
from aniportrait.models.motion_module import VanillaTemporalModule, diffusers_to_official_keys

__all__ = ["UNet3DConditionModel", "UNet3DConditionOutput", "MOTION_MODULE_KEYS", "INFERENCE_V2_MOTION_MODULE_KWARGS"]

log = logging.getLogger(__name__)

# Matches the state-dict keys of motion modules (for load_state_dict_checked's allow_missing).
MOTION_MODULE_KEYS = r".*\.motion_modules\."
_NOT_MOTION_MODULE_KEYS = r"(?!.*\.motion_modules\.)"
# motion_module_kwargs of the official configs/inference/inference_v2.yaml
INFERENCE_V2_MOTION_MODULE_KWARGS: dict[str, Any] = {
    "num_attention_heads": 8,
    "num_transformer_block": 1,
    "attention_block_types": ["Temporal_Self", "Temporal_Self"],
    "temporal_position_encoding": True,
    "temporal_position_encoding_max_len": 32,
    "temporal_attention_dim_div": 1,
}
_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCK = "UNetMidBlock2DCrossAttn"


@dataclass
class UNet3DConditionOutput(BaseOutput):
    sample: torch.Tensor  # (b, c, f, h, w)
    deep_features: torch.Tensor | None = None  # (b f, C, h, w): the last up block's input (keep_deep_features)


def _fold(video: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b f, c, h, w)."""
    batch, channels, frames, height, width = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)


def _unfold(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(b f, c, h, w) -> (b, c, f, h, w)."""
    batch_frames, channels, height, width = frames.shape
    return frames.reshape(batch_frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)


class UNet3DConditionModel(UNet2DConditionModel):
    """SD-1.5-style UNet (the 2-D settings below) inflated to video, with optional motion modules.

    ``use_motion_module=False`` is the stage-1 model (state dict = official ``denoising_unet.pth``);
    ``motion_module_kwargs`` are :class:`VanillaTemporalModule` arguments (default: inference_v2.yaml).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
        mid_block_type: str = _MID_BLOCK,
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        attention_head_dim: int | Sequence[int] = 8,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        use_motion_module: bool = True,
        motion_module_resolutions: Sequence[int] = (1, 2, 4, 8),
        motion_module_mid_block: bool = True,
        motion_module_decoder_only: bool = False,
        motion_module_kwargs: Mapping[str, Any] | None = None,
    ):
        bad_blocks = [name for name in down_block_types if name not in _DOWN_BLOCKS]
        bad_blocks += [name for name in up_block_types if name not in _UP_BLOCKS]
        bad_blocks += [mid_block_type] if mid_block_type != _MID_BLOCK else []
        if bad_blocks:
            raise AniPortraitError(
                f"UNet3DConditionModel supports the SD-1.5 block types {_DOWN_BLOCKS + _UP_BLOCKS + (_MID_BLOCK,)}, "
                f"not {bad_blocks}"
            )
        # The undecorated diffusers initializer: only this class's arguments are registered as the config.
        UNet2DConditionModel.__init__.__wrapped__(
            self, sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, down_block_types=tuple(down_block_types),
            mid_block_type=mid_block_type, up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            downsample_padding=downsample_padding, mid_block_scale_factor=mid_block_scale_factor, act_fn=act_fn,
            norm_num_groups=norm_num_groups, norm_eps=norm_eps, cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim, use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.gradient_checkpointing = False
        if use_motion_module:
            self._add_motion_modules(tuple(block_out_channels), tuple(motion_module_resolutions),
                                     motion_module_mid_block, motion_module_decoder_only,
                                     dict(INFERENCE_V2_MOTION_MODULE_KWARGS if motion_module_kwargs is None
                                          else motion_module_kwargs))

    def _add_motion_modules(self, channels: tuple[int, ...], resolutions: tuple[int, ...], mid_block: bool,
                            decoder_only: bool, kwargs: dict[str, Any]) -> None:
        """One module per (resnet, attention) layer of the blocks at ``resolutions`` (2**level, as official)."""
        def modules(width: int, count: int) -> nn.ModuleList:
            return nn.ModuleList(VanillaTemporalModule(width, **kwargs) for _ in range(count))

        levels = len(channels)
        for level, block in enumerate(self.down_blocks):
            if not decoder_only and 2**level in resolutions:
                block.motion_modules = modules(channels[level], len(block.resnets))
        if mid_block:
            self.mid_block.motion_modules = modules(channels[-1], len(self.mid_block.attentions))
        for index, block in enumerate(self.up_blocks):  # up block i works at level (levels - 1 - i)
            if 2 ** (levels - 1 - index) in resolutions:
                block.motion_modules = modules(channels[levels - 1 - index], len(block.resnets))

    # -- construction from SD-1.5 -------------------------------------------------------------------------

    @classmethod
    def from_unet2d_config(
        cls,
        config: Mapping[str, Any],
        motion_module_kwargs: Mapping[str, Any] | None = None,
        use_motion_module: bool = True,
        motion_module_resolutions: Sequence[int] = (1, 2, 4, 8),
        motion_module_mid_block: bool = True,
        motion_module_decoder_only: bool = False,
    ) -> UNet3DConditionModel:
        """A randomly initialised UNet3D for a diffusers ``UNet2DConditionModel`` config (e.g. SD-1.5's).

        Settings this class does not implement must be at their defaults, else AniPortraitError.
        """
        own_keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
        defaults = {name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                    if name != "self"}
        unsupported = {
            key: value for key, value in config.items()
            if key in defaults and key not in own_keys and _plain(value) != _plain(defaults[key])
        }
        if unsupported:
            raise AniPortraitError(
                f"UNet3DConditionModel inflates SD-1.5-style UNets; this UNet's config sets {unsupported}, "
                "which it does not support"
            )
        return cls(
            **{key: value for key, value in config.items() if key in own_keys},
            use_motion_module=use_motion_module,
            motion_module_resolutions=motion_module_resolutions,
            motion_module_mid_block=motion_module_mid_block,
            motion_module_decoder_only=motion_module_decoder_only,
            motion_module_kwargs=motion_module_kwargs,
        )

    @classmethod
    def from_unet2d(cls, unet2d: UNet2DConditionModel, motion_module_kwargs: Mapping[str, Any] | None = None,
                    **motion_module_settings: Any) -> UNet3DConditionModel:
        """Inflate a diffusers 2-D UNet: same config and 2-D weights; motion modules freshly initialised.

        ``motion_module_settings``: the other motion-module arguments of :meth:`from_unet2d_config`.
        """
        model = cls.from_unet2d_config(unet2d.config, motion_module_kwargs, **motion_module_settings)
        load_state_dict_checked(model, unet2d.state_dict(), "denoising UNet (2-D weights)",
                                allow_missing=(MOTION_MODULE_KEYS,))
        return model

    @classmethod
    def from_pretrained_2d(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        motion_module_path: str | os.PathLike | None = None,
        subfolder: str | None = "unet",
        motion_module_kwargs: Mapping[str, Any] | None = None,
        use_motion_module: bool = True,
        **from_pretrained_kwargs: Any,
    ) -> UNet3DConditionModel:
        """SD-1.5 UNet weights (a local folder or hub id with ``unet/``) plus, optionally, motion-module
        weights (official ``motion_module.pth``, AnimateDiff ``mm_sd_v15_v2.ckpt`` or diffusers layout).

        ``from_pretrained_kwargs`` go to diffusers' ``from_pretrained`` (``local_files_only``, ...).
        """
        unet2d = UNet2DConditionModel.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                                      **from_pretrained_kwargs)
        model = cls.from_unet2d(unet2d, motion_module_kwargs=motion_module_kwargs, use_motion_module=use_motion_module)
        if motion_module_path is not None:
            model.load_motion_modules(motion_module_path)
        return model

    # -- motion modules -----------------------------------------------------------------------------------

    def motion_module_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters trained in stage 2."""
        return (param for name, param in self.named_parameters() if ".motion_modules." in name)

    def motion_module_state_dict(self) -> dict[str, torch.Tensor]:
        """The keys of ``motion_module.pth`` (the official stage-2 save filter)."""
        return {key: value for key, value in self.state_dict().items() if ".motion_modules." in key}

    def load_motion_modules(self, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike) -> LoadReport:
        """Load motion-module weights, official / original AnimateDiff layout or diffusers MotionAdapter layout.

        Every motion-module key must be present and nothing else may be in the file.
        """
        if next(self.motion_module_parameters(), None) is None:
            raise AniPortraitError("this UNet3D was built with use_motion_module=False: it has no motion modules to load")
        if isinstance(state_dict_or_path, Mapping):
            source, state_dict = "motion modules", dict(state_dict_or_path)
        else:
            source, state_dict = f"motion modules ({state_dict_or_path})", read_checkpoint(state_dict_or_path)
        if not any(".temporal_transformer." in key for key in state_dict):
            state_dict = diffusers_to_official_keys(state_dict)
        return load_state_dict_checked(self, state_dict, source, allow_missing=(_NOT_MOTION_MODULE_KEYS,))

    # -- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        pose_cond_fea: Sequence[torch.Tensor] | None = None,
        return_dict: bool = True,
        deep_features: torch.Tensor | None = None,
        keep_deep_features: bool = False,
    ) -> UNet3DConditionOutput | tuple[torch.Tensor]:
        """sample: (b, c, f, h, w) noisy latents; timestep: scalar or (b,); encoder_hidden_states: (b, L, D)
        (or (b f, L, D)); pose_cond_fea: the PoseGuider's features, (b, C_i, f, h_i, w_i), one after
        ``conv_in`` and one per down block (only the first is used with ``deep_features``). Returns
        (b, out_channels, f, h, w); deep_features / keep_deep_features: the module docstring's feature reuse."""
        if sample.ndim != 5:
            raise AniPortraitError(f"UNet3DConditionModel expects latents (b, c, f, h, w), got shape {tuple(sample.shape)}")
        batch, _, num_frames, height, width = sample.shape
        hidden = _fold(sample)  # (b f, c, h, w)
        emb = self.time_embedding(self.get_time_embed(sample=hidden, timestep=self._frame_timesteps(
            timestep, batch, num_frames, sample.device)))  # (b f, 4 C)
        if encoder_hidden_states.shape[0] == batch:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)  # (b f, L, D)
        elif encoder_hidden_states.shape[0] != batch * num_frames:
            raise AniPortraitError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}; expected {batch} (one per sample) "
                f"or {batch * num_frames} (one per frame)"
            )
        pose = self._fold_pose(pose_cond_fea, batch, num_frames)
        # sizes that are no multiple of the total upsampling: upsample to the skip connection's size, as diffusers
        forward_upsample_size = bool(height % 2**self.num_upsamplers or width % 2**self.num_upsamplers)

        hidden = self.conv_in(hidden)
        if pose is not None:
            hidden = hidden + pose[0]
        skips: tuple[torch.Tensor, ...] = (hidden,)
        kept = None
        if deep_features is not None:  # the top level only, on the deep features of an earlier step
            skips += self._down_block(self.down_blocks[0], hidden, emb, encoder_hidden_states, num_frames,
                                      downsample=False)[1]
            top = self.up_blocks[-1]
            if len(skips) != len(top.resnets) or deep_features.shape[0] != hidden.shape[0] \
                    or deep_features.shape[2:] != hidden.shape[2:]:
                raise AniPortraitError(f"deep_features of shape {tuple(deep_features.shape)} do not fit this call "
                                       f"(latents {tuple(sample.shape)}): keep them from a call of the same shapes")
            hidden = self._up_block(top, deep_features.to(hidden.dtype), skips, emb, encoder_hidden_states,
                                    num_frames, None)
        else:
            for level, block in enumerate(self.down_blocks):
                hidden, block_skips = self._down_block(block, hidden, emb, encoder_hidden_states, num_frames)
                if pose is not None:
                    hidden = hidden + pose[level + 1]
                skips += block_skips

            hidden = self._mid_block(hidden, emb, encoder_hidden_states, num_frames)

            for index, block in enumerate(self.up_blocks):
                block_skips, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
                upsample_size = skips[-1].shape[2:] if forward_upsample_size and index < len(self.up_blocks) - 1 \
                    else None
                if keep_deep_features and index == len(self.up_blocks) - 1:
                    kept = hidden
                hidden = self._up_block(block, hidden, block_skips, emb, encoder_hidden_states, num_frames,
                                        upsample_size)

        hidden = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
        output = _unfold(hidden, num_frames)
        return UNet3DConditionOutput(sample=output, deep_features=kept) if return_dict else (output,)

    def _frame_timesteps(self, timestep: torch.Tensor | float | int, batch: int, num_frames: int,
                         device: torch.device) -> torch.Tensor:
        timesteps = torch.as_tensor(timestep, device=device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        elif timesteps.numel() != batch:
            raise AniPortraitError(f"timestep has {timesteps.numel()} values for a batch of {batch}: pass one or one per sample")
        return timesteps.repeat_interleave(num_frames)  # (b f,)

    def _fold_pose(self, pose_cond_fea: Sequence[torch.Tensor] | None, batch: int,
                   num_frames: int) -> list[torch.Tensor] | None:
        if pose_cond_fea is None:
            return None
        if len(pose_cond_fea) != len(self.down_blocks) + 1:
            raise AniPortraitError(
                f"pose_cond_fea has {len(pose_cond_fea)} features; this UNet adds {len(self.down_blocks) + 1} "
                "(after conv_in and after each down block): build the PoseGuider with noise_latent_channels = "
                "block_out_channels[0] for a UNet with 4 levels"
            )
        for feature in pose_cond_fea:
            if feature.shape[0] != batch or feature.shape[2] != num_frames:
                raise AniPortraitError(
                    f"a pose feature has shape {tuple(feature.shape)}; expected (b={batch}, C, f={num_frames}, h, w)"
                )
        return [_fold(feature) for feature in pose_cond_fea]

    def _layer(self, block: nn.Module, module: nn.Module, *args: Any) -> torch.Tensor:
        """Run a resnet or motion module of ``block``, under gradient checkpointing when that is on for the block
        (models/checkpointing.py: everywhere, or at some resolution levels only)."""
        if getattr(block, "gradient_checkpointing", self.gradient_checkpointing) and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    @staticmethod
    def _layers(block: nn.Module) -> list[tuple[nn.Module, nn.Module | None, nn.Module | None]]:
        count = len(block.resnets)
        attentions = getattr(block, "attentions", None) or [None] * count
        motion_modules = getattr(block, "motion_modules", None) or [None] * count
        return list(zip(block.resnets, attentions, motion_modules))

    def _down_block(self, block: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                    num_frames: int, downsample: bool = True) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips: tuple[torch.Tensor, ...] = ()
        for resnet, attention, motion_module in self._layers(block):
            hidden = self._layer(block, resnet, hidden, emb)
            if attention is not None:
                hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
            if motion_module is not None:
                hidden = self._layer(block, motion_module, hidden, num_frames)
            skips += (hidden,)
        if block.downsamplers is not None and downsample:
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            skips += (hidden,)
        return hidden, skips

    def _mid_block(self, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        block = self.mid_block
        hidden = self._layer(block, block.resnets[0], hidden, emb)
        motion_modules = getattr(block, "motion_modules", None) or [None] * len(block.attentions)
        for attention, motion_module, resnet in zip(block.attentions, motion_modules, block.resnets[1:]):
            hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
            if motion_module is not None:
                hidden = self._layer(block, motion_module, hidden, num_frames)
            hidden = self._layer(block, resnet, hidden, emb)
        return hidden

    def _up_block(self, block: nn.Module, hidden: torch.Tensor, skips: tuple[torch.Tensor, ...], emb: torch.Tensor,
                  context: torch.Tensor, num_frames: int, upsample_size: torch.Size | None) -> torch.Tensor:
        for resnet, attention, motion_module in self._layers(block):
            hidden, skips = torch.cat([hidden, skips[-1]], dim=1), skips[:-1]
            hidden = self._layer(block, resnet, hidden, emb)
            if attention is not None:
                hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
            if motion_module is not None:
                hidden = self._layer(block, motion_module, hidden, num_frames)
        if block.upsamplers is not None:
            for upsampler in block.upsamplers:
                hidden = upsampler(hidden, upsample_size)
        return hidden


def _plain(value: Any) -> Any:
    """Config values compared without tuple/list differences."""
    return list(value) if isinstance(value, (tuple, list)) else value
