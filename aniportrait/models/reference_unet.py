"""ReferenceNet: the SD-1.5 UNet run once on the reference image latents, without an output head.

Only its self-attention inputs matter (they are written to the reference bank, see
:mod:`aniportrait.models.reference_attention`), so, as in the official model, it has no
``conv_norm_out``/``conv_out`` and returns the last up-block output. Its state dict is exactly the 682
keys of ``reference_unet.pth`` for the SD-1.5 config.
"""

from __future__ import annotations

import functools
import logging

from diffusers import UNet2DConditionModel
from torch import nn

from aniportrait.errors import AniPortraitError

__all__ = ["ReferenceNet", "SD_OUTPUT_HEAD"]

log = logging.getLogger(__name__)

# Modules of an SD UNet that ReferenceNet drops; their weights in an SD checkpoint are ignored on load.
SD_OUTPUT_HEAD = ("conv_norm_out", "conv_out")


class ReferenceNet(UNet2DConditionModel):
    """diffusers ``UNet2DConditionModel`` (same config and keys) minus ``conv_norm_out``/``conv_out``.

    ``conv_out`` is a parameterless ``Identity`` so diffusers' forward returns the last up-block output
    ``(b, block_out_channels[0], h, w)``.
    """

    # The signature (and hence the registered config) is UNet2DConditionModel's: wraps() exposes it.
    @functools.wraps(UNet2DConditionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_norm_out = None
        self.conv_act = None
        self.conv_out = nn.Identity()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> ReferenceNet:
        """Load an SD-1.5-style UNet (e.g. ``base_model, subfolder="unet"``) or a saved ReferenceNet.

        The SD output head's weights are ignored with a log line that lists them; any other missing or
        unexpected key raises :class:`AniPortraitError` (no silent partial load).
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        ignored = sorted(key for key in info["unexpected_keys"] if key.split(".")[0] in SD_OUTPUT_HEAD)
        unexpected = sorted(set(info["unexpected_keys"]) - set(ignored))
        problems = [f"{name}: {keys}" for name, keys in
                    (("missing keys", sorted(info["missing_keys"])), ("unexpected keys", unexpected),
                     ("keys with another shape", info["mismatched_keys"])) if keys]
        if problems:
            raise AniPortraitError(
                f"ReferenceNet from {pretrained_model_name_or_path}: the weights do not fit an SD-1.5-style UNet: "
                + "; ".join(problems)
            )
        if ignored:
            log.info("ReferenceNet has no output head (official layout); ignored %d weights of %s: %s",
                     len(ignored), pretrained_model_name_or_path, ", ".join(ignored))
        return (model, info) if want_info else model
