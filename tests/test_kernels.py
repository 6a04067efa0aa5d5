"""kernels.py: the Triton decode kernel (interpreter on CPU) and the torch fast path against the dequantize-everything
reference, over the case list, invariants and poisoning of spec kernels.md §5."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import kernels
import quant
from kernels import ZipLayerView, ZipSegment

NAN16 = float("nan")


# -----------------------------------------------------------------------------
# building a ZipLayerView the way cache.py does: quant.py's quantizer on random K/V, per (block, precision group)

def _kv(gen, Hkv, n, D):
    """Random K with strong outlier channels (as real post-RoPE keys have) and V with one all-zero channel."""
    k = torch.randn(Hkv, n, D, generator=gen)
    k[:, :, 3] = k[:, :, 3] * 12 + 20          # big-offset outlier channel: the channelwise min carries it
    k[:, :, D // 2 + 5] *= 15                  # big-range outlier channel
    v = torch.randn(Hkv, n, D, generator=gen)
    v[:, :, 7] = 0.0                           # all-zero channel: CST normalizer clamps to scale_eps
    v[:, :, 11] *= 8
    return k, v


def make_view(B=1, Hkv=2, D=64, hi=((70,),), lo=((40,),), n_buf=17, pooled=False, row_scope=False,
              nb_cap=None, buf_cap=None, seed=0, poison=True):
    """hi/lo: per sequence, the rows of each block in that segment (ragged across sequences is allowed).
    pooled: Bs = 1 (key params and normalizer pooled over the batch); row_scope: Hv = 1 (one value pair per row).
    poison: everything the kernel must not read (capacity beyond the used rows, block slots beyond n_blocks,
    params of empty blocks, buffer rows beyond n_buf) is 0xFF codes / NaN."""
    gen = torch.Generator().manual_seed(seed)
    nb = len(hi[0])
    assert all(len(h) == nb for h in hi) and all(len(x) == nb for x in lo) and len(hi) == len(lo) == B
    nb_cap = nb_cap or nb + 2
    buf_cap = buf_cap or n_buf + 5
    fill16 = NAN16 if poison else 0.0
    fill8 = 255 if poison else 0
    Bs, Hv = (1 if pooled else B), (1 if row_scope else Hkv)
    segs = {}
    for name, bits, lens in (("hi", 4, hi), ("lo", 2, lo)):
        cap = max(sum(l) for l in lens) + 3
        W = D * bits // 8
        segs[name] = dict(
            bits=bits,
            k_codes=torch.full((B, Hkv, cap, W), fill8, dtype=torch.uint8),
            v_codes=torch.full((B, Hkv, cap, W), fill8, dtype=torch.uint8),
            v_scale=torch.full((B, Hv, cap), fill16, dtype=torch.float16),
            v_min=torch.full((B, Hv, cap), fill16, dtype=torch.float16),
            k_scale=torch.full((Bs, nb_cap, Hkv, D), fill16, dtype=torch.float16),
            k_min=torch.full((Bs, nb_cap, Hkv, D), fill16, dtype=torch.float16),
            rows=torch.full((B, nb_cap + 1), 2 ** 30 if poison else 0, dtype=torch.int32))
        for b in range(B):
            segs[name]["rows"][b, :nb + 1] = torch.tensor([0] + list(lens[b])).cumsum(0)
    v_chan = torch.full((Bs, nb_cap, Hkv, D), fill16, dtype=torch.float16)
    for k in range(nb):
        # tokens of block k: per sequence, its hi rows then its lo rows (storage order inside a block is free)
        kv = [_kv(gen, Hkv, hi[b][k] + lo[b][k], D) for b in range(B)]
        groups = range(1) if pooled else range(B)       # pooled: one set of statistics over all sequences
        for g in groups:
            members = list(range(B)) if pooled else [g]
            allv = torch.cat([kv[b][1] for b in members], 1)
            chan = quant.cst_normalizer(allv) if allv.shape[1] else None  # [Hkv, 1, D], over both groups
            if chan is not None:
                v_chan[g, k] = chan[:, 0]
            for name, off in (("hi", lambda b: 0), ("lo", lambda b: hi[b][k])):
                s = segs[name]
                lens = hi if name == "hi" else lo
                ks = [kv[b][0][:, off(b):off(b) + lens[b][k]] for b in members]
                vs = [kv[b][1][:, off(b):off(b) + lens[b][k]] for b in members]
                if sum(x.shape[1] for x in ks) == 0:
                    continue                              # empty group: no parameters (left poisoned)
                kc, ksc, kmn = quant.quantize(torch.cat(ks, 1), s["bits"], dim=-2)   # channelwise over tokens
                s["k_scale"][g, k], s["k_min"][g, k] = ksc[:, 0], kmn[:, 0]
                t0 = 0
                for b, vb in zip(members, vs):
                    n = vb.shape[1]
                    r0 = int(s["rows"][b, k])
                    s["k_codes"][b, :, r0:r0 + n] = quant.pack(kc[:, t0:t0 + n], s["bits"])
                    t0 += n
                    if n == 0:
                        continue
                    vc, vsc, vmn, _ = quant.quantize_cst(vb, s["bits"], token_dims=(0, -1) if row_scope else (-1,),
                                                         chan=chan)
                    s["v_codes"][b, :, r0:r0 + n] = quant.pack(vc, s["bits"])
                    s["v_scale"][b, :, r0:r0 + n] = vsc[..., 0]
                    s["v_min"][b, :, r0:r0 + n] = vmn[..., 0]
    k_buf = torch.full((B, Hkv, buf_cap, D), fill16, dtype=torch.float16)
    v_buf = torch.full((B, Hkv, buf_cap, D), fill16, dtype=torch.float16)
    kb, vb = _kv(gen, Hkv * B, n_buf, D)
    k_buf[:, :, :n_buf] = kb.view(B, Hkv, n_buf, D).half()
    v_buf[:, :, :n_buf] = vb.view(B, Hkv, n_buf, D).half()
    return ZipLayerView(ZipSegment(**segs["hi"]), ZipSegment(**segs["lo"]), v_chan, k_buf, v_buf, n_buf, nb)


def make_q(B, Hq, D, dtype=torch.float16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, D, generator=gen) * 0.5).half().to(dtype)  # fp16-exact values


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_close(out, lse, ref_out, ref_lse, rel=2e-3, mx=1e-2, dl=1e-3):
    # kernels.md §5.3 bounds vs the fp32 reference on the *dequantized* cache (isolates kernel error from
    # quantization error): p and q⊙a are rounded to fp16 for the dots, ~3-7e-4 relative expected.
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref_out) <= rel, rel_err(out, ref_out)
    assert (out.float() - ref_out.float()).abs().max().item() <= mx
    assert (lse - ref_lse).abs().max().item() <= dl


# -----------------------------------------------------------------------------
# torch fast path vs the reference (both fp32 or fp64 math: agreement to rounding)

TORCH_CASES = [
    # B, Hq, Hkv, D, hi rows per block per seq, lo rows, n_buf, pooled, row_scope
    (1, 4, 4, 64, ((70,),), ((40,),), 17, False, False),
    (2, 8, 2, 128, ((5, 0, 70), (64, 1, 2)), ((3, 9, 0), (0, 65, 100)), 99, False, True),
    (2, 6, 2, 64, ((1, 63), (0, 64)), ((65, 0), (2, 3)), 0, True, False),
    (2, 8, 1, 64, ((0,), (0,)), ((0,), (0,)), 1, True, True),
]


@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_path_matches_reference(case):
    B, Hq, Hkv, D, hi, lo, n_buf, pooled, row_scope = case
    view = make_view(B, Hkv, D, hi, lo, n_buf, pooled, row_scope)
    q = make_q(B, Hq, D, torch.float64)
    ref, ref_lse = kernels.zip_decode_attention_ref(q, view, return_lse=True)
    # small chunks so blocks span several chunks (the online softmax across chunks is exercised)
    out, lse = kernels.zip_decode_attention_torch(q, view, return_lse=True, chunk=16)
    # fp64 on both sides: only summation order differs
    assert torch.allclose(out, ref, rtol=0, atol=1e-10) and torch.allclose(lse, ref_lse, rtol=0, atol=1e-10)
    out16, lse16 = kernels.decode_attention(q.half(), view, kernel="torch", return_lse=True)
    assert out16.dtype == torch.float16 and lse16.dtype == torch.float32
    check_close(out16, lse16, ref, ref_lse, rel=1e-3, mx=2e-3, dl=1e-5)  # output rounding to fp16 only


def test_reference_matches_dense_attention_on_dequantized_cache():
    # independent check of the reference itself: dequantize with quant.py's helpers and run SDPA
    B, Hq, Hkv, D = 1, 4, 2, 64
    view = make_view(B, Hkv, D, ((30, 5),), ((10, 0),), n_buf=7, poison=False)
    q = make_q(B, Hq, D, torch.float32)
    Ks, Vs = [], []
    for seg in view.segments:
        for k in range(view.n_blocks):
            r0, r1 = int(seg.rows[0, k]), int(seg.rows[0, k + 1])
            if r1 == r0:
                continue
            x = quant.unpack(seg.k_codes[0, :, r0:r1], seg.bits)
            y = quant.unpack(seg.v_codes[0, :, r0:r1], seg.bits)
            Ks.append(quant.dequantize(x, seg.k_scale[0, k][:, None], seg.k_min[0, k][:, None]))
            Vs.append(quant.dequantize_cst(y, seg.v_scale[0, :, r0:r1, None], seg.v_min[0, :, r0:r1, None],
                                           view.v_chan[0, k][:, None]))
    Ks.append(view.k_buf[0, :, :7].float())
    Vs.append(view.v_buf[0, :, :7].float())
    K, V = torch.cat(Ks, 1)[None], torch.cat(Vs, 1)[None]
    want = F.scaled_dot_product_attention(q[:, :, None], K, V, enable_gqa=True)[:, :, 0]
    got = kernels.zip_decode_attention_ref(q, view)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_empty_cache_gives_zero_and_minus_inf():
    view = make_view(1, 2, 64, ((0,),), ((0,),), n_buf=0)
    q = make_q(1, 4, 64)
    for fn in (kernels.zip_decode_attention_ref, kernels.zip_decode_attention_torch):
        out, lse = fn(q, view, return_lse=True)
        assert (out == 0).all() and (lse == float("-inf")).all()


def test_dense_view_torch_equals_sdpa():
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 37, 64, generator=gen).half(), torch.randn(2, 2, 37, 64, generator=gen).half()
    q = torch.randn(2, 8, 64, generator=gen).half()
    want = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), enable_gqa=True)[:, :, 0]
    got = kernels.decode_attention(q, kernels.dense_view(k, v), kernel="torch")
    assert (got.float() - want).abs().max().item() < 2e-3  # fp16 output rounding


def test_dispatch_errors():
    view = make_view(1, 2, 64)
    q = make_q(1, 4, 64)
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.decode_attention(q, view, kernel="cuda")
    with pytest.raises(ValueError, match="multiple of H_kv"):
        kernels.decode_attention(make_q(1, 3, 64), view, kernel="torch")
    with pytest.raises(ValueError, match=r"\[B, H_q, D\]"):
        kernels.decode_attention(q[:, :, None], view, kernel="torch")
    # "auto" on CPU is the torch path
    assert torch.equal(kernels.decode_attention(q, view), kernels.decode_attention(q, view, kernel="torch"))


def test_pick_num_splits():
    assert kernels.pick_num_splits(64, 8, 32768, 132) == 1          # B·H_kv fills the GPU
    assert kernels.pick_num_splits(1, 8, 32768, 132) == 64          # long context, few heads: many splits
    assert kernels.pick_num_splits(1, 8, 600, 132) == 1             # >= 512 tokens per split
    for args in [(8, 8, 32768, 132), (2, 2, 5000, 132), (3, 5, 10 ** 6, 1)]:
        s = kernels.pick_num_splits(*args)
        assert 1 <= s <= 64 and s & (s - 1) == 0
