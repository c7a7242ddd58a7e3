"""The sampler against plain references: greedy = argmax, top-k/top-p masks = a per-row loop,
the exponential race samples the softmax distribution, and seeded rows ignore their batch."""

from __future__ import annotations

import torch
from moeray.workers.io_struct import SamplingParams
from moeray.workers.sampler import Sampler, apply_top_k_top_p, argmax


def reference_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row, the obvious way: keep the top_k best, then the smallest prefix reaching top_p."""
    order = logits.argsort(descending=True).tolist()
    probs = logits.softmax(-1)
    keep: list[int] = []
    mass = 0.0
    for rank, tok in enumerate(order):
        if rank >= top_k or (keep and mass >= top_p):
            break
        keep.append(tok)
        mass += probs[tok].item()
    out = torch.full_like(logits, float("-inf"))
    out[keep] = logits[keep]
    return out


def test_argmax_is_torch_argmax_with_ties_and_nan() -> None:
    """torch.max's indices stand in for torch.argmax: the first maximum of a row, ties and NaN
    included, on batches large enough for torch to split the reduction over threads."""
    g = torch.Generator().manual_seed(0)
    for rows, vocab in [(1, 32000), (64, 32000), (3, 151936), (8, 50)]:
        x = torch.randn(rows, vocab, generator=g)
        x[:, vocab // 3] = x[:, 2 * vocab // 3] = x.max() + 1  # a tie: the first one wins
        x[-1, vocab // 2] = float("nan")  # NaN wins where it is
        assert torch.equal(argmax(x), x.argmax(-1))
        steps = torch.randint(0, 3, (rows, vocab), generator=g).float()  # many ties
        assert torch.equal(argmax(steps), steps.argmax(-1))


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(5, 50)
    params = [SamplingParams(temperature=0.0)] * 5
    assert Sampler()(logits, params, [None] * 5) == logits.argmax(-1).tolist()


def test_top_k_top_p_mask_matches_a_per_row_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    ks = [40, 1, 5, 40, 3, 40]
    ps = [1.0, 1.0, 1.0, 0.5, 0.9, 0.05]
    got = logits.clone()
    apply_top_k_top_p(got, torch.tensor(ks), torch.tensor(ps))
    for row in range(6):
        assert torch.equal(got[row], reference_mask(logits[row], ks[row], ps[row])), row


def test_sampling_follows_the_softmax_distribution() -> None:
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    params = [SamplingParams(temperature=0.7)] * 4000
    tokens = torch.tensor(Sampler()(logits, params, [None] * 4000))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_top_k_one_is_greedy_and_top_p_excludes_the_tail() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]]).repeat(200, 1)
    k1 = Sampler()(logits, [SamplingParams(temperature=1.0, top_k=1)] * 200, [None] * 200)
    assert set(k1) == {1}
    p = Sampler()(logits, [SamplingParams(temperature=1.0, top_p=0.6)] * 200, [None] * 200)
    assert set(p) == {1, 2}  # 0 and 3 lie outside the 0.6 nucleus


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(2)
    mine = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def draws(batch_logits: torch.Tensor, row: int, others: list[SamplingParams]) -> list[int]:
        gen = torch.Generator().manual_seed(1234)
        plist = [*others[:row], params, *others[row:]]
        gens: list[torch.Generator | None] = [None] * len(plist)
        gens[row] = gen
        return [Sampler()(batch_logits, plist, gens)[row] for _ in range(20)]

    alone = draws(mine, 0, [])
    other_rows = torch.randn(3, 100)
    batch = torch.cat([other_rows[:2], mine, other_rows[2:]])
    others = [
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=0.0, seed=9),
        SamplingParams(top_k=3),
    ]
    assert draws(batch, 2, others) == alone
    assert len(set(alone)) > 1  # it really samples
