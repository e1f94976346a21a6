"""Reference attention (AnimateAnyone / AniPortrait ``mutual_self_attention.py``, ``fusion_blocks="full"``)
through diffusers attention processors instead of monkey-patched forwards.

* A **writer** processor on every self-attention (``attn1`` of each ``BasicTransformerBlock``) of the
  ReferenceNet stores the tokens it receives (the ``norm1``-normed hidden states) in a bank, then computes
  ordinary self-attention.
* A **reader** processor on the matching ``attn1`` of the denoising UNet attends from its own tokens to
  ``cat([own tokens, bank tokens repeated over the frames])``. Samples marked unconditional (the first
  half of a ``[uncond; cond]`` classifier-free-guidance batch) attend to their own tokens only, exactly as
  the official reader recomputes them.

Blocks are paired by module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1`` reads what the
same path wrote). The official code pairs them by sorting each UNet's blocks by width; for two UNets of the
same structure this gives the same pairs (tested). Usage::

    control = ReferenceAttentionControl(reference_unet, denoising_unet)
    control.write()
    reference_unet(ref_latents, torch.zeros_like(t), clip_embeds)       # fills the bank
    control.read(num_frames=f, uncond_mask=uncond)                        # uncond: (b,) bool or None
    denoising_unet(latents, t, clip_embeds, pose_cond_fea=pose_features)  # reads it (every step)
    control.clear()                                                       # after backward, if training

The bank keeps the autograd graph, so training the denoising loss trains the ReferenceNet too; with
gradient checkpointing keep the bank (do not ``clear``) until ``backward`` has run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from aniportrait.errors import AniPortraitError

__all__ = [
    "ReferenceAttentionControl",
    "ReferenceWriterProcessor",
    "ReferenceReaderProcessor",
    "self_attention_paths",
]


def self_attention_paths(unet: nn.Module) -> list[str]:
    """Module paths of the self-attention (``attn1``) of every ``BasicTransformerBlock``, in module order."""
    paths = []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            if module.only_cross_attention:
                raise AniPortraitError(f"{name}: reference attention needs a self-attention attn1 (only_cross_attention)")
            paths.append(f"{name}.attn1")
    return paths


def _attend(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``attn``'s projections and SDPA: queries from ``hidden_states`` (n, L, C), keys/values from ``context``."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = query.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)  # (n, heads, L, head_dim)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def _refuse_mask(path: str, attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None:
        raise AniPortraitError(f"{path}: reference attention does not take a self-attention mask (SD UNets use none)")


@dataclass(frozen=True)
class _ReadState:
    num_frames: int
    uncond_mask: torch.Tensor | None  # (b,) bool on the CPU (no device sync), True = own tokens only


class ReferenceWriterProcessor:
    """Self-attention that also stores its input tokens (b, L, C) in the bank while the control writes."""

    def __init__(self, control: ReferenceAttentionControl, path: str):
        self.control = control
        self.path = path

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask: torch.Tensor | None = None, temb=None) -> torch.Tensor:
        _refuse_mask(self.path, attention_mask)
        if self.control.writing:
            self.control.bank[self.path] = hidden_states
        return _attend(attn, hidden_states, hidden_states)


class ReferenceReaderProcessor:
    """Self-attention whose keys/values are the block's own tokens plus the bank's, while the control reads."""

    def __init__(self, control: ReferenceAttentionControl, path: str):
        self.control = control
        self.path = path

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask: torch.Tensor | None = None, temb=None) -> torch.Tensor:
        _refuse_mask(self.path, attention_mask)
        state = self.control.read_state
        if state is None:
            return _attend(attn, hidden_states, hidden_states)
        rows = hidden_states.shape[0]  # b f
        reference = self._reference_tokens(rows, state.num_frames).to(hidden_states.dtype)  # (b f, L_ref, C)
        uncond = self._uncond_rows(state, rows)  # (b f,) bool on the CPU, or None
        if uncond is None or not uncond.any():
            return _attend(attn, hidden_states, torch.cat([hidden_states, reference], dim=1))
        out = torch.empty_like(hidden_states)
        own = uncond.to(hidden_states.device)
        out[own] = _attend(attn, hidden_states[own], hidden_states[own])
        if not uncond.all():
            referenced = ~own
            out[referenced] = _attend(attn, hidden_states[referenced],
                                      torch.cat([hidden_states[referenced], reference[referenced]], dim=1))
        return out

    def _reference_tokens(self, rows: int, num_frames: int) -> torch.Tensor:
        bank = self.control.bank[self.path]  # (b_ref, L_ref, C)
        if bank.shape[0] * num_frames == rows:  # each sample's reference repeated over its frames: (b f)
            return bank.repeat_interleave(num_frames, dim=0)
        if bank.shape[0] == 1:  # one reference shared by the whole batch
            return bank.expand(rows, -1, -1)
        raise AniPortraitError(
            f"{self.path}: the denoising UNet has {rows} rows (batch x {num_frames} frames) but the bank holds "
            f"{bank.shape[0]} reference samples: run the ReferenceNet on one reference per sample (or one in all), "
            "and pass read(num_frames=...) the frames per sample"
        )

    def _uncond_rows(self, state: _ReadState, rows: int) -> torch.Tensor | None:
        if state.uncond_mask is None:
            return None
        if state.uncond_mask.shape[0] * state.num_frames != rows:
            raise AniPortraitError(
                f"{self.path}: uncond_mask has {state.uncond_mask.shape[0]} entries but the batch has "
                f"{rows // state.num_frames} samples of {state.num_frames} frames"
            )
        return state.uncond_mask.repeat_interleave(state.num_frames)


class ReferenceAttentionControl:
    """Installs writer processors in ``reference_unet`` and reader processors in ``denoising_unet``.

    ``write()`` arms the writers (the next ReferenceNet forward fills the bank); ``read(num_frames,
    uncond_mask)`` makes the readers use the bank; ``clear()`` empties the bank and returns both UNets to
    ordinary self-attention (e.g. for reference dropout, where the official reader sees an empty bank).
    """

    def __init__(self, reference_unet: nn.Module, denoising_unet: nn.Module):
        writer_paths = self_attention_paths(reference_unet)
        reader_paths = self_attention_paths(denoising_unet)
        if writer_paths != reader_paths:
            raise AniPortraitError(
                "reference attention pairs blocks by module path, but the UNets differ: only in the ReferenceNet "
                f"{sorted(set(writer_paths) - set(reader_paths))}, only in the denoising UNet "
                f"{sorted(set(reader_paths) - set(writer_paths))}"
            )
        self.paths: tuple[str, ...] = tuple(writer_paths)
        self.bank: dict[str, torch.Tensor] = {}
        self.writing = False
        self.read_state: _ReadState | None = None
        self._processors: list[tuple[Attention, object]] = []
        for path in self.paths:
            writer_attn = reference_unet.get_submodule(path)
            reader_attn = denoising_unet.get_submodule(path)
            for attn in (writer_attn, reader_attn):
                if (attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None
                        or attn.residual_connection or attn.rescale_output_factor != 1.0):
                    raise AniPortraitError(f"{path}: reference attention supports plain SD self-attention layers only")
            if writer_attn.to_q.in_features != reader_attn.to_q.in_features:
                raise AniPortraitError(
                    f"{path}: ReferenceNet width {writer_attn.to_q.in_features} != denoising UNet width "
                    f"{reader_attn.to_q.in_features}"
                )
            for attn, processor in ((writer_attn, ReferenceWriterProcessor(self, path)),
                                    (reader_attn, ReferenceReaderProcessor(self, path))):
                attn.set_processor(processor)
                self._processors.append((attn, processor))

    def write(self) -> None:
        """Empty the bank and store the self-attention tokens of the next ReferenceNet forward."""
        self._check_installed()
        self.bank.clear()
        self.writing = True
        self.read_state = None

    def read(self, num_frames: int, uncond_mask: torch.Tensor | None = None) -> None:
        """Make the denoising UNet attend to the bank.

        num_frames: frames per sample in the denoising batch (1 for single images). uncond_mask: (b,) bool
        over the denoising samples, True where the sample is unconditional (CFG): those attend to their
        own tokens only. For a ``[uncond; cond]`` batch of 2n samples that is ``[True] * n + [False] * n``.
        """
        self._check_installed()
        absent = [path for path in self.paths if path not in self.bank]
        if absent:
            raise AniPortraitError(
                f"reference bank is missing {len(absent)} of {len(self.paths)} blocks (e.g. {absent[0]}): call "
                "write() and run the ReferenceNet before read()"
            )
        if uncond_mask is not None:
            uncond_mask = torch.as_tensor(uncond_mask, dtype=torch.bool).reshape(-1).cpu()
        self.writing = False
        self.read_state = _ReadState(num_frames=int(num_frames), uncond_mask=uncond_mask)

    def clear(self) -> None:
        """Drop the bank; both UNets compute ordinary self-attention until the next write()/read()."""
        self.bank.clear()
        self.writing = False
        self.read_state = None

    def _check_installed(self) -> None:
        replaced = sorted({processor.path for attn, processor in self._processors if attn.processor is not processor})
        if replaced:
            raise AniPortraitError(
                f"the reference attention processors of {replaced[:3]} were replaced (set_attn_processor?): "
                "create the ReferenceAttentionControl after changing attention processors"
            )
