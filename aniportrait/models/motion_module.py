"""AnimateDiff "Vanilla" motion module with the original AnimateDiff / official AniPortrait key names.

A motion module mixes information across frames at every spatial position: tokens are the frames of
one pixel. Keys (``motion_module.pth``, ``mm_sd_v15_v2.ckpt``)::

    temporal_transformer.norm                                   GroupNorm(32, C)
    temporal_transformer.proj_in / proj_out                     Linear(C, C)   (proj_out zero-initialised)
    temporal_transformer.transformer_blocks.N.attention_blocks.K.{to_q,to_k,to_v,to_out.0}
    temporal_transformer.transformer_blocks.N.attention_blocks.K.pos_encoder.pe   buffer (1, 32, C)
    temporal_transformer.transformer_blocks.N.norms.K / ff_norm  LayerNorm(C)
    temporal_transformer.transformer_blocks.N.ff.net.{0.proj,2}  GEGLU feed-forward

Semantics follow the official forward, not diffusers' ``AnimateDiffTransformer3D``:

* the GroupNorm normalises **each frame on its own** (official: ``b c f h w -> (b f) c h w`` then norm);
  diffusers normalises over all frames of a clip jointly, which gives different outputs for the same
  weights whenever frames differ in their statistics;
* each attention block adds the sinusoidal positions to its *normed* input (inside the attention), and
  the residual skips both the norm and the positions: ``h = h + attn(norm_k(h) + pe)``;
* then ``h = h + ff(ff_norm(h))``, and the module output is ``x + proj_out(...)`` (zero at init, so a
  fresh module is the identity).

:func:`official_to_diffusers_keys` / :func:`diffusers_to_official_keys` translate to and from the
diffusers ``MotionAdapter`` layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from torch import nn

from aniportrait.errors import AniPortraitError

__all__ = [
    "VanillaTemporalModule",
    "TemporalTransformer3D",
    "TemporalTransformerBlock",
    "TemporalSelfAttention",
    "official_to_diffusers_keys",
    "diffusers_to_official_keys",
]


class TemporalSelfAttention(Attention):
    """Self-attention over frames (``Temporal_Self``) that adds sinusoidal frame positions to its input.

    Subclassing diffusers' ``Attention`` keeps ``to_q/to_k/to_v/to_out.0`` and its SDPA processor; the
    ``pos_encoder.pe`` buffer is persistent because the official checkpoints contain it.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, position_encoding_max_len: int | None):
        super().__init__(query_dim=dim, heads=heads, dim_head=dim_head, bias=False)
        self.pos_encoder = (
            SinusoidalPositionalEmbedding(dim, max_seq_length=position_encoding_max_len)
            if position_encoding_max_len is not None
            else None
        )

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:  # (b h w, f, c)
        if self.pos_encoder is not None:
            num_frames, max_len = hidden_states.shape[1], self.pos_encoder.pe.shape[1]
            if num_frames > max_len:
                raise AniPortraitError(
                    f"motion module got {num_frames} frames but its positional encoding covers {max_len}: "
                    "use context windows of at most that many frames"
                )
            hidden_states = self.pos_encoder(hidden_states)
        return super().forward(hidden_states, **kwargs)


class TemporalTransformerBlock(nn.Module):
    """``h + attn_k(norms_k(h))`` for each temporal self-attention, then ``h + ff(ff_norm(h))``."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, num_attention_blocks: int,
                 position_encoding_max_len: int | None):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            TemporalSelfAttention(dim, num_attention_heads, attention_head_dim, position_encoding_max_len)
            for _ in range(num_attention_blocks)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_attention_blocks))
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (b h w, f, c)
        for attention, norm in zip(self.attention_blocks, self.norms):
            hidden_states = attention(norm(hidden_states)) + hidden_states
        return self.ff(self.ff_norm(hidden_states)) + hidden_states


class TemporalTransformer3D(nn.Module):
    """Per-frame GroupNorm, ``proj_in``, temporal transformer blocks, ``proj_out``, residual."""

    def __init__(self, in_channels: int, num_attention_heads: int, attention_head_dim: int, num_layers: int,
                 num_attention_blocks: int, position_encoding_max_len: int | None, norm_num_groups: int = 32):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, num_attention_blocks,
                                     position_encoding_max_len)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner_dim, in_channels)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:  # (b f, c, h, w)
        batch_frames, channels, height, width = hidden_states.shape
        batch = batch_frames // num_frames
        residual = hidden_states
        hidden_states = self.norm(hidden_states)  # per frame: frames are separate rows of the batch
        hidden_states = (
            hidden_states.reshape(batch, num_frames, channels, height, width)
            .permute(0, 3, 4, 1, 2)
            .reshape(batch * height * width, num_frames, channels)
        )  # (b h w, f, c)
        hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = (
            hidden_states.reshape(batch, height, width, num_frames, channels)
            .permute(0, 3, 4, 1, 2)
            .reshape(batch_frames, channels, height, width)
        )
        return hidden_states + residual


class VanillaTemporalModule(nn.Module):
    """AnimateDiff ``VanillaTemporalModule``; the arguments are those of ``motion_module_kwargs`` in the
    official ``inference_v2.yaml`` (defaults = that file: 8 heads, 1 transformer block, two
    ``Temporal_Self`` attentions, positions up to 32 frames).

    Input and output are frames folded into the batch, ``(b f, c, h, w)``, as everywhere in the UNet3D.
    """

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int = 8,
        num_transformer_block: int = 1,
        attention_block_types: Sequence[str] = ("Temporal_Self", "Temporal_Self"),
        temporal_position_encoding: bool = True,
        temporal_position_encoding_max_len: int = 32,
        temporal_attention_dim_div: int = 1,
        zero_initialize: bool = True,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        unsupported = [kind for kind in attention_block_types if kind != "Temporal_Self"]
        if unsupported:
            raise AniPortraitError(
                f"motion_module_kwargs.attention_block_types has {unsupported}: only 'Temporal_Self' is implemented "
                "(the official and AnimateDiff v1/v2 modules use only that)"
            )
        self.temporal_transformer = TemporalTransformer3D(
            in_channels=in_channels,
            num_attention_heads=num_attention_heads,
            attention_head_dim=in_channels // num_attention_heads // temporal_attention_dim_div,
            num_layers=num_transformer_block,
            num_attention_blocks=len(attention_block_types),
            position_encoding_max_len=temporal_position_encoding_max_len if temporal_position_encoding else None,
            norm_num_groups=norm_num_groups,
        )
        if zero_initialize:
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:  # (b f, c, h, w)
        return self.temporal_transformer(hidden_states, num_frames)


# Official/original AnimateDiff -> diffusers MotionAdapter, applied in this order (diffusers'
# convert_animatediff_checkpoint_to_diffusers, plus the positional buffer that it drops).
_TO_DIFFUSERS = (
    (".norms.0.", ".norm1."),
    (".norms.1.", ".norm2."),
    (".ff_norm.", ".norm3."),
    (".attention_blocks.0.", ".attn1."),
    (".attention_blocks.1.", ".attn2."),
    (".temporal_transformer.", "."),
)
_OFFICIAL_PE = re.compile(r"^(.*\.transformer_blocks\.\d+)\.attention_blocks\.(\d+)\.pos_encoder\.pe$")
_DIFFUSERS_PE = re.compile(r"^(.*\.motion_modules\.\d+)\.(transformer_blocks\.\d+)\.pos_embed\.pe$")
_DIFFUSERS_ATTN = re.compile(r"^(.*\.motion_modules\.\d+\.transformer_blocks\.\d+)\.attn(\d+)\.")


def official_to_diffusers_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official/original AnimateDiff motion-module keys to diffusers ``MotionAdapter`` keys.

    ``...motion_modules.M.temporal_transformer.X`` -> ``...motion_modules.M.X``; ``norms.0/1`` ->
    ``norm1/2``; ``ff_norm`` -> ``norm3``; ``attention_blocks.0/1`` -> ``attn1/2``. diffusers keeps one
    ``pos_embed.pe`` per transformer block (applied before both attentions) where the official layout
    has one ``pos_encoder.pe`` per attention block; the (identical) official buffers collapse into it.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        pe_match = _OFFICIAL_PE.match(key)
        if pe_match:
            new_key = f"{pe_match.group(1)}.pos_embed.pe".replace(".temporal_transformer.", ".")
            if new_key in converted and not torch.equal(converted[new_key], value):
                raise AniPortraitError(
                    f"motion-module key {key}: its positional table differs from its sibling attention block's, "
                    "so it has no single diffusers pos_embed.pe"
                )
        else:
            new_key = key
            for old, new in _TO_DIFFUSERS:
                new_key = new_key.replace(old, new)
        converted[new_key] = value
    return converted


def diffusers_to_official_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_diffusers_keys`: diffusers ``MotionAdapter`` keys -> official keys.

    Each ``transformer_blocks.N.pos_embed.pe`` is copied to every ``attention_blocks.K.pos_encoder.pe``
    of that block (K taken from the block's ``attnK`` keys).
    """
    attention_indices: dict[str, set[int]] = {}
    for key in state_dict:
        attn_match = _DIFFUSERS_ATTN.match(key)
        if attn_match:
            attention_indices.setdefault(attn_match.group(1), set()).add(int(attn_match.group(2)) - 1)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        pe_match = _DIFFUSERS_PE.match(key)
        if pe_match:
            block = f"{pe_match.group(1)}.{pe_match.group(2)}"
            official_block = f"{pe_match.group(1)}.temporal_transformer.{pe_match.group(2)}"
            for index in sorted(attention_indices.get(block, ())):
                converted[f"{official_block}.attention_blocks.{index}.pos_encoder.pe"] = value
            continue
        module_match = re.match(r"^(.*\.motion_modules\.\d+)\.(.*)$", key)
        if module_match is None:
            converted[key] = value
            continue
        prefix, rest = module_match.groups()
        rest = re.sub(r"\.attn(\d+)\.", lambda m: f".attention_blocks.{int(m.group(1)) - 1}.", f".{rest}")
        rest = rest.replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm.")
        converted[f"{prefix}.temporal_transformer{rest}"] = value
    return converted
