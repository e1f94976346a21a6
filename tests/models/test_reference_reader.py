"""The reference reader's projections-once path equals attention over cat([own, reference]) tokens (issue 8)."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from aniportrait.models.reference_attention import ReferenceReaderProcessor, _attend, _ReadState


class _Control:
    def __init__(self, bank, cache=False):
        self.bank = {"block": bank}
        self.projection_cache = {}
        self.read_state = None


def _naive(attn, hidden, bank, frames, uncond):
    rows = hidden.shape[0]
    reference = bank.expand(rows, -1, -1) if bank.shape[0] == 1 else bank.repeat_interleave(frames, dim=0)
    out = []
    for row in range(rows):
        own = hidden[row : row + 1]
        context = own if uncond is not None and uncond[row] else torch.cat([own, reference[row : row + 1]], dim=1)
        out.append(_attend(attn, own, context))
    return torch.cat(out)


@pytest.mark.parametrize("samples,frames,bank_rows,mask", [
    (2, 3, 1, None),                    # all conditional, one shared reference
    (4, 2, 1, [True, True, False, False]),  # [uncond; cond]
    (3, 2, 3, [False, True, False]),    # interleaved, one reference per sample
    (2, 2, 2, [True, True]),            # all unconditional
])
def test_reader_equals_attention_over_joined_tokens(samples, frames, bank_rows, mask):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    hidden = torch.randn(samples * frames, 5, 16)
    bank = torch.randn(bank_rows, 7, 16)
    uncond = None if mask is None else torch.tensor(mask)
    for cache in (False, True):
        control = _Control(bank)
        control.read_state = _ReadState(num_frames=frames, uncond_mask=uncond, cache_projections=cache)
        reader = ReferenceReaderProcessor(control, "block")
        expected = _naive(attn, hidden, bank, frames, None if uncond is None else uncond.repeat_interleave(frames))
        torch.testing.assert_close(reader(attn, hidden), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reader(attn, hidden), expected, atol=1e-5, rtol=1e-5)  # again (from the cache)
        assert bool(control.projection_cache) == cache
