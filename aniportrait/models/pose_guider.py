"""PoseGuider: pose images -> features added to the denoising UNet, exactly as the official AniPortrait model.

Computation (official ``src/models/pose_guider.py``), per frame::

    conv_layers (3->3->16->16->32->32->64->64->128, BatchNorm + ReLU, three stride-2 convs: /8)
    fea[0] = final_proj(.) * scale                 (C channels, latent size; ``scale`` learnable, init 2)
    fea[1] = cross_attn1(conv_layers_1(fea[0]))    (C,  /2)
    fea[2] = cross_attn2(conv_layers_2(fea[1]))    (2C, /4)
    fea[3] = cross_attn3(conv_layers_3(fea[2]))    (4C, /8)
    fea[4] = cross_attn4(conv_layers_4(fea[3]))    (4C, /8)

``fea[0]`` is added after the UNet's ``conv_in`` and ``fea[1..4]`` after each down block.

The official ``cross_attn*`` blocks are diffusers ``Transformer2DModel`` built without
``cross_attention_dim``: they have no ``attn2``, so the reference pose (``ref_x``) never reaches the
output; it only runs through the conv stacks, which in train mode updates the BatchNorm statistics.
``reference_attention="official"`` (default) reproduces that, so released weights behave as released.
``reference_attention="cross"`` adds a real cross-attention (``attn2``, zero-initialised output) from the
target pose features to the reference pose features of the same level; those keys exist only then.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import Transformer2DModel
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from aniportrait.errors import AniPortraitError

__all__ = ["PoseGuider"]

ReferenceAttention = Literal["official", "cross"]
# conv_layers: (in, out, kernel, stride) per conv, each followed by BatchNorm + ReLU (official widths)
_STEM = ((3, 3, 3, 1), (3, 16, 4, 2), (16, 16, 3, 1), (16, 32, 4, 2), (32, 32, 3, 1), (32, 64, 4, 2),
         (64, 64, 3, 1), (64, 128, 3, 1))


def _conv_bn_relu(layers: tuple[tuple[int, int, int, int], ...]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for in_channels, out_channels, kernel, stride in layers:
        modules += [nn.Conv2d(in_channels, out_channels, kernel_size=kernel, stride=stride, padding=1),
                    nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*modules)


class PoseGuider(ModelMixin, ConfigMixin):
    """Official AniPortrait PoseGuider (keys identical to ``pose_guider.pth``).

    Args:
        noise_latent_channels: C, the UNet's first block width (320 for SD-1.5); a multiple of 32
            because the attention blocks start with GroupNorm(32).
        attention_num_heads, attention_head_dim: the four attention blocks' heads and head size.
            The official model uses diffusers' class defaults, 16 x 88 (inner width 1408 at every level).
        attention_norm_groups: the GroupNorm groups opening each attention block (32 official; fewer allow
            channel counts below 32, e.g. in tiny test models).
        reference_attention: ``"official"`` (reference pose ignored except for BatchNorm statistics) or
            ``"cross"`` (true cross-attention to the reference pose features).
    """

    @register_to_config
    def __init__(
        self,
        noise_latent_channels: int = 320,
        attention_num_heads: int = 16,
        attention_head_dim: int = 88,
        reference_attention: ReferenceAttention = "official",
        attention_norm_groups: int = 32,
    ):
        super().__init__()
        if reference_attention not in ("official", "cross"):
            raise AniPortraitError(
                f"pose_guider.reference_attention={reference_attention!r}: expected 'official' or 'cross'"
            )
        if attention_norm_groups < 1 or noise_latent_channels % attention_norm_groups:
            raise AniPortraitError(
                f"pose_guider.noise_latent_channels={noise_latent_channels} must be a multiple of "
                f"attention_norm_groups={attention_norm_groups} (GroupNorm in the attention blocks); use the UNet's "
                "first block width"
            )
        c = noise_latent_channels
        self.conv_layers = _conv_bn_relu(_STEM)
        self.final_proj = nn.Conv2d(128, c, kernel_size=1)
        self.conv_layers_1 = _conv_bn_relu(((c, c, 3, 1), (c, c, 3, 2)))
        self.conv_layers_2 = _conv_bn_relu(((c, c, 3, 1), (c, 2 * c, 3, 2)))
        self.conv_layers_3 = _conv_bn_relu(((2 * c, 2 * c, 3, 1), (2 * c, 4 * c, 3, 2)))
        self.conv_layers_4 = _conv_bn_relu(((4 * c, 4 * c, 3, 1),))
        cross = reference_attention == "cross"
        for index, channels in enumerate((c, 2 * c, 4 * c, 4 * c), start=1):
            block = Transformer2DModel(
                num_attention_heads=attention_num_heads,
                attention_head_dim=attention_head_dim,
                in_channels=channels,
                norm_num_groups=attention_norm_groups,
                cross_attention_dim=channels if cross else None,
            )
            if cross:  # start as the official model: the new path adds nothing until trained
                attn2_out = block.transformer_blocks[0].attn2.to_out[0]
                nn.init.zeros_(attn2_out.weight)
                nn.init.zeros_(attn2_out.bias)
            setattr(self, f"cross_attn{index}", block)
        self._initialize_weights()
        self.scale = nn.Parameter(torch.ones(1) * 2)

    def _initialize_weights(self) -> None:
        """Official init: He-normal convs with zero bias; ``final_proj`` zero, so fea starts at 0."""
        for stack in (self.conv_layers, self.conv_layers_1, self.conv_layers_2, self.conv_layers_3, self.conv_layers_4):
            for module in stack:
                if isinstance(module, nn.Conv2d):
                    fan_in = module.kernel_size[0] * module.kernel_size[1] * module.in_channels
                    nn.init.normal_(module.weight, mean=0.0, std=float(np.sqrt(2.0 / fan_in)))
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.final_proj.weight)
        nn.init.zeros_(self.final_proj.bias)

    def _stages(self) -> tuple[tuple[nn.Sequential, Transformer2DModel], ...]:
        return ((self.conv_layers_1, self.cross_attn1), (self.conv_layers_2, self.cross_attn2),
                (self.conv_layers_3, self.cross_attn3), (self.conv_layers_4, self.cross_attn4))

    def forward(self, x: torch.Tensor, ref_x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Pose features for the UNet.

        x: (b, 3, f, H, W) target pose images; ref_x: (b, 3, H, W) reference pose image.
        Returns five tensors ``(b, C_i, f, h_i, w_i)`` (see the module docstring).

        In ``"official"`` mode ``ref_x`` cannot change the output; it still passes through the conv
        stacks in train mode, as officially, because that updates the BatchNorm running statistics.
        It may be None in eval mode (or always, if those statistics need not match the official run).
        """
        if x.ndim != 5:
            raise AniPortraitError(f"PoseGuider expects pose images (b, 3, f, H, W), got shape {tuple(x.shape)}")
        batch, _, num_frames, height, width = x.shape
        cross = self.config.reference_attention == "cross"
        if cross and ref_x is None:
            raise AniPortraitError("PoseGuider(reference_attention='cross') needs ref_x, the reference pose image")
        use_reference = ref_x is not None and (cross or self.training)

        x = x.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, 3, height, width)  # (b f, 3, H, W)
        x = self.final_proj(self.conv_layers(x)) * self.scale
        features = [x]
        if use_reference:
            ref_x = self.final_proj(self.conv_layers(ref_x)) * self.scale  # (b, C, h, w)
        for conv, attention in self._stages():
            x = conv(x)
            tokens = None
            if use_reference:
                ref_x = conv(ref_x)
                if cross:  # (b, C, h, w) -> (b f, h w, C): each frame attends to its sample's reference
                    tokens = ref_x.flatten(2).transpose(1, 2).repeat_interleave(num_frames, dim=0)
            x = attention(x, encoder_hidden_states=tokens, return_dict=False)[0]
            features.append(x)
        return [
            feature.reshape(batch, num_frames, *feature.shape[1:]).permute(0, 2, 1, 3, 4)  # (b, C, f, h, w)
            for feature in features
        ]
