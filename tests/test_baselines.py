"""baselines.py: KIVI's split between quantized chunks and the fp16 residual, H2O's eviction rule, MiKV's scores,
each against an independent computation. (Every baseline also runs through test_cache.py's shared interface tests:
prefill = SDPA, decode = attention over its own K/V, bytes.)"""
import torch

import quant
from generate import make_cache
from test_cache import mcfg, qkv, run_steps

def test_kivi_split_flush_and_old_codes():
    # L = 37, G = 8, R = 16: keys quantize the first 32 (37 - 37 % 16), values all but the last 16 (21)
    c = make_cache("kivi", mcfg(), bits=2, group=8, residual=16)
    q, k, v = qkv(2, 4, 2, 37, 16, seed=0)
    c.attend(0, q, k, v)
    st = c.layers[0]
    assert (st.kq.n, st.kf.n, st.vq.n, st.vf.n) == (32, 5, 21, 16)
    old = st.kq["k_codes"].clone(), st.vq["v_codes"].clone()
    # per-group error bound: keys per channel over 8 tokens, values per token over 8 channels
    K, V = c.kv(0)
    s = st.kp["k_scale"].float().repeat_interleave(8, 2)
    assert ((K[:, :, :32] - k[:, :, :32]).abs() <= s / 2 + 1e-3).all()
    run_steps(c, 2, 4, 2, 16, 10, seed=1)
    assert (st.kq.n, st.kf.n, st.vq.n, st.vf.n) == (32, 15, 31, 16)
    run_steps(c, 2, 4, 2, 16, 1, seed=2)                    # the 16th fp16 key: one chunk of R keys is quantized
    assert (st.kq.n, st.kf.n, st.vq.n, st.vf.n) == (48, 0, 32, 16)
    assert torch.equal(st.kq["k_codes"][:, :, :32], old[0]) and torch.equal(st.vq["v_codes"][:, :, :21], old[1])


def test_h2o_eviction():
    B, H, Hkv, L, D = 2, 4, 2, 40, 16
    c = make_cache("h2o", mcfg(), heavy_ratio=0.1, recent_ratio=0.1)   # hh = rec = 4
    q, k, v = qkv(B, H, Hkv, L, D, seed=0)
    c.attend(0, q, k, v)
    # prefill keeps the 4 newest plus the top 4 of the rest by accumulated attention over all rows (independent)
    A = torch.softmax((q.double() @ k.repeat_interleave(2, 1).double().transpose(-1, -2) / 4).masked_fill(
        torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1)
    acc = A.sum(-2).unflatten(1, (Hkv, -1)).sum(2)
    top = acc[..., :36].topk(4, -1).indices.sort(-1).values
    assert torch.equal(c.kept_positions(0).long(), torch.cat([top, torch.arange(36, 40).expand(B, Hkv, 4)], -1))
    evicted = {}
    kept_before = c.kept_positions(0)
    for t in range(40, 60):
        run_steps(c, B, H, Hkv, D, 1, seed=t)
        kept = c.kept_positions(0)
        assert kept.shape[-1] == 8 and len(c) == 8 and c.pos == t + 1
        for b in range(B):
            for h in range(Hkv):
                now, before = set(kept[b, h].tolist()), set(kept_before[b, h].tolist()) | {t}
                assert set(range(t - 3, t + 1)) <= now                      # the rec newest are never evicted
                gone = before - now
                assert len(gone) == 1                                       # exactly one eviction per step
                evicted.setdefault((b, h), set()).update(gone)
                assert not (now & evicted[(b, h)])                          # evicted tokens never return
        kept_before = kept


def test_mikv_scores_are_full_matrix_column_sums():
    B, H, Hkv, L, D = 1, 4, 2, 30, 16
    c = make_cache("mikv", mcfg(), salient_ratio=0.5, recent_ratio=0.1)
    q, k, v = qkv(B, H, Hkv, L, D, seed=3)
    c.attend(0, q, k, v)
    A = torch.softmax((q.double() @ k.repeat_interleave(2, 1).double().transpose(-1, -2) / 4).masked_fill(
        torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")), -1)
    acc = A.sum(-2).unflatten(1, (Hkv, -1)).sum(2)
    acc[..., 27:] = float("inf")                                            # floor(0.1 * 30) = 3 recent: salient
    hi = acc.argsort(dim=-1, stable=True)[..., 15:].sort(-1).values              # n_lo = 15
    codes, _, _ = quant.quantize(torch.gather(k, 2, hi[..., None].expand(-1, -1, -1, D)), 4, dim=-1)
    assert torch.equal(c.layers[0].hi["k_codes"], quant.pack(codes, 4))
