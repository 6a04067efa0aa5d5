"""saliency.py: probe selection, accumulated vs normalized scores, GQA grouping, the salient/regular split."""
import math

import pytest
import torch

import saliency


def _causal_attn(q, k):
    """Independent reference: full causal softmax(q k^T / sqrt(D)) per query head, keys repeated for GQA. [B,H,L,L]"""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1).double()
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    L = q.shape[2]
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1)


@pytest.mark.parametrize("L,n_rec,n_rnd", [(1, 1, 0), (19, 1, 0), (20, 1, 1), (840, 42, 42), (4096, 205, 204)])
def test_probe_counts(L, n_rec, n_rnd):
    g = torch.Generator().manual_seed(0)
    p = saliency.probe_positions(L, "recent+random", 0.05, 0.05, generator=g)
    assert p.numel() == n_rec + n_rnd
    rec, rnd = p[n_rnd:], p[:n_rnd]
    assert rec.tolist() == list(range(L - n_rec, L))  # e.g. L = 840 -> [798, 840)
    assert (rnd < L - n_rec).all() and (rnd >= 0).all()


def test_probe_modes():
    g = torch.Generator().manual_seed(1)
    assert saliency.probe_positions(100, "recent", 0.1, 0.5, generator=g).tolist() == list(range(90, 100))
    r = saliency.probe_positions(100, "random", 0.1, 0.1, generator=g)
    assert r.numel() == 10 and (r < 100).all()
    assert saliency.probe_positions(5, "all").tolist() == [0, 1, 2, 3, 4]
    assert saliency.probe_positions(10, "special", special=[7, 3, 3, 12]).tolist() == [3, 7]
    assert saliency.probe_positions(10, "special", special=[]).tolist() == [9]
    with pytest.raises(ValueError, match="special"):
        saliency.probe_positions(10, "special")
    with pytest.raises(ValueError, match="unknown"):
        saliency.probe_positions(10, "first")


def test_special_positions_union_over_batch():
    ids = torch.tensor([[5, 13, 2, 13], [13, 1, 1, 9]])
    assert saliency.special_positions(ids, [13, 9]).tolist() == [0, 1, 3]


def test_probes_seed_reproducible_and_with_replacement():
    a = saliency.probe_positions(4096, generator=torch.Generator().manual_seed(3))
    b = saliency.probe_positions(4096, generator=torch.Generator().manual_seed(3))
    c = saliency.probe_positions(4096, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # 204 draws from 3891 values: with replacement, so the random part is a plain randint stream
    ref = torch.randint(0, 4096 - 205, (204,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[:204], ref)


def test_all_probes_full_norm_is_exact_normalized_score():
    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 23, 8
    q, k = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D)
    got = saliency.probe_scores(q, k, saliency.probe_positions(L, "all"), "normalized", "full")
    A = _causal_attn(q, k)  # [B, H, L, L]
    ref = A.sum(-2).unflatten(1, (Hkv, -1)).sum(2) / (L - torch.arange(L)).double()
    # fp32 softmax vs float64 reference over <= 23 terms: 1e-6 relative is ample
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    acc = saliency.probe_scores(q, k, saliency.probe_positions(L, "all"), "accumulated")
    torch.testing.assert_close(acc.double(), A.sum(-2).unflatten(1, (Hkv, -1)).sum(2), rtol=1e-6, atol=1e-7)


def test_probe_rows_only_and_probe_norm():
    torch.manual_seed(1)
    B, H, L, D = 1, 2, 30, 4
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    rows = torch.tensor([3, 3, 20, 28, 29])  # a duplicate counts twice
    A = _causal_attn(q, k)[:, :, rows]  # [B, H, P, L]
    full = saliency.probe_scores(q, k, rows, "normalized", "full")
    torch.testing.assert_close(full.double(), A.sum(-2) / (L - torch.arange(L)).double(), rtol=1e-6, atol=1e-7)
    probe = saliency.probe_scores(q, k, rows, "normalized", "probe")
    n = torch.tensor([(rows >= j).sum().item() for j in range(L)]).clamp_min(1).double()
    assert (n >= 1).all() and n[0] == 5 and n[4] == 3 and n[29] == 1
    torch.testing.assert_close(probe.double(), A.sum(-2) / n, rtol=1e-6, atol=1e-7)


def test_normalized_fixes_early_token_bias():
    # Fig. 3a-style hand-built causal matrix: token 4 takes half of every row that can see it; the other mass is
    # spread evenly. Accumulated attention still ranks the early tokens first (they collect from every row).
    A = torch.zeros(6, 6)
    for i in range(4):
        A[i, :i + 1] = 1.0 / (i + 1)
    A[4, 4] = 0.5
    A[4, :4] = 0.5 / 4
    A[5, 4] = 0.5
    A[5, [0, 1, 2, 3, 5]] = 0.5 / 5
    assert torch.allclose(A.sum(-1), torch.ones(6))
    rows = torch.arange(6)
    acc = saliency.column_scores(A, rows, 6, "accumulated")
    nrm = saliency.column_scores(A, rows, 6, "normalized", "full")
    assert int(nrm.argmax()) == 4
    assert int(acc.argmax()) == 0 and acc[0] > acc[1] > acc[4]  # 2.31, 1.31 vs 1.0
    torch.testing.assert_close(nrm, A.sum(0) / torch.tensor([6., 5, 4, 3, 2, 1]))
    loc = saliency.column_scores(A, rows, 6, "locality")
    assert loc.tolist() == [0, 1, 2, 3, 4, 5]


def test_gqa_sum_equals_per_head_sum():
    torch.manual_seed(2)
    B, H, Hkv, L, D = 2, 6, 2, 17, 8
    q, k = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D)
    rows = saliency.probe_positions(L, "recent+random", 0.2, 0.2, generator=torch.Generator().manual_seed(0))
    got = saliency.probe_scores(q, k, rows)
    # every query head as its own MHA head (keys repeated), then summed per group
    per_head = saliency.probe_scores(q, k.repeat_interleave(H // Hkv, dim=1), rows)  # [B, H, L]
    torch.testing.assert_close(got, saliency.group_sum(per_head, Hkv), rtol=1e-6, atol=1e-7)


def test_split_counts_and_stable_ties():
    s = torch.tensor([[[0.5, 0.1, 0.1, 0.9, 0.1, 0.3, 0.1, 0.2, 0.6, 0.4]]])
    hi, lo = saliency.split(s, 0.6)  # n_lo = floor(0.4 * 10) = 4
    # four lowest: the 0.1s at positions 1, 2, 4, 6 (ties in position order)
    assert lo.tolist() == [[[1, 2, 4, 6]]] and hi.tolist() == [[[0, 3, 5, 7, 8, 9]]]
    hi, lo = saliency.split(s, 0.7)  # n_lo = 3: the tie at 0.1 sends the earlier positions regular first
    assert lo.tolist() == [[[1, 2, 4]]]
    hi, lo = saliency.split(s, 0.9)  # (1 - 0.9) * 10 = 0.99999... must still give 1
    assert lo.shape[-1] == 1
    for r, n_lo in [(0.0, 10), (1.0, 0)]:
        hi, lo = saliency.split(s, r)
        assert lo.shape[-1] == n_lo and hi.shape[-1] == 10 - n_lo
    hi, lo = saliency.split(torch.zeros(2, 3, 840), 0.6)
    assert lo.shape == (2, 3, 336) and hi.shape == (2, 3, 504)
    assert torch.equal(lo[0, 0], torch.arange(336))  # all ties: the earliest are regular


def test_split_per_sequence_and_head():
    torch.manual_seed(3)
    s = torch.rand(2, 3, 50)
    hi, lo = saliency.split(s, 0.6)
    for b in range(2):
        for h in range(3):
            lo_ref = torch.argsort(s[b, h])[:20].sort().values
            assert torch.equal(lo[b, h], lo_ref)
            assert s[b, h, hi[b, h]].min() >= s[b, h, lo[b, h]].max()


def test_decode_probabilities_are_the_softmax_over_the_whole_cache():
    # the decode kernel's lse covers every cached token; exp(q.k/sqrt(D) - lse) must then be the true probability
    g = torch.Generator().manual_seed(3)
    q, K = torch.randn(2, 4, 16, generator=g), torch.randn(2, 2, 10, 16, generator=g)
    s = torch.einsum("bhd,bhld->bhl", q, K.repeat_interleave(2, 1)) / 4.0               # [B, H, L]
    p = saliency.decode_probabilities(q, K[:, :, -3:], torch.logsumexp(s, -1))
    want = saliency.group_sum(s.softmax(-1)[..., -3:], 2)                                # [B, H_kv, 3]
    torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)


def test_normalize_block_divides_by_the_queries_that_saw_each_row():
    acc = torch.ones(1, 1, 5)
    torch.testing.assert_close(saliency.normalize_block(acc)[0, 0], 1 / torch.tensor([5., 4, 3, 2, 1]))
    # two prompt-tail rows in front: both were seen by all 3 decode queries
    torch.testing.assert_close(saliency.normalize_block(acc, n_tail=2)[0, 0], 1 / torch.tensor([3., 3, 3, 2, 1]))


def test_pool_scores_hand_computed():
    s = torch.tensor([[0.0, 0.0, 9.0, 0.0, 3.0]])
    # w = 1: the mean over each position's neighbours that exist (the ends average two values)
    want = torch.tensor([[0.0, 3.0, 3.0, 4.0, 1.5]])
    assert torch.allclose(saliency.pool_scores(s, 1), want)
    x = torch.rand(2, 3, 17)
    assert saliency.pool_scores(x, 2).shape == x.shape
    assert torch.allclose(saliency.pool_scores(x, 0), x)
