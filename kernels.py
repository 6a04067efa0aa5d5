"""
Decode attention over the ZipCache layer layout: one new query token per sequence attends to
[4-bit blocks | 2-bit blocks | fp16 buffer] without ever materializing a dequantized cache.   (spec kernels.md)

    ZipLayerView                the per-layer layout cache.py stores (kernels.md §1, zipcache.md §4.2)
    zip_decode_attention_ref    oracle: dequantize everything, fp32 softmax attention            (kernels.md §4)
    zip_decode_attention_torch  CPU fast path: the kernel's algebra in torch, one block at a time
    zip_decode_attention        the fused Triton kernel: split-K flash-decoding + a combine kernel (kernels.md §2-3)
    decode_attention            the one dispatch cache.py calls: kernel="auto" | "triton" | "torch"
    dense_view, pick_num_splits flash-decoding baseline on a plain fp16 cache; split heuristic

The algebra every fast path uses (kernels.md §2). For a row t of block k,
    K̂[t,d] = a[k,d]·x[t,d] + μ[k,d]                 keys: channelwise (scale a, min μ) per block
    V̂[t,d] = c[k,d]·(σ[t]·y[t,d] + ν[t])            values: CST = channel normalizer c, per-token (σ, ν)
so the scores and the weighted value sum never need K̂ or V̂:
    q·K̂_t      = (q⊙a_k)·x_t + q·μ_k               fold the key scale into q, add one constant per block
    Σ_t p_t V̂_t = c_k ⊙ (Σ_t (p_t σ_t) y_t + Σ_t p_t ν_t)  fold the value scale into p, apply c once per tile
"""
import math
import os
from dataclasses import dataclass

import torch

from quant import unpack

try:  # triton is optional: without it the torch paths still work and kernel="triton" says what to install
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton, tl = None, None
    HAS_TRITON = False

# triton decides interpreter-vs-GPU when a kernel is decorated (at import of this file), so we record it here too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_D = (64, 128, 256)  # D/4 must be a power of two >= 16: tl.dot needs K >= 16 on the GPU (kernels.md §6.5)
LOG2E = 1.4426950408889634


# -----------------------------------------------------------------------------
# the layer view (kernels.md §1): q-independent, built by ZipCache.layer_view(i); nothing else is accepted

@dataclass
class ZipSegment:
    """One precision group (hi = 4-bit salient, lo = 2-bit regular) of one layer. W = D*bits/8."""
    bits: int
    k_codes: torch.Tensor  # uint8 [B, H_kv, CAP, W]   planar packing (zipcache §2.2), rows grouped by block
    v_codes: torch.Tensor  # uint8 [B, H_kv, CAP, W]
    v_scale: torch.Tensor  # fp16  [B, Hv, CAP]        Hv = H_kv ("head" scope) or 1 ("row" scope, broadcast)
    v_min: torch.Tensor    # fp16  [B, Hv, CAP]
    k_scale: torch.Tensor  # fp16  [Bs, NB_CAP, H_kv, D] channelwise per block; Bs = B, or 1 when pooled
    k_min: torch.Tensor    # fp16  [Bs, NB_CAP, H_kv, D]
    rows: torch.Tensor     # int32 [B, NB_CAP+1]       block k of sequence b = rows [rows[b,k], rows[b,k+1])


@dataclass
class ZipLayerView:
    hi: ZipSegment
    lo: ZipSegment
    v_chan: torch.Tensor   # fp16 [Bs, NB_CAP, H_kv, D]  CST channel normalizer per block (shared by hi and lo)
    k_buf: torch.Tensor    # fp16 [B, H_kv, NBUF_CAP, D] raw post-RoPE keys of the unfinished block
    v_buf: torch.Tensor    # fp16 [B, H_kv, NBUF_CAP, D]
    n_buf: int             # valid buffer rows (same for every sequence)
    n_blocks: int          # valid blocks (same for every sequence; a block may hold 0 rows in one segment)

    @property
    def segments(self):
        return (self.hi, self.lo)


def dense_view(k, v):
    """A plain fp16 cache k, v [B, H_kv, L, D] as a view with empty segments: the kernel is then exactly
    flash-decoding (the fair baseline in bench.py). The segment tensors are 1-row placeholders, never read."""
    B, Hkv, L, D = k.shape
    dev = k.device

    def empty_segment(bits):
        codes = torch.zeros(B, Hkv, 1, D * bits // 8, dtype=torch.uint8, device=dev)
        vp = torch.zeros(B, Hkv, 1, dtype=torch.float16, device=dev)
        kp = torch.zeros(1, 1, Hkv, D, dtype=torch.float16, device=dev)
        rows = torch.zeros(B, 2, dtype=torch.int32, device=dev)
        return ZipSegment(bits, codes, codes.clone(), vp, vp.clone(), kp, kp.clone(), rows)

    return ZipLayerView(hi=empty_segment(4), lo=empty_segment(2),
                        v_chan=torch.ones(1, 1, Hkv, D, dtype=torch.float16, device=dev),
                        k_buf=k.half(), v_buf=v.half(), n_buf=L, n_blocks=0)


def _shapes(q, view):
    """Checks shared by every path; returns B, H_q, H_kv, G, D."""
    if q.dim() != 3:
        raise ValueError(f"decode attention expects q of shape [B, H_q, D] (one token per sequence), got "
                         f"{tuple(q.shape)}; squeeze the time dim of a T=1 query")
    B, Hq, D = q.shape
    Bk, Hkv, _, Dk = view.k_buf.shape
    if (Bk, Dk) != (B, D):
        raise ValueError(f"q {tuple(q.shape)} does not match the cache buffer {tuple(view.k_buf.shape)} "
                         f"(batch and head_dim must agree)")
    if Hq % Hkv:
        raise ValueError(f"H_q={Hq} is not a multiple of H_kv={Hkv}; GQA needs whole groups of query heads")
    return B, Hq, Hkv, Hq // Hkv, D


def _finish(out, lse, q, return_lse):
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# -----------------------------------------------------------------------------
# the reference (kernels.md §4): dequantize with the formulas of §1, concatenate, plain softmax attention

def _dequantize_segment(seg, v_chan, b, n_blocks, dt):
    """Sequence b of one segment -> K̂, V̂ [H_kv, n, D] in dtype dt (n = rows of its n_blocks blocks)."""
    n = int(seg.rows[b, n_blocks]) if n_blocks > 0 else 0
    Hkv, D = seg.k_codes.shape[1], v_chan.shape[-1]
    if n == 0:
        z = torch.zeros(Hkv, 0, D, dtype=dt, device=seg.k_codes.device)
        return z, z
    rows = seg.rows[b, :n_blocks + 1].long()
    blk = torch.searchsorted(rows, torch.arange(n, device=rows.device), right=True) - 1   # [n] block of each row
    bs = b if seg.k_scale.shape[0] > 1 else 0                                              # Bs = 1: pooled params
    a, mu = seg.k_scale[bs][blk].to(dt), seg.k_min[bs][blk].to(dt)                          # [n, H_kv, D]
    c = v_chan[bs if v_chan.shape[0] > 1 else 0][blk].to(dt)                               # [n, H_kv, D]
    x = unpack(seg.k_codes[b, :, :n], seg.bits).to(dt)                                     # [H_kv, n, D]
    y = unpack(seg.v_codes[b, :, :n], seg.bits).to(dt)
    sig = seg.v_scale[b, :, :n].to(dt)[..., None]                                          # [Hv, n, 1]
    nu = seg.v_min[b, :, :n].to(dt)[..., None]
    K = a.transpose(0, 1) * x + mu.transpose(0, 1)                 # K̂ = a·x + μ
    V = c.transpose(0, 1) * (sig * y + nu)                         # V̂ = c·(σ·y + ν)
    return K, V


def zip_decode_attention_ref(q, view, *, sm_scale=None, num_splits=None, block_n=64, return_lse=False):
    """Oracle: out [B, H_q, D] in q.dtype (+ natural-log lse [B, H_q] fp32). Math in fp32 (fp64 for fp64 q).
    num_splits and block_n are accepted for a common signature and ignored. Slow (loops over the batch)."""
    B, Hq, Hkv, G, D = _shapes(q, view)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty(B, Hq, D, dtype=dt, device=q.device)
    lse = torch.empty(B, Hq, dtype=dt, device=q.device)
    for b in range(B):
        parts = [_dequantize_segment(s, view.v_chan, b, view.n_blocks, dt) for s in view.segments]
        parts.append((view.k_buf[b, :, :view.n_buf].to(dt), view.v_buf[b, :, :view.n_buf].to(dt)))
        K = torch.cat([k for k, _ in parts], 1).repeat_interleave(G, 0)   # [H_q, L, D]
        V = torch.cat([v for _, v in parts], 1).repeat_interleave(G, 0)
        s = torch.einsum("hd,hld->hl", q[b].to(dt), K) * scale           # [H_q, L]
        lse[b] = torch.logsumexp(s, -1)                                   # -inf for an empty cache
        p = torch.exp(s - lse[b][:, None]).nan_to_num(0.0)                # empty cache -> out 0
        out[b] = torch.einsum("hl,hld->hd", p, V)
    return _finish(out, lse.float() if dt != torch.float64 else lse, q, return_lse)


# -----------------------------------------------------------------------------
# CPU fast path: the kernel's algorithm in torch. Per block (and per chunk of rows inside a big block) it unpacks
# only that chunk's codes, scores them against the scale-folded query and updates one online softmax. Vectorised
# over batch, heads and rows; the only Python loops are over blocks and chunks. Ragged row counts per sequence are
# handled by gathering each sequence's rows and masking the tail.

def _online_update(state, s, valid):
    """One online-softmax step (natural log). state = (m, l, acc); s [B, H_kv, G, n] scores; valid [B, n]."""
    m, l, acc = state
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m_new = torch.maximum(m, s.amax(-1))
    m_use = torch.where(m_new == float("-inf"), 0.0, m_new)         # fully masked so far: no NaN from -inf - -inf
    alpha = torch.exp(m - m_use)                                     # [B, H_kv, G]
    p = torch.exp(s - m_use[..., None])                              # [B, H_kv, G, n]
    return m_new, l * alpha + p.sum(-1), acc * alpha[..., None], p


def zip_decode_attention_torch(q, view, *, sm_scale=None, num_splits=None, block_n=64, return_lse=False,
                               chunk=4096):
    """Same contract as zip_decode_attention_ref, without a dequantized copy of the cache: per chunk of rows
    (<= `chunk`), only its codes are unpacked; scales fold into q and p (module docstring)."""
    B, Hq, Hkv, G, D = _shapes(q, view)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    scale = D ** -0.5 if sm_scale is None else sm_scale
    qf = q.to(dt).view(B, Hkv, G, D) * scale                         # [B, H_kv, G, D], softmax scale folded in
    m = torch.full((B, Hkv, G), float("-inf"), dtype=dt, device=dev)
    l = torch.zeros(B, Hkv, G, dtype=dt, device=dev)
    acc = torch.zeros(B, Hkv, G, D, dtype=dt, device=dev)
    nb = view.n_blocks
    for seg in view.segments if nb > 0 else ():
        rows = seg.rows[:, :nb + 1].long()                            # [B, nb+1]
        cap = seg.k_codes.shape[2]
        max_len = (rows[:, 1:] - rows[:, :-1]).amax(0).tolist()       # longest block k over the batch (host sync)
        for k in range(nb):
            if max_len[k] == 0:
                continue                                              # empty in every sequence: params unused
            a = seg.k_scale[:, k].to(dt)[:, :, None, :]               # [Bs, H_kv, 1, D] broadcasts over B and G
            mu = seg.k_min[:, k].to(dt)[:, :, None, :]
            c = view.v_chan[:, k].to(dt)[:, :, None, :]
            qa = qf * a                                               # q ⊙ a_k            [B, H_kv, G, D]
            qmu = (qf * mu).sum(-1, keepdim=True)                     # q · μ_k            [B, H_kv, G, 1]
            for t0 in range(0, max_len[k], chunk):
                n = min(chunk, max_len[k] - t0)
                idx = rows[:, k, None] + t0 + torch.arange(n, device=dev)          # [B, n] rows of this chunk
                valid = idx < rows[:, k + 1, None]
                idx = idx.clamp(max=cap - 1)                                       # tail rows masked below
                W = seg.k_codes.shape[-1]
                gi = idx[:, None, :, None].expand(B, Hkv, n, W)
                x = unpack(torch.gather(seg.k_codes, 2, gi), seg.bits).to(dt)      # [B, H_kv, n, D] codes
                y = unpack(torch.gather(seg.v_codes, 2, gi), seg.bits).to(dt)
                vi = idx[:, None, :].expand(B, seg.v_scale.shape[1], n)
                sig = torch.gather(seg.v_scale, 2, vi).to(dt).masked_fill(~valid[:, None], 0)  # [B, Hv, n]
                nu = torch.gather(seg.v_min, 2, vi).to(dt).masked_fill(~valid[:, None], 0)
                s = qa @ x.transpose(-1, -2) + qmu                                 # [B, H_kv, G, n]
                m, l, acc, p = _online_update((m, l, acc), s, valid)
                ps = p * sig[:, :, None, :]                                        # p ⊙ σ
                contrib = c * (ps @ y + (p * nu[:, :, None, :]).sum(-1, keepdim=True))    # [B, H_kv, G, D]
                # a sequence with no rows here may have no (i.e. garbage) params for this block: add nothing
                acc = acc + torch.where(valid.any(1)[:, None, None, None], contrib, 0.0)
    if view.n_buf > 0:
        kb = view.k_buf[:, :, :view.n_buf].to(dt)                                  # [B, H_kv, n_buf, D]
        vb = view.v_buf[:, :, :view.n_buf].to(dt)
        valid = torch.ones(B, view.n_buf, dtype=torch.bool, device=dev)
        m, l, acc, p = _online_update((m, l, acc), qf @ kb.transpose(-1, -2), valid)
        acc = acc + p @ vb
    out = torch.where(l[..., None] > 0, acc / l.clamp_min(1e-30)[..., None], 0.0).reshape(B, Hq, D)
    lse = (m + torch.log(l)).reshape(B, Hq)                                         # l = 0 -> -inf
    return _finish(out, lse.float() if dt != torch.float64 else lse, q, return_lse)


# -----------------------------------------------------------------------------
# split heuristic (kernels.md §3.4) and the one dispatch function cache.py calls

def pick_num_splits(B, H_kv, n_tokens, n_sm):
    """Splits of the sequence per (b, KV head): aim for B·H_kv·S ≈ 4 programs per SM, with >= 512 tokens per split,
    a power of two (fewer recompiles), at most 64; 1 when B·H_kv alone fills the GPU (cf. xformers' get_split_k)."""
    progs = max(1, B * H_kv)
    s = min(4 * n_sm // progs, n_tokens // 512, 64)
    return 1 << (max(1, s).bit_length() - 1)                         # round down to a power of two


def decode_attention(q, view, kernel="auto", **kw):
    """out [B, H_q, D] (+ lse if return_lse=True) of one decode step over a ZipLayerView.

    kernel="auto": the Triton kernel on CUDA when D is supported, else the torch fast path;
    "triton": force the kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1); "torch": force the torch path."""
    if kernel == "torch":
        return zip_decode_attention_torch(q, view, **kw)
    if kernel == "auto":
        use = HAS_TRITON and q.is_cuda and q.shape[-1] in SUPPORTED_D and q.dtype in (torch.float16, torch.bfloat16)
        return (zip_decode_attention if use else zip_decode_attention_torch)(q, view, **kw)
    if kernel == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernel='triton' needs the triton package: pip install triton (Linux), "
                               "or use --kernel torch")
        if not q.is_cuda and not INTERPRET:
            raise RuntimeError("kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 set before importing "
                               "kernels.py, for CPU tests); use --kernel torch or --kernel auto on this machine")
        return zip_decode_attention(q, view, **kw)
    raise ValueError(f"unknown kernel={kernel!r}; use 'auto', 'triton' or 'torch'")


def zip_decode_attention(q, view, *, sm_scale=None, num_splits=None, block_n=64, return_lse=False):
    raise NotImplementedError("the Triton kernel is being written; use kernel='torch'")
