"""
Decode attention over the ZipCache layer layout: one new query token per sequence attends to
[4-bit blocks | 2-bit blocks | fp16 buffer] without ever materializing a dequantized cache (README "The decode
kernel"). In reading order:

    ZipLayerView                the per-layer layout cache.py stores, and dense_view (a plain fp16 cache as a view)
    decode_attention            the one dispatch cache.py calls: kernel="auto" | "triton" | "torch"
    zip_decode_attention_ref    oracle: dequantize everything (dequantize_segment), fp32 softmax attention
    zip_decode_attention_torch  CPU fast path: the kernel's algebra in torch, a group of blocks at a time
    zip_decode_attention        the fused Triton kernel's launcher: split-K flash-decoding + a combine kernel
    _zip_decode_stage1, ...     the Triton kernels themselves

The algebra every fast path uses. For a row t of block k,
    K̂[t,d] = a[k,d]·x[t,d] + μ[k,d]                 keys: channelwise (scale a, min μ) per block
    V̂[t,d] = c[k,d]·(σ[t]·y[t,d] + ν[t])            values: CST = channel normalizer c, per-token (σ, ν)
so the scores and the weighted value sum never need K̂ or V̂:
    q·K̂_t      = (q⊙a_k)·x_t + q·μ_k               fold the key scale into q, add one constant per block
    Σ_t p_t V̂_t = c_k ⊙ (Σ_t (p_t σ_t) y_t + Σ_t p_t ν_t)  fold the value scale into p, apply c once per tile
Two refinements of this algebra in the Triton kernel, both free: the codes are centred (x - 2^(bits-1), by
subtracting 1024 + 2^(bits-1) in the int->fp16 trick, with the shift folded into μ and ν), which halves the part of
the score that the fp16 rounding of q⊙a multiplies; and sm_scale·log2(e) multiplies each dot's fp32 result instead
of being folded into q, so the fp16 buffer's scores use the query exactly as given.
"""
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
SUPPORTED_D = (64, 128, 256)  # D/4 must be a power of two >= 16: tl.dot needs K >= 16 on the GPU
LOG2E = 1.4426950408889634


# -----------------------------------------------------------------------------
# the layer view: q-independent, built by ZipCache.layer_view(i); nothing else is accepted

@dataclass
class ZipSegment:
    """One precision group (hi = 4-bit salient, lo = 2-bit regular) of one layer. W = D*bits/8."""
    bits: int
    k_codes: torch.Tensor  # uint8 [B, H_kv, CAP, W]   planar packing (quant.pack), rows grouped by block
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
    # the owner's store for the split tables the Triton launcher derives from the row tables: ZipCache passes a dict
    # it empties whenever it appends a block, so a table is built once per block, not per step; None = build per call
    tables: dict | None = None

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
# the one dispatch function cache.py calls, and the split heuristic

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
                               "decode_kernel.py, for CPU tests); use --kernel torch or --kernel auto on this machine")
        return zip_decode_attention(q, view, **kw)
    raise ValueError(f"unknown kernel={kernel!r}; use 'auto', 'triton' or 'torch'")


def pick_num_splits(B, H_kv, n_tokens, n_sm):
    """Splits of the sequence per (b, KV head): aim for B·H_kv·S ≈ 4 programs per SM, with >= 512 tokens per split,
    a power of two (fewer recompiles), at most 64; 1 when B·H_kv alone fills the GPU (cf. xformers' get_split_k)."""
    progs = max(1, B * H_kv)
    s = min(4 * n_sm // progs, n_tokens // 512, 64)
    return 1 << (max(1, s).bit_length() - 1)                         # round down to a power of two


# -----------------------------------------------------------------------------
# the reference: dequantize with the view's formulas (K = a x + mu, V = c (sigma y + nu)), concatenate, plain
# softmax attention

def row_blocks(rows, n_blocks):
    """rows int32 [NB_CAP+1] (one sequence's row table) -> long [n]: the block each of the segment's n rows is in."""
    rows = rows[:n_blocks + 1].long()
    n = int(rows[-1]) if n_blocks > 0 else 0
    return torch.searchsorted(rows, torch.arange(n, device=rows.device), right=True) - 1


def dequantize_segment(seg, v_chan, blk, dt):
    """One segment -> K̂, V̂ [B, H_kv, n, D] in dtype dt, n = len(blk) rows with blk = row_blocks(...) (every
    sequence of the view holds the same rows, as ZipCache stores them; the reference slices one sequence at a time).
    The one dequantizer: ZipCache.kv, the reference below and bench.py's dequantize-then-SDPA baseline use it."""
    n = blk.shape[0]
    a = seg.k_scale[:, blk].to(dt).transpose(1, 2)                 # [Bs, H_kv, n, D]; Bs = 1 when pooled
    mu = seg.k_min[:, blk].to(dt).transpose(1, 2)
    c = v_chan[:, blk].to(dt).transpose(1, 2)
    x = unpack(seg.k_codes[:, :, :n], seg.bits).to(dt)             # [B, H_kv, n, D]
    y = unpack(seg.v_codes[:, :, :n], seg.bits).to(dt)
    sig = seg.v_scale[:, :, :n].to(dt)[..., None]                  # [B, Hv, n, 1]
    nu = seg.v_min[:, :, :n].to(dt)[..., None]
    return a * x + mu, c * (sig * y + nu)                          # K̂ = a·x + μ, V̂ = c·(σ·y + ν)


def _sequence(seg, v_chan, b):
    """Sequence b of a segment (and its channel normalizer) as a one-sequence segment; pooled params stay shared."""
    pick = lambda t: t[b:b + 1] if t.shape[0] > 1 else t                               # noqa: E731
    return ZipSegment(seg.bits, seg.k_codes[b:b + 1], seg.v_codes[b:b + 1], seg.v_scale[b:b + 1],
                      seg.v_min[b:b + 1], pick(seg.k_scale), pick(seg.k_min), seg.rows[b:b + 1]), pick(v_chan)


def zip_decode_attention_ref(q, view, *, sm_scale=None, num_splits=None, block_n=None, return_lse=False):
    """Oracle: out [B, H_q, D] in q.dtype (+ natural-log lse [B, H_q] fp32). Math in fp32 (fp64 for fp64 q).
    num_splits and block_n are accepted for a common signature and ignored. Slow (loops over the batch)."""
    B, Hq, Hkv, G, D = _shapes(q, view)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty(B, Hq, D, dtype=dt, device=q.device)
    lse = torch.empty(B, Hq, dtype=dt, device=q.device)
    for b in range(B):
        parts = []
        for seg in view.segments:
            seg_b, chan_b = _sequence(seg, view.v_chan, b)
            K, V = dequantize_segment(seg_b, chan_b, row_blocks(seg_b.rows[0], view.n_blocks), dt)
            parts.append((K[0], V[0]))                                    # [H_kv, n_b, D]
        parts.append((view.k_buf[b, :, :view.n_buf].to(dt), view.v_buf[b, :, :view.n_buf].to(dt)))
        K = torch.cat([k for k, _ in parts], 1).repeat_interleave(G, 0)   # [H_q, L, D]
        V = torch.cat([v for _, v in parts], 1).repeat_interleave(G, 0)
        s = torch.einsum("hd,hld->hl", q[b].to(dt), K) * scale           # [H_q, L]
        lse[b] = torch.logsumexp(s, -1)                                   # -inf for an empty cache
        p = torch.exp(s - lse[b][:, None]).nan_to_num(0.0)                # empty cache -> out 0
        out[b] = torch.einsum("hl,hld->hd", p, V)
    return _finish(out, lse.float() if dt != torch.float64 else lse, q, return_lse)


# -----------------------------------------------------------------------------
# CPU fast path: the kernel's algorithm in torch. Consecutive blocks of a segment are taken together, padded to the
# longest of them, so that one gather, one unpack and two batched matmuls score a group of up to `chunk` rows (a block
# longer than `chunk` is cut into chunks of rows); each block's scales still fold into q and p, so no dequantized copy
# of the cache is made. Vectorised over batch, heads, blocks and rows; the only Python loop is over these groups, so
# the many small blocks of key groups (ZipCacheConfig.k_group) cost one step, not one step each. Ragged row counts per
# sequence are handled by gathering each sequence's rows and masking the padding.

def _online_update(state, s, valid):
    """One online-softmax step (natural log). state = (m, l, acc); s [B, H_kv, G, n] scores; valid [B, n]."""
    m, l, acc = state
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m_new = torch.maximum(m, s.amax(-1))
    m_use = torch.where(m_new == float("-inf"), 0.0, m_new)         # fully masked so far: no NaN from -inf - -inf
    alpha = torch.exp(m - m_use)                                     # [B, H_kv, G]
    p = torch.exp(s - m_use[..., None])                              # [B, H_kv, G, n]
    return m_new, l * alpha + p.sum(-1), acc * alpha[..., None], p


def _block_groups(max_len, chunk):
    """[(k0, k1, t0, n)]: blocks k0..k1-1 taken together, rows [t0, t0 + n) of each, (k1 - k0)·n <= chunk rows a group
    (a block longer than chunk alone, in chunks of rows); blocks empty in every sequence are skipped."""
    out, k, nb = [], 0, len(max_len)
    while k < nb:
        if max_len[k] == 0:
            k += 1
        elif max_len[k] > chunk // 2:                                # a big block: its rows in chunks
            out += [(k, k + 1, t0, min(chunk, max_len[k] - t0)) for t0 in range(0, max_len[k], chunk)]
            k += 1
        else:
            k1, n = k + 1, max_len[k]
            while k1 < nb and 0 < max_len[k1] <= chunk // 2 and (k1 + 1 - k) * max(n, max_len[k1]) <= chunk:
                n = max(n, max_len[k1])
                k1 += 1
            out.append((k, k1, 0, n))
            k = k1
    return out


def zip_decode_attention_torch(q, view, *, sm_scale=None, num_splits=None, block_n=None, return_lse=False,
                               chunk=4096):
    """Same contract as zip_decode_attention_ref, without a dequantized copy of the cache: per group of rows
    (<= `chunk`), only its codes are unpacked; scales fold into q and p (comment above)."""
    B, Hq, Hkv, G, D = _shapes(q, view)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    scale = D ** -0.5 if sm_scale is None else sm_scale
    qf = q.to(dt).view(B, Hkv, G, 1, D) * scale                      # [B, H_kv, G, 1, D], softmax scale folded in
    m = torch.full((B, Hkv, G), float("-inf"), dtype=dt, device=dev)
    l = torch.zeros(B, Hkv, G, dtype=dt, device=dev)
    acc = torch.zeros(B, Hkv, G, D, dtype=dt, device=dev)
    nb = view.n_blocks
    for seg in view.segments if nb > 0 else ():
        rows = seg.rows[:, :nb + 1].long()                            # [B, nb+1]
        cap, W = seg.k_codes.shape[2], seg.k_codes.shape[-1]
        max_len = (rows[:, 1:] - rows[:, :-1]).amax(0).tolist()       # longest block k over the batch (host sync)
        for k0, k1, t0, n in _block_groups(max_len, chunk):
            K = k1 - k0                                               # blocks in this group
            per = lambda t: t[:, k0:k1].to(dt).transpose(1, 2)[:, :, None]           # [Bs, H_kv, 1, K, D]
            a, mu, c = per(seg.k_scale), per(seg.k_min), per(view.v_chan)
            qa = qf * a                                               # q ⊙ a_k            [B, H_kv, G, K, D]
            qmu = (qf * mu).sum(-1)                                   # q · μ_k            [B, H_kv, G, K]
            idx = rows[:, k0:k1, None] + t0 + torch.arange(n, device=dev)          # [B, K, n] rows of the group
            valid = idx < rows[:, k0 + 1:k1 + 1, None]                             # padding and tails masked
            idx = idx.clamp(max=cap - 1).flatten(1)                                # [B, K·n]
            gi = idx[:, None, :, None].expand(B, Hkv, K * n, W)
            x = unpack(torch.gather(seg.k_codes, 2, gi), seg.bits).to(dt).view(B, Hkv, K, n, D)   # codes
            y = unpack(torch.gather(seg.v_codes, 2, gi), seg.bits).to(dt).view(B, Hkv, K, n, D)
            vi = idx[:, None, :].expand(B, seg.v_scale.shape[1], K * n)
            fl = valid.flatten(1)
            sig = torch.gather(seg.v_scale, 2, vi).to(dt).masked_fill(~fl[:, None], 0)   # [B, Hv, K·n]
            nu = torch.gather(seg.v_min, 2, vi).to(dt).masked_fill(~fl[:, None], 0)
            s = torch.einsum("bhgkd,bhknd->bhgkn", qa, x) + qmu[..., None]       # [B, H_kv, G, K, n]
            m, l, acc, p = _online_update((m, l, acc), s.flatten(3), fl)
            p = p.view(B, Hkv, G, K, n)
            ps = p * sig.view(B, -1, 1, K, n)                                      # p ⊙ σ
            pv = torch.einsum("bhgkn,bhknd->bhgkd", ps, y) + (p * nu.view(B, -1, 1, K, n)).sum(-1, keepdim=True)
            # a sequence with no rows in block k may have no (i.e. garbage) params there: that block adds nothing
            has = valid.any(-1)[:, None, None, :, None]                            # [B, 1, 1, K, 1]
            acc = acc + torch.where(has, c * pv, 0.0).sum(3)                       # [B, H_kv, G, D]
    if view.n_buf > 0:
        kb = view.k_buf[:, :, :view.n_buf].to(dt)                                  # [B, H_kv, n_buf, D]
        vb = view.v_buf[:, :, :view.n_buf].to(dt)
        valid = torch.ones(B, view.n_buf, dtype=torch.bool, device=dev)
        m, l, acc, p = _online_update((m, l, acc), qf[:, :, :, 0] @ kb.transpose(-1, -2), valid)
        acc = acc + p @ vb
    out = torch.where(l[..., None] > 0, acc / l.clamp_min(1e-30)[..., None], 0.0).reshape(B, Hq, D)
    lse = (m + torch.log(l)).reshape(B, Hq)                                         # l = 0 -> -inf
    return _finish(out, lse.float() if dt != torch.float64 else lse, q, return_lse)


# -----------------------------------------------------------------------------
# launcher

def zip_decode_attention(q, view, *, sm_scale=None, num_splits=None, block_n=None, return_lse=False,
                         num_warps=4, num_stages=2):
    """Fused decode attention over a ZipLayerView: out [B, H_q, D] in q.dtype (+ natural-log lse [B, H_q] fp32).
    num_splits=None picks with pick_num_splits from the segment capacities (an upper bound on the rows, no sync);
    block_n=None: 64-row tiles, 32 when a KV head serves more than 16 query heads. Fixed configs, no autotune:
    bench.py sweeps (block_n, num_warps) on the GPU."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernel needs the triton package: pip install triton, or use kernel='torch'")
    B, Hq, Hkv, G, D = _shapes(q, view)
    BLOCK_G = max(16, triton.next_power_of_2(G))
    if block_n is None:  # [BLOCK_G, BLOCK_N] tiles: at G > 16, 64-row tiles spill registers on sm_90 (AOT check)
        block_n = 64 if BLOCK_G <= 16 else 32
    _check_kernel_inputs(q, view, block_n)
    scale = D ** -0.5 if sm_scale is None else sm_scale
    if num_splits is None:
        n_est = view.hi.k_codes.shape[2] + view.lo.k_codes.shape[2] + view.n_buf
        num_splits = pick_num_splits(B, Hkv, n_est, _n_sm(q.device))
    S = int(num_splits)
    if S < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    # the table changes only when a block is appended; rebuilding it costs ~8 tiny launches, more than the kernel
    # itself at batch 1, so the view's owner keeps it until then
    tab = view.tables.get((S, block_n)) if view.tables is not None else None
    if tab is None:
        tab = _split_table(view, S, block_n)
        if view.tables is not None:
            view.tables[(S, block_n)] = tab
    out = _alloc((B, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq), torch.float32, q.device)
    if S == 1:
        o_part, l_part, s_o = out, lse, (out.stride(0), out.stride(1), 0)
    else:
        o_part = _alloc((B, Hq, S, D), torch.float32, q.device)                # fp32 partials, log2 lse
        l_part = _alloc((B, Hq, S), torch.float32, q.device)
        s_o = (o_part.stride(0), o_part.stride(1), o_part.stride(2))

    def seg_args(seg):
        bs0 = seg.k_scale.shape[0] == 1                                       # pooled params: batch stride 0
        hv0 = seg.v_scale.shape[1] == 1                                       # one value pair per row: head stride 0
        ptrs = (seg.k_codes, seg.v_codes, seg.v_scale, seg.v_min, seg.k_scale, seg.k_min, seg.rows)
        strides = (seg.k_codes.stride(0), seg.k_codes.stride(1), seg.k_codes.stride(2),
                   seg.v_scale.stride(0), 0 if hv0 else seg.v_scale.stride(1),
                   0 if bs0 else seg.k_scale.stride(0), seg.k_scale.stride(1), seg.k_scale.stride(2),
                   seg.rows.stride(0))
        return ptrs + strides

    vch = view.v_chan
    _zip_decode_stage1[(B * Hkv, S)](
        q, q.stride(0), q.stride(1),
        *seg_args(view.hi), *seg_args(view.lo),
        vch, 0 if vch.shape[0] == 1 else vch.stride(0), vch.stride(1), vch.stride(2),
        view.k_buf, view.v_buf, *view.k_buf.stride()[:3], *view.v_buf.stride()[:3],
        tab, o_part, l_part, *s_o, l_part.stride(0), l_part.stride(1),
        Hkv, G, view.n_buf, scale * LOG2E,
        D4=D // 4, BLOCK_G=BLOCK_G, BLOCK_N=block_n,
        HI_BITS=view.hi.bits, LO_BITS=view.lo.bits, SPLIT=S > 1,
        num_warps=num_warps, num_stages=num_stages)
    if S > 1:
        _zip_decode_combine[(B * Hq,)](
            o_part, l_part, out, lse, Hq, S, *o_part.stride()[:3], l_part.stride(0), l_part.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            D=D, BLOCK_S=triton.next_power_of_2(S), num_warps=4)
    return (out, lse) if return_lse else out


def _check_kernel_inputs(q, view, block_n):
    D = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton decode kernel takes fp16 or bf16 queries, got {q.dtype}; cast q, or use "
                         f"kernel='torch'")
    if D not in SUPPORTED_D:
        raise ValueError(f"the Triton decode kernel supports head_dim in {SUPPORTED_D}, got {D}; use kernel='torch' "
                         f"for this model")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two >= 16")
    named = [("q", q), ("k_buf", view.k_buf), ("v_buf", view.v_buf), ("v_chan", view.v_chan)]
    for p, seg in zip(("hi", "lo"), view.segments):
        if seg.bits not in (2, 4):
            raise ValueError(f"the kernel reads 2- or 4-bit segments, got {p}.bits={seg.bits}; use kernel='torch'")
        named += [(f"{p}.{f}", getattr(seg, f)) for f in ("k_codes", "v_codes", "v_scale", "v_min", "k_scale",
                                                            "k_min", "rows")]
        if seg.k_codes.stride() != seg.v_codes.stride() or seg.v_scale.stride() != seg.v_min.stride() \
                or seg.k_scale.stride() != seg.k_min.stride():
            raise ValueError(f"segment {p}: k/v codes, v_scale/v_min and k_scale/k_min must have matching strides "
                             f"(allocate them alike)")
        if seg.k_codes.shape[-1] != D * seg.bits // 8:
            raise ValueError(f"segment {p}: codes are {seg.k_codes.shape[-1]} bytes wide, expected D*bits/8 = "
                             f"{D * seg.bits // 8}")
    want = {"k_codes": torch.uint8, "v_codes": torch.uint8, "rows": torch.int32, "q": q.dtype}
    for name, t in named:
        dt = want.get(name.split(".")[-1], torch.float16)
        if t.dtype != dt:
            raise ValueError(f"{name} must be {dt}, got {t.dtype} (the kernel reads the cache exactly as stored)")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim; pass .contiguous()")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; keep the cache on one device")


def _split_table(view, S, block_n):
    """int32 [B, 2, S, 4] = (blk_first, blk_last, row_lo, row_hi) per (sequence, segment, split)
    Built with device ops (no host sync): split s covers rows [s·chunk, (s+1)·chunk) ∩ [0, n) of each segment,
    chunk = roundup(cdiv(n, S), block_n), and the blocks that intersect them come from searchsorted on rows."""
    B, nb, dev = view.k_buf.shape[0], view.n_blocks, view.k_buf.device
    tabs = []
    for seg in view.segments:
        if nb == 0:
            tabs.append(torch.zeros(B, S, 4, dtype=torch.int64, device=dev))
            continue
        rows = seg.rows[:, :nb + 1].long().contiguous()                       # [B, nb+1]
        n = rows[:, nb:]                                                      # [B, 1] rows in this segment
        chunk = (n + S - 1) // S
        chunk = (chunk + block_n - 1) // block_n * block_n
        lo = torch.minimum(torch.arange(S, device=dev)[None] * chunk, n)     # [B, S]
        hi = torch.minimum(lo + chunk, n)
        first = torch.searchsorted(rows, lo, right=True) - 1                 # block holding row lo
        last = torch.searchsorted(rows[:, :nb].contiguous(), hi)             # blocks starting before hi
        tabs.append(torch.stack([first, last, lo, hi], -1))
    return torch.stack(tabs, 1).to(torch.int32).contiguous()


def _alloc(shape, dtype, device):
    # every element is overwritten by the kernels; the tests patch this to NaN-fill and check that
    return torch.empty(shape, dtype=dtype, device=device)


def _n_sm(device):
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: splits only cost time there
    return torch.cuda.get_device_properties(device).multi_processor_count


# -----------------------------------------------------------------------------
# the Triton kernels, top-down: the split-K stage, the combine, then the helpers they call. Scores live in the log2
# domain (each dot's result is multiplied by sm_scale·log2(e)) so the softmax uses exp2. Every tl.dot takes fp16
# operands with an fp32 accumulator (the interpreter's bf16 dot is garbage, and fp32 dots would be TF32 on the GPU). Plain pointer arithmetic only, so the
# file runs on Triton 3.6 to 3.9 (no block pointers, no tensor descriptors); int64 base offsets.

if HAS_TRITON:

    @triton.jit
    def _zip_decode_stage1(
            Q, s_q_b, s_q_h,
            HKC, HVC, HVS, HVM, HKS, HKM, HROWS,
            hs_c_b, hs_c_h, hs_c_t, hs_v_b, hs_v_h, hs_p_b, hs_p_k, hs_p_h, hs_r_b,
            LKC, LVC, LVS, LVM, LKS, LKM, LROWS,
            ls_c_b, ls_c_h, ls_c_t, ls_v_b, ls_v_h, ls_p_b, ls_p_k, ls_p_h, ls_r_b,
            VCH, s_n_b, s_n_k, s_n_h,
            KB, VB, s_kb_b, s_kb_h, s_kb_t, s_vb_b, s_vb_h, s_vb_t,
            TAB, O, LSE, s_o_b, s_o_h, s_o_s, s_l_b, s_l_h,
            H_kv, G, n_buf, qk_scale,
            D4: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
            HI_BITS: tl.constexpr, LO_BITS: tl.constexpr, SPLIT: tl.constexpr):
        """Grid (B·H_kv, S): program (b, KV head h, split) runs the online softmax over its share of the hi
        segment, the lo segment and the fp16 buffer for all G query heads of the group (one K/V load serves G).
        SPLIT=False (S = 1): writes out (q.dtype) and the natural-log lse directly; else fp32 partials + log2 lse."""
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        S = tl.num_programs(1)
        b = pid // H_kv
        h = pid % H_kv
        g = tl.arange(0, BLOCK_G)                                             # row g = query head h·G + g
        gmask = g < G
        dq = tl.arange(0, D4)
        qrow = Q + b * s_q_b + (h * G + g)[:, None].to(tl.int64) * s_q_h
        q0 = tl.load(qrow + dq[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)   # [BLOCK_G, D/4]
        q1 = tl.load(qrow + D4 + dq[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qrow + 2 * D4 + dq[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        q3 = tl.load(qrow + 3 * D4 + dq[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)

        m = tl.full([BLOCK_G], float("-inf"), tl.float32)                    # running max (log2 domain)
        l = tl.zeros([BLOCK_G], tl.float32)                                   # running sum of exp2
        a0 = tl.zeros([BLOCK_G, D4], tl.float32)
        a1 = tl.zeros([BLOCK_G, D4], tl.float32)
        a2 = tl.zeros([BLOCK_G, D4], tl.float32)
        a3 = tl.zeros([BLOCK_G, D4], tl.float32)

        tab = TAB + ((b * 2) * S + split) * 4                                 # table [B, 2, S, 4]
        m, l, a0, a1, a2, a3 = _segment_pass(
            m, l, a0, a1, a2, a3, q0, q1, q2, q3, qk_scale,
            HKC, HVC, HVS, HVM, HKS, HKM, VCH, HROWS, tab, b, h,
            hs_c_b, hs_c_h, hs_c_t, hs_v_b, hs_v_h, hs_p_b, hs_p_k, hs_p_h, s_n_b, s_n_k, s_n_h, hs_r_b,
            dq, D4, HI_BITS, BLOCK_N)
        m, l, a0, a1, a2, a3 = _segment_pass(
            m, l, a0, a1, a2, a3, q0, q1, q2, q3, qk_scale,
            LKC, LVC, LVS, LVM, LKS, LKM, VCH, LROWS, tab + S * 4, b, h,
            ls_c_b, ls_c_h, ls_c_t, ls_v_b, ls_v_h, ls_p_b, ls_p_k, ls_p_h, s_n_b, s_n_k, s_n_h, ls_r_b,
            dq, D4, LO_BITS, BLOCK_N)

        # the fp16 buffer, split like the segments: rows [r0, r1) of [0, n_buf)
        chunk = tl.cdiv(tl.cdiv(n_buf, S), BLOCK_N) * BLOCK_N
        r0 = tl.minimum(split * chunk, n_buf)
        r1 = tl.minimum(r0 + chunk, n_buf)
        qr0 = q0.to(tl.float16)                                               # exact for fp16 q (and bf16 q in range)
        qr1 = q1.to(tl.float16)
        qr2 = q2.to(tl.float16)
        qr3 = q3.to(tl.float16)
        kb = KB + b * s_kb_b + h * s_kb_h
        vb = VB + b * s_vb_b + h * s_vb_h
        for t0 in range(r0, r1, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            valid = t < r1
            ko = t[:, None] * s_kb_t + dq[None, :]
            vo = t[:, None] * s_vb_t + dq[None, :]
            vmask = valid[:, None]
            k0 = tl.load(kb + ko, mask=vmask, other=0.0).to(tl.float16)
            k1 = tl.load(kb + ko + D4, mask=vmask, other=0.0).to(tl.float16)
            k2 = tl.load(kb + ko + 2 * D4, mask=vmask, other=0.0).to(tl.float16)
            k3 = tl.load(kb + ko + 3 * D4, mask=vmask, other=0.0).to(tl.float16)
            v0 = tl.load(vb + vo, mask=vmask, other=0.0).to(tl.float16)
            v1 = tl.load(vb + vo + D4, mask=vmask, other=0.0).to(tl.float16)
            v2 = tl.load(vb + vo + 2 * D4, mask=vmask, other=0.0).to(tl.float16)
            v3 = tl.load(vb + vo + 3 * D4, mask=vmask, other=0.0).to(tl.float16)
            m, l, a0, a1, a2, a3 = _attend_tile(m, l, a0, a1, a2, a3, qr0, qr1, qr2, qr3, 0.0,
                                                k0, k1, k2, k3, v0, v1, v2, v3, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0,
                                                valid, qk_scale, False)

        # epilogue: o = acc / l; lse2 = m + log2(l), -inf for an empty split (l = 0, o = 0)
        has = l > 0
        inv = 1.0 / tl.where(has, l, 1.0)
        lse2 = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
        hq = (h * G + g).to(tl.int64)
        optr = O + b * s_o_b + hq[:, None] * s_o_h + split * s_o_s + dq[None, :]
        omask = gmask[:, None]
        if SPLIT:
            tl.store(optr, a0 * inv[:, None], mask=omask)
            tl.store(optr + D4, a1 * inv[:, None], mask=omask)
            tl.store(optr + 2 * D4, a2 * inv[:, None], mask=omask)
            tl.store(optr + 3 * D4, a3 * inv[:, None], mask=omask)
            tl.store(LSE + b * s_l_b + hq * s_l_h + split, lse2, mask=gmask)
        else:
            ty = O.dtype.element_ty
            tl.store(optr, (a0 * inv[:, None]).to(ty), mask=omask)
            tl.store(optr + D4, (a1 * inv[:, None]).to(ty), mask=omask)
            tl.store(optr + 2 * D4, (a2 * inv[:, None]).to(ty), mask=omask)
            tl.store(optr + 3 * D4, (a3 * inv[:, None]).to(ty), mask=omask)
            tl.store(LSE + b * s_l_b + hq * s_l_h, lse2 * 0.6931471805599453, mask=gmask)   # natural log

    @triton.jit
    def _zip_decode_combine(OP, LP, OUT, LSE, H_q, S, s_op_b, s_op_h, s_op_s, s_lp_b, s_lp_h,
                            s_out_b, s_out_h, s_lse_b, s_lse_h, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Stage 2, grid (B·H_q,): merge the S partial softmaxes of one query head.
        Deterministic and atomic-free; empty splits have lse = -inf and weight 0."""
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H_q
        hq = pid % H_q
        si = tl.arange(0, BLOCK_S)
        smask = si < S
        d = tl.arange(0, D)
        lse = tl.load(LP + b * s_lp_b + hq * s_lp_h + si, mask=smask, other=float("-inf"))
        mx = tl.max(lse, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.math.exp2(lse - mx)                                            # [BLOCK_S], -inf -> 0
        o = tl.load(OP + b * s_op_b + hq * s_op_h + si[:, None] * s_op_s + d[None, :], mask=smask[:, None], other=0.0)
        wsum = tl.sum(w, 0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(wsum > 0, wsum, 1.0)
        lse_out = tl.where(wsum > 0, (mx + tl.log2(tl.where(wsum > 0, wsum, 1.0))) * 0.6931471805599453,
                           float("-inf"))
        tl.store(OUT + b * s_out_b + hq * s_out_h + d, out.to(OUT.dtype.element_ty))
        tl.store(LSE + b * s_lse_b + hq * s_lse_h, lse_out)

    @triton.jit
    def _segment_pass(m, l, a0, a1, a2, a3, q0, q1, q2, q3, qk_scale,
                      KC, VC, VS, VM, KS, KM, VCH, ROWS, TAB, b, h,
                      s_c_b, s_c_h, s_c_t, s_v_b, s_v_h, s_p_b, s_p_k, s_p_h, s_n_b, s_n_k, s_n_h, s_r_b,
                      dq, D4: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's share of one segment: its blocks blk_first..blk_last, clipped to rows [row_lo, row_hi)
        (the launcher's table). q0..q3 are the raw fp32 query quarters."""
        blk_first = tl.load(TAB)
        blk_last = tl.load(TAB + 1)
        row_lo = tl.load(TAB + 2)
        row_hi = tl.load(TAB + 3)
        kc = KC + b * s_c_b + h * s_c_h                                       # int64 base offsets
        vc = VC + b * s_c_b + h * s_c_h
        vsp = VS + b * s_v_b + h * s_v_h                                      # s_v_h = 0 for one pair per row
        vmp = VM + b * s_v_b + h * s_v_h
        for blk in range(blk_first, blk_last):
            r0 = tl.maximum(tl.load(ROWS + b * s_r_b + blk), row_lo)
            r1 = tl.minimum(tl.load(ROWS + b * s_r_b + blk + 1), row_hi)
            # per-block parameters; s_p_b = 0 when pooled over the batch (Bs = 1)
            kp = b * s_p_b + blk * s_p_k + h * s_p_h
            cp = VCH + b * s_n_b + blk * s_n_k + h * s_n_h
            a_0 = tl.load(KS + kp + dq).to(tl.float32)
            a_1 = tl.load(KS + kp + D4 + dq).to(tl.float32)
            a_2 = tl.load(KS + kp + 2 * D4 + dq).to(tl.float32)
            a_3 = tl.load(KS + kp + 3 * D4 + dq).to(tl.float32)
            mu0 = tl.load(KM + kp + dq).to(tl.float32)
            mu1 = tl.load(KM + kp + D4 + dq).to(tl.float32)
            mu2 = tl.load(KM + kp + 2 * D4 + dq).to(tl.float32)
            mu3 = tl.load(KM + kp + 3 * D4 + dq).to(tl.float32)
            c0 = tl.load(cp + dq).to(tl.float32)
            c1 = tl.load(cp + D4 + dq).to(tl.float32)
            c2 = tl.load(cp + 2 * D4 + dq).to(tl.float32)
            c3 = tl.load(cp + 3 * D4 + dq).to(tl.float32)
            # keys: q' = fp16(q ⊙ a), the only rounding; qb = q·μ · sm_scale·log2e in fp32 from the raw q.
            # Centred codes: K̂ = a·x + μ = a·(x - Z) + (μ + Z·a). The rounding error of q' now multiplies
            # |x - Z| <= Z instead of x <= 2Z, and its mean over tokens (a shift of the block's scores) is gone.
            Z: tl.constexpr = 1 << (BITS - 1)
            mu0 = mu0 + Z * a_0
            mu1 = mu1 + Z * a_1
            mu2 = mu2 + Z * a_2
            mu3 = mu3 + Z * a_3
            qa0 = (q0 * a_0[None, :]).to(tl.float16)
            qa1 = (q1 * a_1[None, :]).to(tl.float16)
            qa2 = (q2 * a_2[None, :]).to(tl.float16)
            qa3 = (q3 * a_3[None, :]).to(tl.float16)
            qb = tl.sum(q0 * mu0[None, :] + q1 * mu1[None, :] + q2 * mu2[None, :] + q3 * mu3[None, :], 1) * qk_scale
            for t0 in range(r0, r1, BLOCK_N):
                t = t0 + tl.arange(0, BLOCK_N)
                valid = t < r1                                                # a tile never straddles a block
                k0, k1, k2, k3 = _load_code_quarters(kc, t, valid, s_c_t, dq, D4, BITS)
                v0, v1, v2, v3 = _load_code_quarters(vc, t, valid, s_c_t, dq, D4, BITS)
                vs = tl.load(vsp + t, mask=valid, other=0.0).to(tl.float32)  # σ_t, ν_t
                vm = tl.load(vmp + t, mask=valid, other=0.0).to(tl.float32) + Z * vs   # centred: ν + Z·σ
                m, l, a0, a1, a2, a3 = _attend_tile(m, l, a0, a1, a2, a3, qa0, qa1, qa2, qa3, qb,
                                                    k0, k1, k2, k3, v0, v1, v2, v3, vs, vm, c0, c1, c2, c3,
                                                    valid, qk_scale, True)
        return m, l, a0, a1, a2, a3

    @triton.jit
    def _attend_tile(m, l, a0, a1, a2, a3, q0, q1, q2, q3, qb, k0, k1, k2, k3, v0, v1, v2, v3,
                     vs, vm, c0, c1, c2, c3, valid, qk_scale, QUANT: tl.constexpr):
        """One online-softmax step over a [BLOCK_N] tile for all BLOCK_G query rows.
        QUANT: scores get the per-block constant qb; p is scaled by σ before the V dot, ν adds a rank-1 bias,
        and c (the CST normalizer) multiplies the tile's contribution. The fp16 buffer uses none of these."""
        s = tl.dot(q0, tl.trans(k0))                                          # [BLOCK_G, BLOCK_N] fp32
        s = tl.dot(q1, tl.trans(k1), s)
        s = tl.dot(q2, tl.trans(k2), s)
        s = tl.dot(q3, tl.trans(k3), s)
        s = s * qk_scale                                                      # sm_scale·log2(e) after the dot:
        if QUANT:                                                             # q itself is never rounded again
            s += qb[:, None]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)                 # all masked so far: avoid -inf - -inf
        alpha = tl.math.exp2(m - m_use)
        p = tl.math.exp2(s - m_use[:, None])                                  # masked -> exactly 0
        l = l * alpha + tl.sum(p, 1)
        if QUANT:
            pv = (p * vs[None, :]).to(tl.float16)                             # p ⊙ σ, p <= 1 so fp16 is safe
            bias = tl.sum(p * vm[None, :], 1)[:, None]                        # Σ_t p_t ν_t
            a0 = a0 * alpha[:, None] + c0[None, :] * (tl.dot(pv, v0) + bias)
            a1 = a1 * alpha[:, None] + c1[None, :] * (tl.dot(pv, v1) + bias)
            a2 = a2 * alpha[:, None] + c2[None, :] * (tl.dot(pv, v2) + bias)
            a3 = a3 * alpha[:, None] + c3[None, :] * (tl.dot(pv, v3) + bias)
        else:
            pv = p.to(tl.float16)
            a0 = tl.dot(pv, v0, a0 * alpha[:, None])
            a1 = tl.dot(pv, v1, a1 * alpha[:, None])
            a2 = tl.dot(pv, v2, a2 * alpha[:, None])
            a3 = tl.dot(pv, v3, a3 * alpha[:, None])
        return m_new, l, a0, a1, a2, a3

    @triton.jit
    def _codes_to_f16(x, Z: tl.constexpr):
        # integer code -> centred fp16 value c - Z without an I2F instruction: 0x6400 is 1024.0 in fp16 with a
        # 10-bit mantissa of zeros, so OR-ing a code c < 1024 into the mantissa gives exactly 1024 + c.
        # Subtracting 1024 + Z instead of 1024 costs nothing and centres the codes (see _segment_pass).
        return (x.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + Z)

    @triton.jit
    def _load_code_quarters(ptr, t, valid, stride_t, dq, D4: tl.constexpr, BITS: tl.constexpr):
        """Packed rows t of one (b, KV head) of a segment -> its four fp16 tiles [BLOCK_N, D/4] of centred codes
        x - 2^(BITS-1). Planar packing (quant.pack) makes every quarter a shift-and-mask of a contiguous
        byte tile."""
        Z: tl.constexpr = 1 << (BITS - 1)
        offs = t[:, None] * stride_t + dq[None, :]
        if BITS == 4:
            lo = tl.load(ptr + offs, mask=valid[:, None], other=0)           # bytes [0, D/4): quarters 0 and 2
            hi = tl.load(ptr + offs + D4, mask=valid[:, None], other=0)      # bytes [D/4, D/2): quarters 1 and 3
            x0, x1, x2, x3 = lo & 15, hi & 15, lo >> 4, hi >> 4
        else:
            by = tl.load(ptr + offs, mask=valid[:, None], other=0)           # 2-bit: byte j holds x[j + i·D/4] at 2i
            x0, x1, x2, x3 = by & 3, (by >> 2) & 3, (by >> 4) & 3, by >> 6
        return _codes_to_f16(x0, Z), _codes_to_f16(x1, Z), _codes_to_f16(x2, Z), _codes_to_f16(x3, Z)
