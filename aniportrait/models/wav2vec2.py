"""wav2vec 2.0 encoder that runs its transformer on video-frame positions.

As in the official AniPortrait ``wav2vec2.py``: the convolutional feature encoder's output (50 Hz) is
linearly interpolated (``align_corners=True``) to the number of video frames *before* the feature
projection and the transformer, so every encoder position is one video frame.

The weights come from a ``backbone`` config: a local directory or hub id of wav2vec2-base-960h (the real
path; downloaded and cached by transformers on first use), or a tiny random-init config (tests, the CPU
quickstart). Subclassing transformers' model keeps the official state-dict keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

from aniportrait.errors import AniPortraitError

__all__ = ["FrameAlignedWav2Vec2", "wav2vec2_config_from_backbone", "upgrade_weight_norm_keys", "BASE_960H_CONFIG"]

log = logging.getLogger(__name__)

BASE_960H_CONFIG = Path(__file__).parent / "configs" / "wav2vec2-base-960h.json"


class FrameAlignedWav2Vec2(Wav2Vec2Model):
    """transformers' Wav2Vec2Model with a frame-aligned forward (keys: ``feature_extractor``, ``encoder``, ...)."""

    def frame_features(self, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, S) normalised 16 kHz samples -> (B, num_frames, C) interpolated conv features."""
        features = self.feature_extractor(input_values)  # (B, C, T_conv)
        return F.interpolate(features, size=num_frames, mode="linear", align_corners=True).transpose(1, 2)

    def forward_frames(
        self,
        input_values: torch.Tensor,
        num_frames: int,
        frame_mask: torch.Tensor | None = None,
        output_all_layers: bool = False,
    ) -> torch.Tensor:
        """Encoder states per video frame.

        input_values: (B, S). frame_mask: optional (B, num_frames) bool, True for real frames (padding is
        masked out of the encoder's attention). Returns (B, num_frames, hidden) — the last layer, or the
        mean over the embedding output and every layer with ``output_all_layers`` (the official
        ``only_last_fetures=False`` variant).
        """
        features = self.frame_features(input_values, num_frames)
        hidden, _ = self.feature_projection(features)
        hidden = self._mask_hidden_states(hidden, attention_mask=frame_mask)
        if not output_all_layers:
            return self.encoder(hidden, attention_mask=frame_mask).last_hidden_state
        states = []
        handles = [layer.register_forward_hook(lambda _m, _i, out: states.append(out[0] if isinstance(out, tuple) else out))
                   for layer in self.encoder.layers]
        try:
            self.encoder(hidden, attention_mask=frame_mask)
        finally:
            for handle in handles:
                handle.remove()
        embedded = self._embedding_output(hidden, frame_mask)
        return torch.stack([embedded, *states]).mean(dim=0)

    def _embedding_output(self, hidden: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """The encoder's input after positional conv + layer norm (hidden_states[0] in transformers)."""
        if frame_mask is not None:
            hidden = hidden.masked_fill(~frame_mask[..., None], 0.0)
        if self.config.do_stable_layer_norm:
            return hidden + self.encoder.pos_conv_embed(hidden)
        return self.encoder.layer_norm(hidden + self.encoder.pos_conv_embed(hidden))


def wav2vec2_config_from_backbone(backbone: dict | str | None) -> tuple[Wav2Vec2Config, str | None]:
    """Resolve an audio backbone spec into (config, pretrained weights source or None).

    ``backbone`` is ``{"pretrained": "<dir or hub id>"}`` (weights to load), ``{"config": {...}}`` (random
    init from a config dict: the tiny test/quickstart model), or ``{"config": "base-960h"}`` (the official
    architecture without weights, e.g. before loading a release checkpoint).
    """
    backbone = dict(backbone or {})
    pretrained = backbone.get("pretrained")
    if pretrained:
        try:
            config = Wav2Vec2Config.from_pretrained(pretrained, local_files_only=bool(backbone.get("local_files_only")))
        except OSError as error:
            raise AniPortraitError(
                f"wav2vec2 weights not found: backbone.audio.pretrained={pretrained!r} ({error.__class__.__name__}); "
                "set it to a local copy of facebook/wav2vec2-base-960h (config.json + model weights) or a hub id "
                "reachable from this machine, or use backbone=tiny"
            ) from error
        return config, str(pretrained)
    config_spec = backbone.get("config", "base-960h")
    if config_spec == "base-960h":
        fields = {k: v for k, v in json.loads(BASE_960H_CONFIG.read_text()).items() if not k.startswith("_")}
        return Wav2Vec2Config(**fields), None
    if isinstance(config_spec, dict) or hasattr(config_spec, "items"):
        return Wav2Vec2Config(**dict(config_spec)), None
    raise AniPortraitError(f"backbone.audio.config must be 'base-960h' or a dict of Wav2Vec2Config fields, got {config_spec!r}")


def build_wav2vec2(backbone: dict | None) -> FrameAlignedWav2Vec2:
    """The audio encoder named by a backbone spec, with pretrained weights when it names them."""
    config, pretrained = wav2vec2_config_from_backbone(backbone)
    if pretrained is None:
        return FrameAlignedWav2Vec2(config)
    try:
        return FrameAlignedWav2Vec2.from_pretrained(pretrained, local_files_only=bool((backbone or {}).get("local_files_only")))
    except OSError as error:
        raise AniPortraitError(
            f"cannot load wav2vec2 weights from backbone.audio.pretrained={pretrained!r} ({error}); the folder must "
            "hold config.json and pytorch_model.bin or model.safetensors of wav2vec2-base-960h"
        ) from error


_LEGACY_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def upgrade_weight_norm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torch<2.1 weight-norm keys (``conv.weight_g/_v``) to the parametrization names."""
    out = {}
    for key, value in state_dict.items():
        head, _, leaf = key.rpartition(".")
        if leaf in _LEGACY_WEIGHT_NORM and head.endswith("pos_conv_embed.conv"):
            key = f"{head}.{_LEGACY_WEIGHT_NORM[leaf]}"
        out[key] = value
    return out
