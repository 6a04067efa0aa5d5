"""
Quantization primitives shared by every cache (pure tensor functions, no state).

    quantize / dequantize   asymmetric uniform min/scale quantizer, statistics over any dims  
    quantize_nested         the same with many small groups' statistics stored in 4 bits each (k-quant style)
    quantize_runs           channelwise over runs of consecutive rows: ZipCache's keys (one run = the paper's)
    pack / unpack           2/4/8-bit codes <-> uint8 bytes, planar along the last dim        
    pack_bits / unpack_bits a 1-bit mask <-> uint8 bytes, in order
    fake_quant              dequantize(quantize(x)) with a straight-through gradient           (CLLA's QAT)
    granularities           groupwise, tokenwise, channelwise and channel-separable tokenwise 

Layout convention for the granularity helpers: x is [..., T, D], tokens on dim -2, channels on dim -1, which is
how K and V arrive ([B, H_kv, T, D]).
"""
from collections import namedtuple

import torch

SCALE_EPS = 2 ** -14  # smallest normal fp16: keeps constant groups finite (0 = the official code, NaN there)


def check_finite(x, what="tensor", limit=None):
    """One clear error instead of a silently NaN cache. min and max are finite iff every element is (NaN propagates
    through both): one reduction pass, ~20x cheaper than isfinite(x).all() on CPU. (This syncs on GPU.) limit: the
    largest magnitude the storage dtype holds (65504 for fp16): fp32 values beyond it would be stored as Inf."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        # in fp16 the usual cause is overflow; in fp32/bf16 the model itself produced them (e.g. NaN weights)
        hint = ("check the model's dtype/overflow, e.g. run in float32 or bfloat16 instead of float16"
                if x.dtype == torch.float16 else "check the checkpoint's weights for NaN/Inf")
        raise ValueError(f"{what} contains NaN or Inf values; quantizing it would poison the cache ({hint})")
    if limit is not None and max(-lo.item(), hi.item()) > limit:
        peak = max(-lo.item(), hi.item())
        raise ValueError(f"{what} reach {peak:.4g}, beyond the {limit:g} that the cache's storage dtype holds (they "
                         f"would be stored as Inf); the model's activations overflow: check the checkpoint's weights")


def _check_bits(bits, allowed=range(1, 9)):
    if bits not in allowed:
        raise ValueError(f"bits={bits} is not supported here; use one of {sorted(allowed)}")


def quant_params(x, bits, dim, scale_eps=SCALE_EPS):
    """(scale fp16, mn fp16) of the asymmetric quantizer, statistics over `dim` (keepdim) computed in fp32."""
    _check_bits(bits)
    xf = x.float()
    mn = xf.amin(dim=dim, keepdim=True)
    mx = xf.amax(dim=dim, keepdim=True)
    scale = ((mx - mn) / (2 ** bits - 1)).clamp_min(scale_eps)
    return scale.half(), mn.half()  # stored fp16; quantize with these, so every path reconstructs the same values


def quantize(x, bits, dim, scale_eps=SCALE_EPS, check=True):
    """x -> (codes uint8 [same shape as x], scale fp16, mn fp16), one (scale, mn) per slice over `dim`.

    s16 = fp16(max((max - min)/(2^k - 1), eps)); m16 = fp16(min); q = clamp(round((x - m16)/s16), 0, 2^k - 1).
    The clamp matters: fp16 rounding of the scale can push the top code to 2^k. torch.round is half-to-even.
    check=False skips the NaN/Inf test when the caller has already validated x.
    """
    if check:
        check_finite(x, "quantize input")
    scale, mn = quant_params(x, bits, dim, scale_eps)
    return encode(x, scale, mn, bits), scale, mn


def encode(x, scale, mn, bits):
    """Codes of x under given fp16 (scale, mn) (broadcast): clamp(round((x - mn)/scale), 0, 2^k - 1), uint8."""
    # a constant group with scale_eps = 0 has scale 0 and gives 0/0: its code is defined as 0 (x_hat = mn, exact),
    # not an undefined NaN->uint8 cast. Dividing by at least fp32's smallest normal does that (0/tiny = 0) and changes
    # no other code: every nonzero fp16 scale is larger, and x != mn over a zero scale still clamps to the same end.
    # No NaN pass over the codes, no host sync. fake_quant keeps the official NaN so that mode can still be studied.
    q = (x.float() - mn.float()) / scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    return q.round_().clamp_(0, 2 ** bits - 1).to(torch.uint8)


def dequantize(codes, scale, mn, dtype=torch.float32):
    """codes * scale + mn with broadcasting; math in at least fp32, result in `dtype`."""
    ct = torch.promote_types(dtype, torch.float32)
    return (codes.to(ct) * scale.to(ct) + mn.to(ct)).to(dtype)


# -----------------------------------------------------------------------------
# nested statistics (beyond the paper): the (scale, mn) of many small groups, each stored as a STAT_BITS-bit code
# under one fp16 (base, step) pair per parent, the super-block idea of llama.cpp's k-quants. A small group's own
# statistics cost 32 bits per channel in fp16 and 2*STAT_BITS here.

STAT_BITS = 4


def quantize_nested(x, bits, dim, sub_dim, scale_eps=SCALE_EPS, valid=None):
    """x -> (codes uint8 [x's shape], stat uint8, base fp16): one (scale, mn) per slice over `dim` (a "sub-group";
    sub-groups are indexed along `sub_dim`), stored nested: stat = mn code | scale code << 4 per sub-group and
    channel ([mn's shape]), base = (mn0, d_mn, s0, d_s) fp16 stacked on a new dim -2 ([mn's shape with sub_dim
    reduced to 1, then 4, D]). The nested values, which dequantize_nested gives back exactly, are

        mn_hat = fp16(mn0 + c_mn * d_mn)   with c_mn = floor((mn - mn0) / d_mn)    <= mn: the range keeps its bottom
        s_hat  = fp16(s0 + c_s * d_s)      with c_s = ceil((need - s0) / d_s)     >= need = (max - mn_hat)/(2^k - 1)

    so every sub-group's range is still covered (up to fp16 rounding; the codes clamp) and x is coded with them.
    One sub-group along sub_dim gives exactly quantize(): base = (mn16, 0, s16, 0), stat 0. valid (bool,
    broadcastable to mn) leaves sub-groups out of the base and sets their stat to 0 (empty runs of a block).
    """
    L = 2 ** STAT_BITS - 1
    if x.shape[sub_dim] == 1:
        s16, m16 = quant_params(x, bits, dim, scale_eps)
        base = torch.stack([m16, torch.zeros_like(m16), s16, torch.zeros_like(s16)], -2)
        return encode(x, s16, m16, bits), torch.zeros_like(m16, dtype=torch.uint8), base
    xf = x.float()
    mn, mx = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)          # per sub-group, fp32

    def level(v, round_code):  # (base, step, code) of v over the sub-groups: base = fp16(min), L steps to the max
        ok = torch.ones_like(v, dtype=torch.bool) if valid is None else valid.expand_as(v)
        lo = v.masked_fill(~ok, float("inf")).amin(sub_dim, keepdim=True).half()
        step = ((v.masked_fill(~ok, float("-inf")).amax(sub_dim, keepdim=True) - lo.float()) / L).half()
        code = round_code((v - lo.float()) / step.float()).nan_to_num_(0.0).clamp_(0, L).masked_fill_(~ok, 0)
        return lo, step, code.to(torch.uint8)

    m0, dm, cm = level(mn, torch.floor)
    m16 = _nested_value(m0, dm, cm)
    need = ((mx - m16.float()) / (2 ** bits - 1)).clamp_min(scale_eps)
    s0, ds, cs = level(need, torch.ceil)
    s16 = _nested_value(s0, ds, cs)
    base = torch.stack([m0, dm, s0, ds], -2)
    return encode(x, s16, m16, bits), cm | (cs << STAT_BITS), base


def _nested_value(base, step, code):
    return (base.float() + code.float() * step.float()).half()


def dequantize_nested(stat, base):
    """(scale, mn) fp16 [stat's shape] from stat uint8 [..., D] and base fp16 [..., 4, D] (broadcast): the exact
    values quantize_nested coded with."""
    m0, dm, s0, ds = base.unbind(-2)
    L = 2 ** STAT_BITS - 1
    return _nested_value(s0, ds, stat >> STAT_BITS), _nested_value(m0, dm, stat & L)


# -----------------------------------------------------------------------------
# keys in runs: one precision group's rows of a block cut into n runs of consecutive rows (tensor_split's: they differ
# by at most one row), each with its own channelwise (scale, mn). n = 1 is the paper's key quantizer, one pair per
# channel over the group; n > 1 is ZipCache's key groups (beyond the paper, ZipCacheConfig.k_group).

Runs = namedtuple("Runs", "local valid sizes")


def run_sizes(m, n, device=None):
    """Rows in each of tensor_split's n runs over m rows, [n]."""
    sizes = torch.full((n,), m // n, device=device)
    sizes[:m % n] += 1
    return sizes


def runs(m, n, device=None):
    """tensor_split's n runs of m consecutive rows, padded to the longest M = ceil(m / n): local [n, M] indices (a
    run's own rows, then copies of its first; an empty run points at the last row), valid [n, M] (which entries are
    its own), sizes [n]."""
    sizes = run_sizes(m, n, device)
    start = sizes.cumsum(0) - sizes
    r = torch.arange(-(-m // n), device=device)
    valid = r < sizes[:, None]
    local = torch.where(valid, start[:, None] + r, start[:, None]).clamp(max=max(m - 1, 0))
    return Runs(local, valid, sizes)


def quantize_runs(x, bits, n, pool=False, scale_eps=SCALE_EPS, nested=False):
    """Channelwise quantization of x [B, H, m, D] in n runs of consecutive rows: one (scale, mn) per channel and run,
    over the batch too if pool (Bs = 1, else B). All runs are quantized in one batched call: each is padded to the
    longest with copies of its own first row, which changes no min or max, so the numbers are those of each run
    alone. An empty run (m < n) has all-zero statistics, and m = 0 gives all-zero ones for every run.

    -> (codes uint8 [B, H, m, D], stats), stats = (scale, mn) fp16 [Bs, H, n, D], or with nested=True the nested
    form of quantize_nested: (stat uint8 [Bs, H, n, D], base fp16 [Bs, H, 1, 4, D]). The caller checks x is finite.
    """
    B, H, m, D = x.shape
    if m == 0:
        Bs = 1 if pool else B
        z = torch.zeros(Bs, H, n, D, dtype=torch.float16, device=x.device)
        stats = (z.to(torch.uint8), z.new_zeros(Bs, H, 1, 4, D)) if nested else (z, z.clone())
        return torch.zeros(B, H, 0, D, dtype=torch.uint8, device=x.device), stats
    r = runs(m, n, x.device)
    xr = x[:, :, r.local]                                                              # [B, H, n, M, D]
    dim = (0, 3) if pool else 3
    if nested:
        codes, stat, base = quantize_nested(xr, bits, dim, sub_dim=2, scale_eps=scale_eps,
                                            valid=(r.sizes > 0)[:, None, None])
        stats = stat[:, :, :, 0], base[:, :, :, 0]                                     # [Bs, H, n, D], [Bs, H, 1, 4, D]
    else:
        codes, scale, mn = quantize(xr, bits, dim, scale_eps, check=False)
        stats = tuple(s[:, :, :, 0].masked_fill((r.sizes == 0)[:, None], 0) for s in (scale, mn))  # [Bs, H, n, D]
    return codes[:, :, r.valid], stats                                                 # own rows, in order


# -----------------------------------------------------------------------------
# packing: planar along the last dim. With n = 8/bits parts of width D/n, byte j holds
# x[j] | x[j + D/n] << bits | x[j + 2D/n] << 2*bits | ...  For 4-bit: x[j] | x[j+D/2] << 4; for 2-bit the four
# D/4-wide quarters. This is the official bit order, applied per head row; the kernel unpacks whole quarter tiles.

def _check_pack(n_last, bits):
    _check_bits(bits, (2, 4, 8))
    parts = 8 // bits
    if n_last % parts:
        raise ValueError(f"cannot pack a last dim of {n_last} into {bits}-bit planar bytes: it must be a multiple "
                         f"of {parts}; use a head size divisible by 4")
    return parts


def pack(codes, bits):
    """uint8 codes [..., D] (values < 2^bits) -> uint8 [..., D*bits/8]."""
    parts = _check_pack(codes.shape[-1], bits)
    if parts == 1:
        return codes.to(torch.uint8).clone()
    c = codes.to(torch.uint8).unflatten(-1, (parts, -1))  # [..., parts, D/parts]
    out = c[..., 0, :].clone()
    for i in range(1, parts):
        out |= c[..., i, :] << (bits * i)
    return out


def unpack(packed, bits):
    """uint8 [..., W] -> uint8 codes [..., W*8/bits]; exact inverse of pack."""
    parts = _check_pack(8, bits)
    if parts == 1:
        return packed.clone()
    mask = 2 ** bits - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(parts)], dim=-1)


def pack_bits(bits):
    """0/1 uint8 [..., n] -> uint8 [..., ceil(n / 8)], bit i of byte j = entry 8j + i (a 1-bit mask, in order)."""
    bits = torch.nn.functional.pad(bits, (0, -bits.shape[-1] % 8)).unflatten(-1, (-1, 8))
    return (bits << torch.arange(8, device=bits.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed):
    """Inverse of pack_bits: uint8 [..., W] -> 0/1 uint8 [..., 8W]."""
    return ((packed[..., None] >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1).flatten(-2)


# -----------------------------------------------------------------------------
# fake quantization for quantization-aware training

def fake_quant(x, bits, dim, scale_eps=SCALE_EPS, ste=True):
    """dequantize(quantize(x)) in x's dtype, differentiable with a straight-through estimator (d x_hat / dx = 1).

    Computed in float (no uint8 round trip) with the same fp16 parameters as quantize(). With scale_eps=0 a constant
    group gives 0/0 = NaN, as the official code does; with the default epsilon it gives x_hat = mn exactly.
    """
    check_finite(x.detach(), "fake_quant input")
    scale, mn = quant_params(x.detach(), bits, dim, scale_eps)
    s, m = scale.float(), mn.float()
    xq = ((x.detach().float() - m) / s).round().clamp(0, 2 ** bits - 1) * s + m
    xq = xq.to(x.dtype)
    # ste: forward value exactly xq (x - x.detach() is exactly 0), gradient of the identity
    return xq + (x - x.detach()) if ste else xq


# -----------------------------------------------------------------------------
# granularities; x is [..., T, D]. Each returns what the cache stores; pair with dequantize / the
# matching dequantize_* helper.

def quantize_tokenwise(x, bits, scale_eps=SCALE_EPS):
    """One (scale, mn) per token over its D channels: scale, mn [..., T, 1]."""
    return quantize(x, bits, dim=-1, scale_eps=scale_eps)


def quantize_channelwise(x, bits, scale_eps=SCALE_EPS):
    """One (scale, mn) per channel over the T tokens: scale, mn [..., 1, D]. ZipCache/KIVI keys."""
    return quantize(x, bits, dim=-2, scale_eps=scale_eps)


def quantize_groupwise(x, bits, group=32, dim=-1, scale_eps=SCALE_EPS):
    """One (scale, mn) per `group` consecutive entries along `dim` (-1: channels of a token, -2: tokens of a channel).

    codes keep x's shape; scale, mn have `dim` split into (n_groups, 1), e.g. [..., T, D/group, 1] for dim=-1.
    """
    d = dim % x.dim()
    if x.shape[d] % group:
        raise ValueError(f"groupwise quantization: size {x.shape[d]} along dim {dim} is not a multiple of the "
                         f"group size {group}; pick a group that divides it")
    codes, scale, mn = quantize(x.unflatten(d, (-1, group)), bits, dim=d + 1, scale_eps=scale_eps)
    return codes.flatten(d, d + 1), scale, mn


def dequantize_groupwise(codes, scale, mn, group=32, dim=-1, dtype=torch.float32):
    d = dim % codes.dim()
    return dequantize(codes.unflatten(d, (-1, group)), scale, mn, dtype).flatten(d, d + 1)


def cst_normalizer(x, scale_eps=SCALE_EPS, dim=-2):
    """Channel normalizer of CST: c = sqrt(max_t |x|) over the tokens (dim; (0, -2) also pools
    over the batch), clamped to >= scale_eps, fp16 [..., 1, D]."""
    return x.float().abs().amax(dim=dim, keepdim=True).sqrt().clamp_min(scale_eps).half()


def quantize_cst(x, bits, token_dims=(-1,), scale_eps=SCALE_EPS, chan=None, check=True):
    """Channel-separable tokenwise quantization (ZipCache values):
    c = sqrt(max_t |x|) per channel, then asymmetric tokenwise quantization of x / c.

    token_dims: dims one (scale, mn) pair spans; (-1,) = per (token, head), (1, -1) on [B, H, T, D] = one pair per
    row over all heads (the official "row" scope). Pass `chan` to reuse a normalizer computed over a larger set.
    Returns (codes, scale, mn, chan); x_hat = chan * (codes*scale + mn).
    """
    if check:
        check_finite(x, "quantize input")
    if chan is None:
        chan = cst_normalizer(x, scale_eps)
    xn = x.float() / chan.float()
    if scale_eps == 0:  # c == 0 only then, for an all-zero channel: 0/0 -> store 0 there (exact)
        xn = torch.nan_to_num_(xn, nan=0.0)
    codes, scale, mn = quantize(xn, bits, dim=token_dims, scale_eps=scale_eps, check=False)
    return codes, scale, mn, chan


def dequantize_cst(codes, scale, mn, chan, dtype=torch.float32):
    ct = torch.promote_types(dtype, torch.float32)
    return (chan.to(ct) * dequantize(codes, scale, mn, ct)).to(dtype)
