"""
Decode attention over the ZipCache layer layout: one new query token per sequence attends to
[4-bit blocks | 2-bit blocks | fp16 buffer] without ever materializing a dequantized cache (README "The decode
kernel"). In reading order:

    ZipLayerView                the per-layer layout cache.py stores (as stored, or expanded: the kernel's ABI), and
                                dense_view (a plain fp16 cache as a view)
    decode_attention            the one dispatch cache.py calls: kernel="auto" | "triton" | "c" | "torch"
    zip_decode_attention_ref    oracle: dequantize everything (dequantize_segment), fp32 softmax attention
    zip_decode_attention_torch  the kernel's algebra in torch on the stored view, SWAR-unpacked codes, a few
                                whole-tensor ops per run of equal-shape blocks (the CPU path without a C compiler)
    zip_decode_attention_c      the CPU fast path: the same algebra as fused loops in decode_cpu.c, compiled on first
                                use (decode_cpu.py), reading the stored view in place
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
import sys
from dataclasses import dataclass, replace
from itertools import groupby

import torch

import decode_cpu
from quant import dequantize_nested, unpack

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
# the layer view: q-independent, built by ZipState.view (cache.py); nothing else is accepted. Two forms of it:
#   stored    what ZipCache stores, read in place: per-block CST normalizer and nested key statistics, with the
#             sub-blocks' parent table (parent is set). The CPU paths (zip_decode_attention_c, _torch) read this form.
#   expanded  one fp16 key (scale, min) and one normalizer per sub-block (parent is None): the Triton kernel's ABI,
#             and what the reference reads. view.expand() turns the stored form into it (a per-call workspace).
# A "block" below is a sub-block of the row tables: a block of the cache cut by key groups (ZipCacheConfig.k_group)
# into runs of rows with their own key statistics; without key groups the two are the same.

@dataclass
class ZipSegment:
    """One precision group (hi = 4-bit salient, lo = 2-bit regular) of one layer. W = D*bits/8 for the keys,
    D*vbits/8 for the values (their own width where v_bits is set: ZipCacheConfig.k_low_bits)."""
    bits: int
    k_codes: torch.Tensor  # uint8 [B, H_kv, CAP, W]   planar packing (quant.pack), rows grouped by block
    v_codes: torch.Tensor  # uint8 [B, H_kv, CAP, W_v]
    v_scale: torch.Tensor  # fp16  [B, Hv, CAP]        Hv = H_kv ("head" scope) or 1 ("row" scope, broadcast)
    v_min: torch.Tensor    # fp16  [B, Hv, CAP]
    k_scale: torch.Tensor | None  # fp16 [Bs, NB_CAP, H_kv, D] channelwise per block; Bs = B, or 1 when pooled;
    k_min: torch.Tensor | None    # fp16 [Bs, NB_CAP, H_kv, D]  None in a stored view with nested statistics
    rows: torch.Tensor     # int32 [B, NB_CAP+1]       block k of sequence b = rows [rows[b,k], rows[b,k+1])
    # nested key statistics as stored (quant.quantize_nested), stored views only: k_stat uint8 [Bs, NB_CAP, H_kv, D]
    # (min code | scale code << 4 per block), k_base fp16 [Bs, NP_CAP, H_kv, 4, D] (per parent, view.parent)
    k_stat: torch.Tensor | None = None
    k_base: torch.Tensor | None = None
    v_bits: int | None = None     # the values' width where it differs from the keys' (None: bits)

    @property
    def vbits(self):
        return self.bits if self.v_bits is None else self.v_bits

    def key_stats(self, blocks, parents):
        """(scale, min) fp16 [Bs, *blocks' shape, H_kv, D] of the given blocks (index tensors or slices into dim 1;
        parents: their parents', for nested statistics): the stored fp16 pair, or the nested one decoded exactly
        (quant.dequantize_nested)."""
        if self.k_stat is None:
            return self.k_scale[:, blocks], self.k_min[:, blocks]
        return dequantize_nested(self.k_stat[:, blocks], self.k_base[:, parents])


@dataclass
class ZipLayerView:
    hi: ZipSegment
    lo: ZipSegment
    v_chan: torch.Tensor   # fp16 [Bs, NB_CAP, H_kv, D]  CST channel normalizer per block (shared by hi and lo);
                           # per parent [Bs, NP_CAP, H_kv, D] in a stored view
    k_buf: torch.Tensor    # fp16 [B, H_kv, NBUF_CAP, D] raw post-RoPE keys of the unfinished block
    v_buf: torch.Tensor    # fp16 [B, H_kv, NBUF_CAP, D]
    n_buf: int             # valid buffer rows (same for every sequence)
    n_blocks: int          # valid blocks (same for every sequence; a block may hold 0 rows in one segment)
    # the owner's store for the split tables the Triton launcher derives from the row tables: ZipCache passes a dict
    # it empties whenever it appends a block, so a table is built once per block, not per step; None = build per call
    tables: dict | None = None
    # stored view: int32 [NB_CAP], the parent (cache block) of each block, nondecreasing; v_chan and k_base are per
    # parent. None: the expanded view, every block its own parent
    parent: torch.Tensor | None = None

    @property
    def segments(self):
        return (self.hi, self.lo)

    def expand(self):
        """The expanded form (the kernel's ABI): fp16 key (scale, min) and v_chan per block, [Bs, n_blocks, H_kv, D],
        decoded from the stored form for this call only. An expanded view is returned as it is."""
        if self.parent is None and self.hi.k_stat is None and self.lo.k_stat is None:
            return self
        nb = self.n_blocks
        par = self.parent[:nb].long() if self.parent is not None else torch.arange(nb, device=self.k_buf.device)
        segs = []
        for seg in self.segments:
            scale, mn = seg.key_stats(slice(0, nb), par)
            segs.append(replace(seg, k_scale=scale, k_min=mn, k_stat=None, k_base=None))
        return replace(self, hi=segs[0], lo=segs[1], v_chan=self.v_chan[:, par], parent=None)


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

    kernel="auto": the Triton kernel on CUDA when D is supported, else the fused C loop on a CPU where it is built
    (decode_cpu.supports), else the torch path; "triton": force the kernel (CUDA, or CPU tensors under
    TRITON_INTERPRET=1); "c": force the C loop; "torch": force the torch path (the readable one)."""
    if kernel == "torch":
        return zip_decode_attention_torch(q, view, **kw)
    if kernel == "auto":
        if HAS_TRITON and q.is_cuda and q.shape[-1] in SUPPORTED_D and q.dtype in (torch.float16, torch.bfloat16):
            return zip_decode_attention(q, view, **kw)
        if decode_cpu.supports(q, view):
            return zip_decode_attention_c(q, view, **kw)
        return zip_decode_attention_torch(q, view, **kw)
    if kernel == "c":
        if not decode_cpu.supports(q, view):
            raise RuntimeError("kernel='c' needs CPU tensors, a non-fp64 query and a C compiler (decode_cpu.py); "
                               "use --kernel auto or torch")
        return zip_decode_attention_c(q, view, **kw)
    if kernel == "triton":
        if not HAS_TRITON:
            raise RuntimeError("kernel='triton' needs the triton package: pip install triton (Linux), "
                               "or use --kernel torch")
        if not q.is_cuda and not INTERPRET:
            raise RuntimeError("kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 set before importing "
                               "decode_kernel.py, for CPU tests); use --kernel torch or --kernel auto on this machine")
        return zip_decode_attention(q, view, **kw)
    raise ValueError(f"unknown kernel={kernel!r}; use 'auto', 'triton', 'c' or 'torch'")


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
    y = unpack(seg.v_codes[:, :, :n], seg.vbits).to(dt)
    sig = seg.v_scale[:, :, :n].to(dt)[..., None]                  # [B, Hv, n, 1]
    nu = seg.v_min[:, :, :n].to(dt)[..., None]
    return a * x + mu, c * (sig * y + nu)                          # K̂ = a·x + μ, V̂ = c·(σ·y + ν)


def _sequence_view(view, b):
    """Sequence b of a view as a one-sequence view; pooled parameters (Bs = 1) stay shared."""
    pick = lambda t: t[b:b + 1] if t is not None and t.shape[0] > 1 else t                # noqa: E731
    one = lambda s: replace(s, k_codes=s.k_codes[b:b + 1], v_codes=s.v_codes[b:b + 1],     # noqa: E731
                            v_scale=s.v_scale[b:b + 1], v_min=s.v_min[b:b + 1], rows=s.rows[b:b + 1],
                            k_scale=pick(s.k_scale), k_min=pick(s.k_min), k_stat=pick(s.k_stat), k_base=pick(s.k_base))
    return replace(view, hi=one(view.hi), lo=one(view.lo), v_chan=pick(view.v_chan), k_buf=view.k_buf[b:b + 1],
                   v_buf=view.v_buf[b:b + 1], tables=None)


def zip_decode_attention_ref(q, view, *, sm_scale=None, num_splits=None, block_n=None, return_lse=False):
    """Oracle: out [B, H_q, D] in q.dtype (+ natural-log lse [B, H_q] fp32). Math in fp32 (fp64 for fp64 q).
    num_splits and block_n are accepted for a common signature and ignored. Slow (loops over the batch)."""
    B, Hq, Hkv, G, D = _shapes(q, view)
    view = view.expand()
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty(B, Hq, D, dtype=dt, device=q.device)
    lse = torch.empty(B, Hq, dtype=dt, device=q.device)
    for b in range(B):
        vb = _sequence_view(view, b)
        parts = []
        for seg in vb.segments:
            K, V = dequantize_segment(seg, vb.v_chan, row_blocks(seg.rows[0], view.n_blocks), dt)
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
# The torch CPU path (where no C compiler is; decode_cpu.c is the same algebra in loops): over the stored view, in
# whole tensors and few of them: on a CPU each torch call costs microseconds, so a layer is done in ~100 calls whatever
# its length, and every big one reads or writes each code once or twice.
#
# Pieces. The row tables cut a segment into runs of consecutive parents (cache blocks) of one shape: the prompt's
# block, then the decode blocks, which all have recompress_every rows split alike. Inside a parent the key groups come
# in at most two sizes (tensor_split's runs differ by one row), so every piece of a run is a plain view
# [B, H_kv, R, P, S, ...] of the segment (R parents, P blocks of S rows each): no gather, no padding, no masking.
#
# Codes. swar_codes unpacks a segment in three whole-tensor integer ops (SWAR: one multiply copies a packed byte into
# each byte of a wider integer, one AND keeps each part's bits). The codes come out byte-major, d' = j·parts + i for
# channel d = i·W + j, and scaled by lane(d') = 2^(bits·i). That costs no pass over the codes: q and the per-block key
# statistics are put in that order (a gather of q, a stack of the statistics' planes), the lane scales are divided
# out of q (exact: powers of two), and each value sum goes back to channel order by one small matmul (unperm).
#
#   scores   per piece, q' = q ⊙ a per block of S rows (the key scale folded into q): one batched matmul q'·x'ᵀ over
#            the piece's blocks, + q·μ per block; the nested statistics decoded per run, each parent's (base, step)
#            broadcast over its blocks
#   softmax  over the whole layer at once (its scores are a few KB): max, exp, sum; lse = m + log l
#   values   p' = p ⊙ σ (the value scale folded into the probabilities): Σ_t p'_t y'_t by one batched matmul per run
#            (R parents), back to channel order, + Σ_t p_t ν_t, then c once per parent for hi and lo together
# Per step it reads the row and parent tables on the host (O(blocks) integers) and keeps nothing derived from the
# stored blocks: its workspaces are freed when the call returns.

_CONSTS = {}   # (bits, D, device, dtype) -> _Consts: fixed tables of the layout, built once (no cache contents)


class _Consts:
    """A segment's fixed tables (bits, head size D): byte-major channel d' -> channel perm[d'] and lane[d'], the
    matrix unperm [D', D] that maps a byte-major, lane-scaled row back to channel order, and the SWAR constants."""

    def __init__(self, bits, D, device, dt):
        self.parts = parts = 8 // bits
        i = torch.arange(D, device=device) % parts                      # the part of byte-major channel d'
        self.perm = i * (D // parts) + torch.arange(D, device=device) // parts
        self.lane = (2.0 ** (bits * i)).to(dt)
        self.unperm = torch.zeros(D, D, dtype=dt, device=device)
        self.unperm[torch.arange(D, device=device), self.perm] = 1.0 / self.lane
        if parts > 1:                                                   # multiplier and mask, as two's complement
            self.int_dtype = torch.int32 if bits == 2 else torch.int16
            mul, mask, width = (0x01010101, 0xC0300C03, 32) if bits == 2 else (0x0101, 0xF00F, 16)
            self.mul = torch.tensor(mul, dtype=self.int_dtype, device=device)
            self.mask = torch.tensor(mask - (1 << width), dtype=self.int_dtype, device=device)


def _consts(bits, D, device, dt):
    key = (bits, D, device, dt)
    if key not in _CONSTS:
        _CONSTS[key] = _Consts(bits, D, device, dt)
    return _CONSTS[key]


def swar_codes(packed, bits):
    """uint8 [..., W] (quant.pack's planar bytes, any strides) -> contiguous uint8 [..., 8W/bits]: the codes in
    byte-major order (byte j·parts + i holds x[i·W + j], channel d = i·W + j) times lane 2^(bits·i). Three integer ops
    on a little-endian machine: replicate each byte into a wider integer by a multiply, keep part i's bits in byte i
    by an AND (the multiply wraps in two's complement, as torch's integer ops do)."""
    parts = 8 // bits
    if parts == 1:
        return packed.contiguous()
    if sys.byteorder != "little":                                       # the same result, the long way
        x = unpack(packed, bits).unflatten(-1, (parts, -1)).transpose(-1, -2)
        return (x << torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)).flatten(-2).contiguous()
    k = _consts(bits, packed.shape[-1] * parts, packed.device, torch.float32)
    x = packed.to(k.int_dtype)
    x.mul_(k.mul).bitwise_and_(k.mask)
    return x.view(torch.uint8)


def _runs(rows, parent):
    """One segment's row table rows [n_blocks + 1] and parents [n_blocks] (nondecreasing; host lists) -> runs
    [(p0, R, j0, J, r0, M, parts)]: R consecutive parents p0.. of one shape, each of J blocks and M > 0 rows (blocks
    j0.., rows r0.. in the first), and the run's pieces parts [(j, P, S, t)]: P blocks of S > 0 rows each, from block
    j and row t of every parent. Parents with no rows here, and empty blocks, are left out."""
    sizes = [b - a for a, b in zip(rows, rows[1:])]
    runs, j = [], 0
    for p, blocks in groupby(parent):                                 # a parent's blocks are consecutive
        J = len(list(blocks))
        shape = tuple(sizes[j:j + J])
        if runs and runs[-1][0] + runs[-1][1] == p and runs[-1][-1] == shape:
            runs[-1][1] += 1
        else:
            runs.append([p, 1, j, J, rows[j], sum(shape), shape])
        j += J
    out = []
    for p0, R, j0, J, r0, M, shape in runs:
        if M:
            parts, j, t = [], 0, 0
            for S, group in groupby(shape):                           # blocks of equal size in a row
                P = len(list(group))
                if S:
                    parts.append((j, P, S, t))
                j, t = j + P, t + P * S
            out.append((p0, R, j0, J, r0, M, parts))
    return out


def _byte_major(t, parts):
    """t [..., D] in channel order -> a new contiguous [..., D] in the codes' byte-major order (swar_codes): the
    parts planes [..., parts, W] interleaved, one stack."""
    if parts == 1:
        return t.contiguous()
    return torch.stack(t.unflatten(-1, (parts, -1)).unbind(-2), -1).flatten(-2)


def _run_key_stats(seg, k, p0, R, j0, J, dt):
    """(a, μ) in byte-major channel order, dtype dt, [Bs, H_kv, R·J, D], of a run's blocks: the stored fp16 pair, or
    the nested one decoded exactly as quant.dequantize_nested does (fp16(base + code·step) with code·step exact in
    fp32), each parent's (base, step) broadcast over its J blocks. k: the segment's _Consts."""
    blocks = slice(j0, j0 + R * J)
    if seg.k_stat is None:
        return (_byte_major(t[:, blocks].transpose(1, 2), k.parts).to(dt) for t in (seg.k_scale, seg.k_min))
    st = _byte_major(seg.k_stat[:, blocks].transpose(1, 2), k.parts).unflatten(2, (R, J))  # [Bs, H, R, J, D']
    base = _byte_major(seg.k_base[:, p0:p0 + R].permute(0, 2, 1, 3, 4), k.parts).float()[:, :, :, None]
    a = torch.addcmul(base[..., 2, :], (st >> 4).float(), base[..., 3, :]).half()  # s0 + c_s·ds  [Bs, H, R, J, D']
    mu = torch.addcmul(base[..., 0, :], (st & 15).float(), base[..., 1, :]).half()  # mn0 + c_mn·dmn
    return a.to(dt).flatten(2, 3), mu.to(dt).flatten(2, 3)


def zip_decode_attention_torch(q, view, *, sm_scale=None, num_splits=None, block_n=None, return_lse=False):
    """Same contract as zip_decode_attention_ref, on a stored or expanded view, without a dequantized copy of the
    cache (comment above). Sequences whose row tables differ (a ragged view) are run one at a time."""
    B, Hq, Hkv, G, D = _shapes(q, view)
    nb, n_buf, dev = view.n_blocks, view.n_buf, q.device
    if B > 1 and nb > 0 and any(not torch.equal(s.rows[1:, :nb + 1], s.rows[:1, :nb + 1].expand(B - 1, -1))
                                for s in view.segments):
        res = [zip_decode_attention_torch(q[b:b + 1], _sequence_view(view, b), sm_scale=sm_scale, return_lse=True)
               for b in range(B)]
        out, lse = torch.cat([o for o, _ in res]), torch.cat([x for _, x in res])
        return (out, lse) if return_lse else out
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if sm_scale is None else sm_scale
    qf = q.to(dt).view(B, Hkv, G, D) * scale                          # [B, H_kv, G, D], softmax scale folded in
    parent = view.parent[:nb].tolist() if view.parent is not None else list(range(nb))
    plan = [(seg, _runs(seg.rows[0, :nb + 1].tolist(), parent)) for seg in view.segments] if nb else []
    plan = [(seg, runs, _consts(seg.bits, D, dev, dt), _consts(seg.vbits, D, dev, dt)) for seg, runs in plan if runs]
    N = sum(R * M for _, runs, _, _ in plan for _, R, _, _, _, M, _ in runs) + n_buf
    if N == 0:                                                        # an empty cache
        out = torch.zeros(B, Hq, D, dtype=dt, device=dev)
        lse = torch.full((B, Hq), float("-inf"), dtype=dt, device=dev)
        return _finish(out, lse.float() if dt != torch.float64 else lse, q, return_lse)
    s = torch.empty(B, Hkv, G, N, dtype=dt, device=dev)               # every row's score, then its probability
    off = 0
    for seg, runs, k, _ in plan:                                      # scores of the quantized rows, per segment
        n = sum(R * M for _, R, _, _, _, M, _ in runs)
        x = swar_codes(seg.k_codes[:, :, runs[0][4]:runs[0][4] + n], seg.bits)              # [B, H_kv, n, D'] uint8
        qp = qf[..., k.perm]                                          # q in byte-major order  [B, H_kv, G, D']
        ql = qp / k.lane                                              # and over the lane scales of the codes
        for p0, R, j0, J, r0, M, parts in runs:
            xo = r0 - runs[0][4]                                                           # the run's first row in x
            a, mu = _run_key_stats(seg, k, p0, R, j0, J, dt)                              # [Bs, H_kv, R·J, D']
            a = a.unflatten(2, (R, J))[:, :, :, :, None]                                    # [Bs, H_kv, R, J, 1, D']
            qmu = (qp @ mu.transpose(-1, -2)).unflatten(-1, (R, J))                         # q·μ  [B, H_kv, G, R, J]
            xr = x[:, :, xo:xo + R * M].unflatten(2, (R, M))                               # [B, H_kv, R, M, D']
            sv = s[..., off:off + R * M].unflatten(-1, (R, M))                             # [B, H_kv, G, R, M]
            for j, P, S, t in parts:                                  # (q ⊙ a)·x per block of S rows, + q·μ
                qa = ql[:, :, None, None] * a[:, :, :, j:j + P]                            # [B, H_kv, R, P, G, D']
                sp = qa @ xr[:, :, :, t:t + P * S].unflatten(3, (P, S)).to(dt).transpose(-1, -2)  # [B,H,R,P,G,S]
                torch.add(sp.permute(0, 1, 4, 2, 3, 5), qmu[..., j:j + P, None],
                          out=sv[..., t:t + P * S].unflatten(-1, (P, S)))
            off += R * M
    if n_buf:                                                         # the fp16 buffer
        s[..., N - n_buf:] = qf @ view.k_buf[:, :, :n_buf].to(dt).transpose(-1, -2)
    m = s.amax(-1, keepdim=True)                                      # [B, H_kv, G, 1]
    p = s.sub_(m).exp_()                                              # in place: s holds the probabilities now
    l = p.sum(-1)                                                     # [B, H_kv, G]
    sums = {}                                                         # (p0, R) -> Σ_t p_t (σ_t y_t + ν_t), channel order
    off = 0
    for seg, runs, _, k in plan:                                      # Σ_t p_t V̂_t over the quantized rows
        n = sum(R * M for _, R, _, _, _, M, _ in runs)
        r_first = runs[0][4]
        y = swar_codes(seg.v_codes[:, :, r_first:r_first + n], seg.vbits).to(dt)            # [B, H_kv, n, D']
        for p0, R, j0, J, r0, M, parts in runs:
            rr = slice(r0 - r_first, r0 - r_first + R * M)
            pr = p[..., off + rr.start:off + rr.stop]                                     # [B, H_kv, G, R·M]
            ps = (pr * seg.v_scale[:, :, None, r0:r0 + R * M].to(dt)).unflatten(-1, (R, M))  # p ⊙ σ
            w = (ps.transpose(2, 3) @ y[:, :, rr].unflatten(2, (R, M))) @ k.unperm        # [B, H_kv, R, G, D]
            nu = (pr * seg.v_min[:, :, None, r0:r0 + R * M].to(dt)).unflatten(-1, (R, M)).sum(-1)  # Σ p ν [B,H,G,R]
            w += nu.transpose(2, 3)[..., None]
            if (p0, R) in sums:
                sums[(p0, R)] += w
            else:
                sums[(p0, R)] = w
        off += n
    acc = None
    for (p0, R), w in sums.items():                                   # c once per parent: [Bs, H_kv, R, 1, D]
        cw = (view.v_chan[:, p0:p0 + R].to(dt).transpose(1, 2)[:, :, :, None] * w).sum(2)
        acc = cw if acc is None else acc + cw
    if n_buf:
        pv = p[..., N - n_buf:] @ view.v_buf[:, :, :n_buf].to(dt)
        acc = pv if acc is None else acc + pv
    out = (acc / l[..., None]).reshape(B, Hq, D)
    lse = (m[..., 0] + torch.log(l)).reshape(B, Hq)
    return _finish(out, lse.float() if dt != torch.float64 else lse, q, return_lse)


def zip_decode_attention_c(q, view, *, sm_scale=None, num_splits=None, block_n=None, return_lse=False):
    """Same contract as zip_decode_attention_ref: the fused C loop (decode_cpu.c) on the stored or expanded view,
    fp32 math; kernel="auto" takes it on the CPU wherever decode_cpu.supports(q, view)."""
    B, Hq, Hkv, G, D = _shapes(q, view)
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out, lse = decode_cpu.decode(q.float().view(B, Hkv, G, D) * scale, view)      # [B, H_kv, G, D], [B, H_kv, G]
    return _finish(out.view(B, Hq, D), lse.view(B, Hq), q, return_lse)


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
    view = view.expand()                                              # the kernel reads fp16 statistics per block
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
                   seg.v_codes.stride(0), seg.v_codes.stride(1), seg.v_codes.stride(2),
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
        HI_BITS=view.hi.bits, LO_BITS=view.lo.bits, HI_VBITS=view.hi.vbits, LO_VBITS=view.lo.vbits, SPLIT=S > 1,
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
        if seg.bits not in (2, 4) or seg.vbits not in (2, 4):
            raise ValueError(f"the kernel reads 2- or 4-bit segments, got {p}.bits={seg.bits} (values "
                             f"{seg.vbits}); use kernel='torch'")
        named += [(f"{p}.{f}", getattr(seg, f)) for f in ("k_codes", "v_codes", "v_scale", "v_min", "k_scale",
                                                            "k_min", "rows")]
        if seg.v_scale.stride() != seg.v_min.stride() or seg.k_scale.stride() != seg.k_min.stride():
            raise ValueError(f"segment {p}: v_scale/v_min and k_scale/k_min must have matching strides "
                             f"(allocate them alike)")
        for f, b in (("k_codes", seg.bits), ("v_codes", seg.vbits)):
            w = getattr(seg, f).shape[-1]
            if w != D * b // 8 or getattr(seg, f).stride(-1) != 1:
                raise ValueError(f"segment {p}: {f} are {w} bytes wide (stride {getattr(seg, f).stride(-1)}), "
                                 f"expected D*bits/8 = {D * b // 8}, contiguous")
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
            hs_c_b, hs_c_h, hs_c_t, hs_w_b, hs_w_h, hs_w_t, hs_v_b, hs_v_h, hs_p_b, hs_p_k, hs_p_h, hs_r_b,
            LKC, LVC, LVS, LVM, LKS, LKM, LROWS,
            ls_c_b, ls_c_h, ls_c_t, ls_w_b, ls_w_h, ls_w_t, ls_v_b, ls_v_h, ls_p_b, ls_p_k, ls_p_h, ls_r_b,
            VCH, s_n_b, s_n_k, s_n_h,
            KB, VB, s_kb_b, s_kb_h, s_kb_t, s_vb_b, s_vb_h, s_vb_t,
            TAB, O, LSE, s_o_b, s_o_h, s_o_s, s_l_b, s_l_h,
            H_kv, G, n_buf, qk_scale,
            D4: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
            HI_BITS: tl.constexpr, LO_BITS: tl.constexpr, HI_VBITS: tl.constexpr, LO_VBITS: tl.constexpr,
            SPLIT: tl.constexpr):
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
            hs_c_b, hs_c_h, hs_c_t, hs_w_b, hs_w_h, hs_w_t, hs_v_b, hs_v_h, hs_p_b, hs_p_k, hs_p_h,
            s_n_b, s_n_k, s_n_h, hs_r_b, dq, D4, HI_BITS, HI_VBITS, BLOCK_N)
        m, l, a0, a1, a2, a3 = _segment_pass(
            m, l, a0, a1, a2, a3, q0, q1, q2, q3, qk_scale,
            LKC, LVC, LVS, LVM, LKS, LKM, VCH, LROWS, tab + S * 4, b, h,
            ls_c_b, ls_c_h, ls_c_t, ls_w_b, ls_w_h, ls_w_t, ls_v_b, ls_v_h, ls_p_b, ls_p_k, ls_p_h,
            s_n_b, s_n_k, s_n_h, ls_r_b, dq, D4, LO_BITS, LO_VBITS, BLOCK_N)

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
                      s_c_b, s_c_h, s_c_t, s_w_b, s_w_h, s_w_t, s_v_b, s_v_h, s_p_b, s_p_k, s_p_h,
                      s_n_b, s_n_k, s_n_h, s_r_b, dq, D4: tl.constexpr, BITS: tl.constexpr, VBITS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        """This program's share of one segment: its blocks blk_first..blk_last, clipped to rows [row_lo, row_hi)
        (the launcher's table). q0..q3 are the raw fp32 query quarters. Key codes are BITS wide (strides s_c_*),
        value codes VBITS (strides s_w_*)."""
        blk_first = tl.load(TAB)
        blk_last = tl.load(TAB + 1)
        row_lo = tl.load(TAB + 2)
        row_hi = tl.load(TAB + 3)
        kc = KC + b * s_c_b + h * s_c_h                                       # int64 base offsets
        vc = VC + b * s_w_b + h * s_w_h
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
            ZV: tl.constexpr = 1 << (VBITS - 1)
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
                v0, v1, v2, v3 = _load_code_quarters(vc, t, valid, s_w_t, dq, D4, VBITS)
                vs = tl.load(vsp + t, mask=valid, other=0.0).to(tl.float32)  # σ_t, ν_t
                vm = tl.load(vmp + t, mask=valid, other=0.0).to(tl.float32) + ZV * vs  # centred: ν + Z_v·σ
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
