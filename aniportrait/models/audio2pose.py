"""Audio2Pose: speech -> 6-D head pose per frame, with an autoregressive transformer decoder.

Same computation and state-dict keys as the official ``Audio2PoseModel``: frame-aligned wav2vec2 ->
``in_fn``; poses enter through ``pose_map`` (6 -> latent), get sinusoidal positions (``PPE``, 600
positions) and an identity embedding (``id_embed``, 100 identities), and run through an 8-layer, 8-head
post-norm ``nn.TransformerDecoder`` with an ALiBi-biased causal self-attention mask and a cross-attention
mask that lets pose step t see only audio frame t; ``pose_map_r`` maps back to 6-D.

The decoder's input at step t is the pose of step t-1 (a zero pose at t = 0), so training is
teacher-forced (:meth:`forward`) and inference is autoregressive (:meth:`infer`). Because every
attention is causal and the cross-attention is diagonal, earlier outputs never change when a step is
appended: :meth:`infer` therefore decodes incrementally with cached keys and values, O(T) work instead
of the official O(T^2) re-decoding, with the same result (see ``infer_reference``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import Wav2Vec2Config

from aniportrait.models.wav2vec2 import FrameAlignedWav2Vec2

__all__ = ["Audio2Pose", "alibi_causal_mask", "diagonal_memory_mask"]


def _alibi_slopes(num_heads: int) -> list[float]:
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + _alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def alibi_causal_mask(num_heads: int, length: int) -> torch.Tensor:
    """(heads, T, T) float mask: ``-slope_h * (i - j)`` for j <= i, ``-inf`` above the diagonal.

    The official ``init_biased_mask(n_head, max_seq_len, period=1)``.
    """
    slopes = torch.tensor(_alibi_slopes(num_heads))
    index = torch.arange(length)
    distance = (index[None, :] - index[:, None]).float()  # j - i, <= 0 on and below the diagonal
    bias = slopes[:, None, None] * distance.clamp(max=0)[None]
    causal = torch.zeros(length, length).masked_fill(index[None, :] > index[:, None], float("-inf"))
    return causal[None] + bias


def diagonal_memory_mask(length: int, memory_length: int, device=None) -> torch.Tensor:
    """(T, S) bool, True = blocked: pose step t attends to audio frame t only (official ``enc_dec_mask``)."""
    return ~torch.eye(length, memory_length, dtype=torch.bool, device=device)


class SinusoidalPositions(nn.Module):
    """Sinusoidal positions added to the input; ``pe`` is a persistent buffer (it is in the checkpoint)."""

    def __init__(self, dim: int, max_len: int = 600):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1).float()
        div_term = torch.exp(torch.arange(0, dim, 2).float() * -(math.log(10000.0) / dim))
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x + self.pe[:, offset : offset + x.size(1)]


class Audio2Pose(ModelMixin, ConfigMixin):
    """Head pose (rx, ry, rz in degrees, tx, ty, tz) per frame from audio and an identity index."""

    config_name = "audio2pose_config.json"

    @register_to_config
    def __init__(
        self,
        wav2vec2_config: dict | None = None,
        latent_dim: int = 512,
        out_dim: int = 6,
        num_layers: int = 8,
        num_heads: int = 8,
        feedforward_dim: int | None = None,
        num_identities: int = 100,
        max_frames: int = 600,
        only_last_features: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        config = Wav2Vec2Config(**(wav2vec2_config or {}))
        self.audio_encoder = FrameAlignedWav2Vec2(config)
        self.audio_encoder.feature_extractor._freeze_parameters()
        self.pose_map = nn.Linear(out_dim, latent_dim)
        self.in_fn = nn.Linear(config.hidden_size, latent_dim)
        self.PPE = SinusoidalPositions(latent_dim, max_len=max_frames)
        layer = nn.TransformerDecoderLayer(
            d_model=latent_dim, nhead=num_heads, dim_feedforward=feedforward_dim or 2 * latent_dim, dropout=dropout,
            batch_first=True,
        )
        self.transformer_decoder = nn.TransformerDecoder(layer, num_layers=num_layers)
        self.pose_map_r = nn.Linear(latent_dim, out_dim)
        self.id_embed = nn.Embedding(num_identities, latent_dim)
        self.register_buffer("biased_mask", alibi_causal_mask(num_heads, max_frames), persistent=False)

    # ------------------------------------------------------------------ shared pieces
    def encode_audio(self, input_values: torch.Tensor, num_frames: int, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.audio_encoder.forward_frames(
            input_values, num_frames, frame_mask=frame_mask, output_all_layers=not self.config.only_last_features
        )
        return self.in_fn(hidden)  # (B, T, latent)

    def _check_length(self, num_frames: int) -> None:
        if num_frames > self.config.max_frames:
            raise ValueError(
                f"Audio2Pose decodes at most {self.config.max_frames} frames at once (got {num_frames}); "
                "use aniportrait.pipelines.landmarks.predict_poses, which chunks long audio"
            )

    # ------------------------------------------------------------------ training
    def forward(
        self,
        input_values: torch.Tensor,
        poses: torch.Tensor,
        identity: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced prediction. poses: (B, T, 6) targets; identity: (B,) long. Returns (B, T, 6)."""
        batch, frames, _ = poses.shape
        self._check_length(frames)
        memory = self.encode_audio(input_values, frames, frame_mask)  # (B, T, latent)
        previous = torch.cat([poses.new_zeros(batch, 1, poses.shape[-1]), poses[:, :-1]], dim=1)
        tokens = self.PPE(self.pose_map(previous)) + self.id_embed(identity)[:, None]
        tgt_mask = self.biased_mask[:, :frames, :frames].repeat(batch, 1, 1)  # (B*heads, T, T)
        memory_mask = diagonal_memory_mask(frames, frames, device=poses.device)
        decoded = self.transformer_decoder(tokens, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)
        return self.pose_map_r(decoded)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def infer(
        self,
        input_values: torch.Tensor,
        num_frames: int,
        identity: torch.Tensor,
        prefix_poses: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Autoregressive decoding with a key/value cache. Returns (B, num_frames, 6).

        ``prefix_poses`` (B, P, 6) teacher-forces the first P steps (their true poses are fed back instead
        of the predictions); the chunked long-audio pipeline uses it to continue a previous chunk.
        """
        self._check_length(num_frames)
        memory = self.encode_audio(input_values, num_frames)  # (B, T, latent)
        return self._decode_cached(memory, identity, num_frames, prefix_poses)

    def _decode_cached(self, memory, identity, num_frames, prefix_poses=None) -> torch.Tensor:
        batch = memory.shape[0]
        layers = self.transformer_decoder.layers
        heads = self.config.num_heads
        id_embedding = self.id_embed(identity)  # (B, latent)
        # Cross-attention to the diagonal memory sees exactly one frame, so its softmax is 1 and its output
        # is that frame's projected value: precompute it for every frame and layer.
        cross = [self._diagonal_cross_attention(layer, memory) for layer in layers]  # each (B, T, latent)
        keys: list[list[torch.Tensor]] = [[] for _ in layers]
        values: list[list[torch.Tensor]] = [[] for _ in layers]
        previous_pose = memory.new_zeros(batch, 1, self.config.out_dim)
        outputs = []
        for step in range(num_frames):
            x = self.PPE(self.pose_map(previous_pose), offset=step) + id_embedding[:, None]  # (B, 1, latent)
            bias = self.biased_mask[:, step, : step + 1]  # (heads, step+1)
            for index, layer in enumerate(layers):
                x = self._cached_layer(layer, x, keys[index], values[index], bias, heads, cross[index][:, step : step + 1])
            pose = self.pose_map_r(x)  # (B, 1, 6)
            outputs.append(pose)
            if prefix_poses is not None and step < prefix_poses.shape[1]:
                previous_pose = prefix_poses[:, step : step + 1].to(pose.dtype)
            else:
                previous_pose = pose
        return torch.cat(outputs, dim=1)

    @staticmethod
    def _diagonal_cross_attention(layer: nn.TransformerDecoderLayer, memory: torch.Tensor) -> torch.Tensor:
        attention = layer.multihead_attn
        dim = attention.embed_dim
        value = F.linear(memory, attention.in_proj_weight[2 * dim :], attention.in_proj_bias[2 * dim :])
        return attention.out_proj(value)

    @staticmethod
    def _cached_layer(layer, x, key_cache, value_cache, bias, heads, cross_out) -> torch.Tensor:
        """One post-norm decoder layer for the newest position, appending its keys/values to the cache."""
        attention = layer.self_attn
        dim = attention.embed_dim
        q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).split(dim, dim=-1)
        key_cache.append(k)
        value_cache.append(v)
        keys, values = torch.cat(key_cache, dim=1), torch.cat(value_cache, dim=1)  # (B, S, dim)
        batch, length = keys.shape[:2]
        head_dim = dim // heads
        q = q.view(batch, 1, heads, head_dim).transpose(1, 2)
        keys = keys.view(batch, length, heads, head_dim).transpose(1, 2)
        values = values.view(batch, length, heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias[None, :, None, :].to(q.dtype))
        attended = attention.out_proj(attended.transpose(1, 2).reshape(batch, 1, dim))
        x = layer.norm1(x + attended)
        x = layer.norm2(x + cross_out)
        return layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))

    @torch.no_grad()
    def infer_reference(self, input_values: torch.Tensor, num_frames: int, identity: torch.Tensor) -> torch.Tensor:
        """The official re-decoding loop (O(T^2)); kept to check :meth:`infer` against."""
        memory = self.encode_audio(input_values, num_frames)
        batch = memory.shape[0]
        id_embedding = self.id_embed(identity)[:, None]
        pose_embeddings = self.pose_map(memory.new_zeros(batch, 1, self.config.out_dim))
        for _ in range(num_frames):
            tokens = self.PPE(pose_embeddings) + id_embedding
            length = tokens.shape[1]
            tgt_mask = self.biased_mask[:, :length, :length].repeat(batch, 1, 1)
            memory_mask = diagonal_memory_mask(length, memory.shape[1], device=memory.device)
            out = self.pose_map_r(self.transformer_decoder(tokens, memory, tgt_mask=tgt_mask, memory_mask=memory_mask))
            pose_embeddings = torch.cat([pose_embeddings, self.pose_map(out[:, -1:])], dim=1)
        return out
