"""Audio2Mesh: speech -> per-frame offsets of the 468-vertex canonical face mesh.

Same computation and state-dict keys as the official ``Audio2MeshModel``: a frame-aligned wav2vec2
encoder, then ``in_fn`` (hidden -> latent) and ``out_fn`` (latent -> 1404 = 468 x 3), with no
nonlinearity between them and ``out_fn`` zero-initialised. The output is added to the portrait's
reference mesh (``mesh3d``) to get each frame's mesh.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import Wav2Vec2Config

from aniportrait.models.wav2vec2 import FrameAlignedWav2Vec2

__all__ = ["Audio2Mesh"]


class Audio2Mesh(ModelMixin, ConfigMixin):
    """``forward(input_values (B, S), num_frames) -> (B, num_frames, 1404)`` mesh offsets (cm)."""

    config_name = "audio2mesh_config.json"

    @register_to_config
    def __init__(
        self,
        wav2vec2_config: dict | None = None,
        latent_dim: int = 512,
        out_dim: int = 1404,
        only_last_features: bool = True,
    ):
        super().__init__()
        config = Wav2Vec2Config(**(wav2vec2_config or {}))
        self.audio_encoder = FrameAlignedWav2Vec2(config)
        self.audio_encoder.feature_extractor._freeze_parameters()  # the official model never trains the conv stack
        self.in_fn = nn.Linear(config.hidden_size, latent_dim)
        self.out_fn = nn.Linear(latent_dim, out_dim)
        nn.init.zeros_(self.out_fn.weight)
        nn.init.zeros_(self.out_fn.bias)

    def forward(self, input_values: torch.Tensor, num_frames: int, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.audio_encoder.forward_frames(
            input_values, num_frames, frame_mask=frame_mask, output_all_layers=not self.config.only_last_features
        )  # (B, T, hidden)
        return self.out_fn(self.in_fn(hidden))  # (B, T, 1404)

    @torch.no_grad()
    def infer(self, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The official ``infer``: eval-mode forward without gradients."""
        return self.forward(input_values, num_frames)
