"""The fused CPU decode (decode_cpu.c via decode_cpu.py) against the reference of decode_kernel.py, on the views and
caches tests/test_decode_kernel.py builds, and its fallback where no C compiler is."""
import pytest
import torch
import torch.nn.functional as F

import decode_cpu
import decode_kernel
from test_decode_kernel import STORED_CASES, TORCH_CASES, _stored_views, check_close, make_q, make_view, rel_err

# the fused C path (decode_cpu.c) vs the reference: fp32 math, reassociated sums (vectorized dots), a polynomial exp

needs_c = pytest.mark.skipif(decode_cpu.library() is None, reason="no C compiler: the fused CPU decode is optional")


def check_c(view, q32, ref, ref_lse):
    # ~n·D fp32 roundings of O(1) terms in any order, and exp within ~2 ulp: 1e-5 relative on a few hundred rows
    out, lse = decode_kernel.zip_decode_attention_c(q32, view, return_lse=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5 and (lse - ref_lse).abs().max().item() <= 1e-5, (rel_err(out, ref))
    out16, lse16 = decode_kernel.decode_attention(q32.half(), view, kernel="c", return_lse=True)
    assert out16.dtype == torch.float16
    ref16, ref16_lse = decode_kernel.zip_decode_attention_ref(q32.half().double(), view, return_lse=True)
    check_close(out16, lse16, ref16, ref16_lse, rel=1e-3, mx=2e-3, dl=1e-5)   # output rounding to fp16 only


@needs_c
@pytest.mark.parametrize("case", TORCH_CASES)
def test_c_path_matches_reference(case):
    # poisoned capacity (NaN statistics, 0xFF codes past the rows), pooled statistics, one value scale per row,
    # empty segments, and ragged row tables (each sequence its own), with fp64 reference on the same stored numbers
    B, Hq, Hkv, D, hi, lo, n_buf, pooled, row_scope = case
    view = make_view(B, Hkv, D, hi, lo, n_buf, pooled, row_scope)
    q = make_q(B, Hq, D, torch.float32)
    ref, ref_lse = decode_kernel.zip_decode_attention_ref(q.double(), view, return_lse=True)
    check_c(view, q, ref, ref_lse)


@needs_c
@pytest.mark.parametrize("name", list(STORED_CASES))
def test_stored_view_c_path_matches_reference(name):
    # the view as ZipCache stores it (nested statistics read in place, per-block normalizer, parent table) and its
    # expanded form, every bit width of STORED_CASES, after the prefill, mid-block and after two flushes
    for i, view in enumerate(_stored_views(STORED_CASES[name])):
        B, Hkv = view.k_buf.shape[:2]
        q = make_q(B, 4 * Hkv, view.k_buf.shape[-1], torch.float32, seed=i)
        ref, ref_lse = decode_kernel.zip_decode_attention_ref(q.double(), view, return_lse=True)
        check_c(view, q, ref, ref_lse)
        check_c(view.expand(), q, ref, ref_lse)


@needs_c
def test_c_path_empty_cache_and_dense_view():
    view = make_view(1, 2, 64, ((0,),), ((0,),), n_buf=0)
    out, lse = decode_kernel.zip_decode_attention_c(make_q(1, 4, 64, torch.float32), view, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 2, 300, 64, generator=gen).half(), torch.randn(2, 2, 300, 64, generator=gen).half()
    q = torch.randn(2, 8, 64, generator=gen) * 3                     # peaked softmax: exp over a wide range
    want = F.scaled_dot_product_attention(q[:, :, None].double(), k.double(), v.double(), enable_gqa=True)[:, :, 0]
    got = decode_kernel.decode_attention(q, decode_kernel.dense_view(k, v), kernel="c")
    assert rel_err(got, want) <= 1e-5


def test_c_path_is_never_required(monkeypatch, tmp_path, capsys):
    # a failing compiler: one line on stderr, library() is None, "auto" runs the torch path and "c" says what to do
    monkeypatch.setattr(decode_cpu, "_LIB", None)
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert decode_cpu.library() is None and decode_cpu.library() is None      # tried once
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch path" in err[0]
    view, q = make_view(1, 2, 64), make_q(1, 4, 64, torch.float32)
    assert torch.equal(decode_kernel.decode_attention(q, view), decode_kernel.zip_decode_attention_torch(q, view))
    with pytest.raises(RuntimeError, match="kernel='c' needs"):
        decode_kernel.decode_attention(q, view, kernel="c")
    monkeypatch.setattr(decode_cpu, "_LIB", None)                     # switched off by the environment: no message
    monkeypatch.setenv("ZIPCACHE_CPU_KERNEL", "0")
    assert decode_cpu.library() is None and capsys.readouterr().err == ""
