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

from collections.abc import Mapping
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


def _heads(attn: Attention, tokens: torch.Tensor) -> torch.Tensor:
    """(n, L, heads * d) -> (n, heads, L, d)."""
    return tokens.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _sdpa(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Projected (n, L, C) queries, keys and values -> the layer's output (n, L, C)."""
    out = F.scaled_dot_product_attention(_heads(attn, query), _heads(attn, key), _heads(attn, value), scale=attn.scale)
    out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (n, L, heads * d)
    return attn.to_out[1](attn.to_out[0](out))


def _attend(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``attn``'s projections and SDPA: queries from ``hidden_states`` (n, L, C), keys/values from ``context``."""
    return _sdpa(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))


def _refuse_mask(path: str, attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None:
        raise AniPortraitError(f"{path}: reference attention does not take a self-attention mask (SD UNets use none)")


@dataclass(frozen=True)
class _ReadState:
    num_frames: int
    uncond_mask: torch.Tensor | None  # (b,) bool on the CPU (no device sync), True = own tokens only
    cache_projections: bool = False  # keep the reference keys/values between calls (bank and weights fixed)


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
    """Self-attention whose keys/values are the block's own tokens plus the bank's, while the control reads.

    Keys and values are linear in the tokens, so the reference tokens are projected once per reference (not
    once per frame that repeats them) and joined with the projections of the block's own tokens: the same
    attention as projecting ``cat([own, reference])``. A ``[uncond; cond]`` batch is split by slicing, without
    a device synchronisation. With ``read(cache_projections=True)`` (inference: the bank and the weights stay
    fixed over the denoising steps) the reference projections are computed once per ``read``.
    """

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
        uncond = self._uncond_rows(state, rows)  # (b f,) bool on the CPU, or None
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        reference_key, reference_value = self._reference_projections(attn, state, hidden_states.dtype)
        if uncond is None or not uncond.any():
            return self._with_reference(attn, query, key, value, reference_key, reference_value, state, slice(0, rows),
                                        rows)
        split = int(uncond.sum())
        if bool(uncond[:split].all()):  # the usual [uncond; cond] layout: slice, no gather
            own = _sdpa(attn, query[:split], key[:split], value[:split])
            if split == rows:
                return own
            referenced = self._with_reference(attn, query[split:], key[split:], value[split:], reference_key,
                                              reference_value, state, slice(split, rows), rows)
            return torch.cat([own, referenced])
        out = torch.empty_like(hidden_states)
        own_rows = uncond.to(hidden_states.device)
        out[own_rows] = _sdpa(attn, query[own_rows], key[own_rows], value[own_rows])
        referenced_rows = (~uncond).nonzero().flatten()
        for row in referenced_rows.tolist():  # rare layouts only: interleaved conditional rows
            out[row : row + 1] = self._with_reference(attn, query[row : row + 1], key[row : row + 1],
                                                      value[row : row + 1], reference_key, reference_value, state,
                                                      slice(row, row + 1), rows)
        return out

    def _reference_projections(self, attn: Attention, state: _ReadState, dtype: torch.dtype):
        cache = self.control.projection_cache if state.cache_projections else None
        if cache is not None and self.path in cache:
            return cache[self.path]
        bank = self.control.bank[self.path].to(dtype)  # (b_ref, L_ref, C)
        projections = (attn.to_k(bank), attn.to_v(bank))
        if cache is not None:
            cache[self.path] = projections
        return projections

    def _with_reference(self, attn: Attention, query, key, value, reference_key, reference_value,
                        state: _ReadState, rows: slice, total_rows: int) -> torch.Tensor:
        """Attention of ``rows`` (of ``total_rows``) over their own keys/values and their reference's."""
        reference_key = self._reference_rows(reference_key, rows, state.num_frames, total_rows)
        reference_value = self._reference_rows(reference_value, rows, state.num_frames, total_rows)
        return _sdpa(attn, query, torch.cat([key, reference_key], dim=1), torch.cat([value, reference_value], dim=1))

    def _reference_rows(self, projected: torch.Tensor, rows: slice, num_frames: int, total: int) -> torch.Tensor:
        """The reference projections (b_ref, L_ref, C) for batch rows ``rows`` (each sample's over its frames)."""
        if projected.shape[0] == 1:  # one reference shared by the whole batch
            return projected.expand(rows.stop - rows.start, -1, -1)
        if projected.shape[0] * num_frames == total:
            return projected.repeat_interleave(num_frames, dim=0)[rows]
        raise AniPortraitError(
            f"{self.path}: the denoising UNet has {total} rows (batch x {num_frames} frames) but the bank holds "
            f"{projected.shape[0]} reference samples: run the ReferenceNet on one reference per sample (or one in "
            "all), and pass read(num_frames=...) the frames per sample"
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
        self.projection_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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

    def add_reader(self, unet: nn.Module) -> None:
        """Make another UNet of the denoising UNet's structure read this bank too (a distilled student beside its
        teacher: one ReferenceNet pass, read by both)."""
        paths = self_attention_paths(unet)
        if tuple(paths) != self.paths:
            raise AniPortraitError(f"add_reader: the UNet's self-attention blocks differ from the denoising UNet's "
                                   f"({len(paths)} vs {len(self.paths)} blocks)")
        for path in self.paths:
            attn = unet.get_submodule(path)
            processor = ReferenceReaderProcessor(self, path)
            attn.set_processor(processor)
            self._processors.append((attn, processor))

    def write(self) -> None:
        """Empty the bank and store the self-attention tokens of the next ReferenceNet forward."""
        self._check_installed()
        self.bank.clear()
        self.projection_cache.clear()
        self.writing = True
        self.read_state = None

    def keep_bank(self, samples: slice | None = None, dtype: torch.dtype | None = None) -> None:
        """Keep only ``samples`` of the written bank's batch, stored in ``dtype`` (None: as written). The official
        reader keeps float16 copies of the conditional half (``ReferenceAttentionControl.update``)."""
        for path, tokens in self.bank.items():
            tokens = tokens if samples is None else tokens[samples]
            self.bank[path] = tokens if dtype is None else tokens.to(dtype)
        self.projection_cache.clear()

    def read(self, num_frames: int, uncond_mask: torch.Tensor | None = None, cache_projections: bool = False) -> None:
        """Make the denoising UNet attend to the bank.

        num_frames: frames per sample in the denoising batch (1 for single images). uncond_mask: (b,) bool
        over the denoising samples, True where the sample is unconditional (CFG): those attend to their
        own tokens only. For a ``[uncond; cond]`` batch of 2n samples that is ``[True] * n + [False] * n``.
        cache_projections: keep the reference keys/values between UNet calls (inference, where neither the bank nor
        the weights change between denoising steps); never while training. The cache lives until the next
        write() or clear().
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
        self.read_state = _ReadState(num_frames=int(num_frames), uncond_mask=uncond_mask,
                                     cache_projections=bool(cache_projections))

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The bank and the cached reference projections, to :meth:`restore` for another video of the same
        reference and weights (the tensors themselves, not copies: nothing here modifies them in place)."""
        return dict(self.bank), dict(self.projection_cache)

    def restore(self, bank: Mapping[str, torch.Tensor],
                projections: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put back a :meth:`snapshot`: as if the ReferenceNet had just written ``bank`` (call ``read`` next)."""
        self._check_installed()
        missing = [path for path in self.paths if path not in bank]
        if missing:
            raise AniPortraitError(f"restore: the bank lacks {len(missing)} of {len(self.paths)} blocks "
                                   f"(e.g. {missing[0]}); give a snapshot() of this control")
        self.bank, self.projection_cache = dict(bank), dict(projections)
        self.writing, self.read_state = False, None

    def clear(self) -> None:
        """Drop the bank; both UNets compute ordinary self-attention until the next write()/read()."""
        self.bank.clear()
        self.projection_cache.clear()
        self.writing = False
        self.read_state = None

    def _check_installed(self) -> None:
        replaced = sorted({processor.path for attn, processor in self._processors if attn.processor is not processor})
        if replaced:
            raise AniPortraitError(
                f"the reference attention processors of {replaced[:3]} were replaced (set_attn_processor?): "
                "create the ReferenceAttentionControl after changing attention processors"
            )
