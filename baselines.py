"""
The baselines ZipCache is compared with, behind the same `attend` interface as cache.py's caches (one small class
per method, built on cache.py's storage and `Cache` base):

    KIVICache         2/4-bit: keys per channel in groups of G tokens, values per token, an fp16 residual window
    H2OCache          heavy hitters + a recent window, everything else evicted (H2O)
    MiKVCache         mixed 4/2-bit per token, saliency from accumulated attention of the full matrix (MiKV)
    SimQuantCache     simulated quantization at one granularity (the paper's Table 1 ablation, eval.py)
    OfficialZipCache  ZipCache as the official code runs it (--official): whole-cache re-quantization, last-query
                      decode scores, score-ordered regular rows

make_cache (generate.py) builds them by name: `make_cache("kivi", config, bits=2)`.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import quant
import saliency
from cache import OFFICIAL_SWITCHES, Cache, DenseCache, DenseState, LayerState, Store, ZipCache, _bits_shorthand, \
    _check_bits, _check_pack_dim, _check_ratio, _gather_tokens, _stores_nbytes


def _attention(q, K, V, mask=None):
    """Explicit fp32 attention: q [B, H, T, D], K/V [B, H_kv, n, D], mask broadcastable to [B, H, T, n] (True =
    visible) -> (out [B, H, T, D] fp32, p [B, H, T, n]). The eager baseline path; p feeds accumulated scores."""
    g = q.shape[1] // K.shape[1]
    K, V = K.float().repeat_interleave(g, 1), V.float().repeat_interleave(g, 1)
    s = q.float() @ K.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1)
    return p @ V, p


# -----------------------------------------------------------------------------
# KIVI

@dataclass(kw_only=True)
class KIVIState(LayerState):
    """kq: k_codes [B, H, CAP, D*bits/8] (quantized keys, whole groups of G tokens); kp: k_scale, k_min
    [B, H, CAP/G, D] fp16; kf: k [B, H, CAP, D] fp16 (keys waiting for a full residual); vq: v_codes, v_scale, v_min
    (per token, groups of G channels); vf: v [B, H, CAP, D] fp16 (the sliding window of the newest values)."""
    kq: Store = field(default_factory=Store)
    kp: Store = field(default_factory=Store)
    kf: Store = field(default_factory=Store)
    vq: Store = field(default_factory=Store)
    vf: Store = field(default_factory=Store)

    def nbytes(self, allocated=False):
        return _stores_nbytes((self.kq, self.kp, self.kf, self.vq, self.vf), allocated) + 8


class KIVICache(Cache):
    """KIVI: keys quantized per channel in groups of G tokens, values per token in groups of G channels.

    Keys wait in fp16 until R have accumulated, then are quantized as one chunk (old codes untouched); values keep a
    sliding fp16 window of the R newest, and each step quantizes the one that leaves it. Decode attention
    dequantizes, then runs SDPA (KIVI's fused kernels are a CUDA affair).
    """
    name = "kivi"
    options = ("bits", "group", "residual")

    def __init__(self, config, bits=2, group=32, residual=128):
        _check_bits("bits", bits)
        D = config.head_dim
        if group < 1 or residual < 1:
            raise ValueError(f"KIVI group={group} and residual={residual} must be at least 1 (default 32 and 128)")
        self.bits, self.G, self.R = bits, group, residual
        self.quantized = bits < 16
        if self.quantized:
            _check_pack_dim(D, (bits,))
            if residual % group or residual < group:
                raise ValueError(f"KIVI residual={residual} must be a positive multiple of group={group}")
            if D % group:
                raise ValueError(f"KIVI groups of {group} channels cannot split head_dim={D}; pass group= a divisor")
        super().__init__(config)

    def info(self):
        return f"kivi {self.bits}-bit, group {self.G}, residual {self.R}"

    def _quant_keys(self, st, k):  # k [B, H, n, D], n a multiple of G
        if k.shape[2]:
            codes, s, m = quant.quantize_groupwise(k, self.bits, self.G, dim=-2)          # s [B, H, n/G, 1, D]
            st.kq.append(k_codes=quant.pack(codes, self.bits))
            st.kp.append(k_scale=s[..., 0, :], k_min=m[..., 0, :])                        # [B, H, n/G, D]

    def _quant_values(self, st, v):
        if v.shape[2]:
            codes, s, m = quant.quantize_groupwise(v, self.bits, self.G, dim=-1)          # s [B, H, n, D/G, 1]
            st.vq.append(v_codes=quant.pack(codes, self.bits), v_scale=s[..., 0], v_min=m[..., 0])

    def _prefill(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        L = k.shape[2]
        st = KIVIState()
        nk, nv = (L - L % self.R, max(0, L - self.R)) if self.quantized else (0, 0)
        self._quant_keys(st, k[:, :, :nk])
        self._quant_values(st, v[:, :, :nv])
        st.kf.append(min_cap=self.R, k=k[:, :, nk:].half())
        st.vf.append(min_cap=self.R + 1, v=v[:, :, nv:].half())
        return st, out

    def kv(self, layer):
        """(K̂, V̂) fp32 [B, H_kv, L, D] in position order: dequantized part, then the fp16 part."""
        st, G = self.layers[layer], self.G
        K, V = [], []
        if st.kq.n:
            x = quant.unpack(st.kq["k_codes"], self.bits)
            K.append(quant.dequantize_groupwise(x, st.kp["k_scale"][..., None, :], st.kp["k_min"][..., None, :],
                                                G, dim=-2))
        if st.vq.n:
            y = quant.unpack(st.vq["v_codes"], self.bits)
            V.append(quant.dequantize_groupwise(y, st.vq["v_scale"][..., None], st.vq["v_min"][..., None], G))
        K.append(st.kf["k"].float())
        V.append(st.vf["v"].float())
        return torch.cat(K, 2), torch.cat(V, 2)

    def _decode(self, layer, st, q, k, v):
        st.kf.append(k=k.half())
        st.vf.append(v=v.half())
        K, V = self.kv(layer)
        out = F.scaled_dot_product_attention(q, K.to(q.dtype), V.to(q.dtype), enable_gqa=True)
        if self.quantized:
            if st.kf.n == self.R:  # a full residual of keys becomes one quantized chunk
                self._quant_keys(st, st.kf["k"])
                st.kf.n = 0
            if st.vf.n > self.R:   # the oldest value leaves the window
                self._quant_values(st, st.vf["v"][:, :, :1])
                st.vf.drop_front(1)
        return out

    def _held(self, st):
        return st.seen

    def _paper_terms(self, st):
        B, H, D = self.shape
        e = B * H * D * (st.kq.n + st.vq.n)
        par = (2 * st.kp["k_scale"].numel() if st.kp.n else 0) + (2 * st.vq["v_scale"].numel() if st.vq.n else 0)
        return e, e * self.bits, par


# -----------------------------------------------------------------------------
# H2O

@dataclass(kw_only=True)
class H2OState(LayerState):
    """slots: k, v [B, H, hh + rec + 1, D] fp16, score [B, H, hh + rec + 1] fp32 (accumulated attention), posn
    [B, H, hh + rec + 1] int32 (the position held, -1 = free)."""
    slots: Store = field(default_factory=Store)

    def nbytes(self, allocated=False):
        return self.slots.nbytes(allocated) + 8


class H2OCache(Cache):
    """Heavy-hitter oracle: keep the rec newest tokens plus the hh with the largest accumulated attention, evict the
    rest for good. hh = floor(heavy_ratio * L), rec = floor(recent_ratio * L), fixed at the prefill; slots
    [B, H_kv, hh + rec + 1, D] with an int32 position each (-1 = free). heavy + recent >= 1 never evicts."""
    name = "h2o"
    options = ("heavy_ratio", "recent_ratio", "keep_ratio")

    def __init__(self, config, heavy_ratio=0.1, recent_ratio=0.1):
        _check_ratio("heavy_ratio", heavy_ratio)
        _check_ratio("recent_ratio", recent_ratio)
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio
        self.unbounded = heavy_ratio + recent_ratio >= 1.0
        super().__init__(config)

    @classmethod
    def from_options(cls, config, keep_ratio=None, **opts):
        """keep_ratio: the fraction of tokens kept, half heavy hitters and half recent ones."""
        if keep_ratio is not None:
            _check_ratio("keep_ratio", keep_ratio)
            if keep_ratio == 0:
                raise ValueError("keep_ratio=0 keeps no tokens at all; use a fraction in (0, 1], e.g. 0.2")
            opts["heavy_ratio"] = opts["recent_ratio"] = keep_ratio / 2
        return cls(config, **opts)

    def reset(self):
        super().reset()
        self.budget = None  # (hh, rec), fixed by the first prefill

    def info(self):
        return f"h2o heavy {self.heavy_ratio:.0%} + recent {self.recent_ratio:.0%}"

    def _prefill(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        B, H, L, D = k.shape
        hh, rec = math.floor(self.heavy_ratio * L), math.floor(self.recent_ratio * L)
        if not self.unbounded and hh + rec == 0:  # a zero budget would evict every token, the prompt included
            raise ValueError(f"h2o keeps floor(ratio x {L} prompt tokens) = 0 tokens at heavy_ratio="
                             f"{self.heavy_ratio:g}, recent_ratio={self.recent_ratio:g}; raise --keep_ratio (at least "
                             f"{2 / L:.2g} for this prompt) or use a longer prompt")
        self.budget = self.budget or (hh, rec)
        # accumulated attention over every prompt row (materialized, one KV-head group at a time)
        scores = saliency.probe_scores(q, k, torch.arange(L), "accumulated")             # [B, H_kv, L]
        if self.unbounded or hh + rec >= L:
            keep = torch.arange(L, device=k.device).expand(B, H, L)
        else:
            top = scores[..., :L - rec].topk(hh, dim=-1).indices.sort(-1).values
            keep = torch.cat([top, torch.arange(L - rec, L, device=k.device).expand(B, H, rec)], -1)
        st = H2OState()
        st.slots.append(min_cap=hh + rec + 1, k=_gather_tokens(k, keep).half(), v=_gather_tokens(v, keep).half(),
                        score=torch.gather(scores, 2, keep), posn=keep.to(torch.int32))
        st.slots.full["posn"][:, :, st.slots.n:] = -1                                       # free slots
        return st, out

    def _decode(self, layer, st, q, k, v):
        t = st.seen  # position of the new token
        s = st.slots
        if self.unbounded:
            s.append(k=k.half(), v=v.half(), score=k.new_zeros(k.shape[:3], dtype=torch.float32),
                     posn=torch.full(k.shape[:3], t, dtype=torch.int32, device=k.device))
        else:  # write into the free slot (the one holding position -1)
            free = s.full["posn"].argmin(-1, keepdim=True)                                  # [B, H_kv, 1]
            s.full["k"].scatter_(2, free[..., None].expand_as(k), k.half())
            s.full["v"].scatter_(2, free[..., None].expand_as(v), v.half())
            s.full["score"].scatter_(2, free, 0.0)
            s.full["posn"].scatter_(2, free, t)
            s.n += 1
        width, valid = self._valid(s)                                                    # [B, H_kv, S]
        K, V, posn = s.full["k"][:, :, :width], s.full["v"][:, :, :width], s.full["posn"][:, :, :width]
        g = q.shape[1] // k.shape[1]
        out, p = _attention(q, K, V, valid.repeat_interleave(g, 1)[:, :, None, :])
        s.full["score"][:, :, :width] += saliency.group_sum(p[:, :, 0], k.shape[1])         # accumulated attention
        hh, rec = self.budget
        if not self.unbounded and s.n > hh + rec:  # evict the lowest score among the non-recent tokens
            cand = valid & (posn < t + 1 - rec)
            e = s.full["score"][:, :, :width].masked_fill(~cand, float("inf")).argmin(-1, keepdim=True)
            s.full["posn"].scatter_(2, e, -1)
            s.n -= 1
        return out.to(q.dtype)

    def _valid(self, s):
        width = s.n if self.unbounded else s.full["posn"].shape[2]  # bounded: every slot, the free one masked
        return width, s.full["posn"][:, :, :width] >= 0

    def kept_positions(self, layer):
        """int32 [B, H_kv, n] positions currently held, in slot order."""
        s = self.layers[layer].slots
        width, valid = self._valid(s)
        return s.full["posn"][:, :, :width][valid].view(*valid.shape[:2], -1)

    def kv(self, layer):
        """(K, V) fp32 [B, H_kv, n, D] of the kept tokens (slot order)."""
        s = self.layers[layer].slots
        width, valid = self._valid(s)
        B, H = valid.shape[:2]
        K = s.full["k"][:, :, :width][valid].view(B, H, -1, s.full["k"].shape[-1]).float()
        V = s.full["v"][:, :, :width][valid].view(B, H, -1, s.full["v"].shape[-1]).float()
        return K, V

    def _held(self, st):
        return st.slots.n

    def _paper_terms(self, st):
        # eviction as "compression": tokens seen over tokens kept, in fp16 (scores and positions ignored)
        B, H, D = self.shape
        return 2 * B * H * D * st.seen, 16 * 2 * B * H * D * st.slots.n, 0


# -----------------------------------------------------------------------------
# MiKV

@dataclass(kw_only=True)
class MiKVState(LayerState):
    """hi, lo: k_codes, v_codes [B, H, CAP, D*bits/8], k_scale, k_min, v_scale, v_min [B, H, CAP] fp16 (per token);
    buf: k, v [B, H, CAP, D] fp16 and acc [B, H, CAP] fp32 (decode tokens not yet quantized)."""
    hi: Store = field(default_factory=Store)
    lo: Store = field(default_factory=Store)
    buf: Store = field(default_factory=Store)

    def nbytes(self, allocated=False):
        return _stores_nbytes((self.hi, self.lo, self.buf), allocated) + 8


class MiKVCache(Cache):
    """MiKV: accumulated attention from the full prefill matrix picks the salient tokens (plus the recent ones);
    K and V are quantized per token at high_bits (salient) / low_bits. Decode is eager: every step dequantizes the whole
    cache and materializes the attention row; every recompress_every steps the fp16 buffer is split by the attention its
    tokens accumulated and quantized. Nothing is ever re-classified. (The optional channel balancer is not built.)"""
    name = "mikv"
    options = ("salient_ratio", "recent_ratio", "bits", "high_bits", "low_bits", "recompress_every")

    @classmethod
    def from_options(cls, config, bits=None, **opts):
        """bits: both precision groups."""
        return cls(config, **_bits_shorthand(opts, bits))

    def __init__(self, config, salient_ratio=0.6, recent_ratio=0.1, high_bits=4, low_bits=2,
                 recompress_every=100):
        _check_ratio("salient_ratio", salient_ratio)
        _check_ratio("recent_ratio", recent_ratio)
        _check_bits("high_bits", high_bits)
        _check_bits("low_bits", low_bits)
        if (high_bits == 16) != (low_bits == 16):
            raise ValueError("MiKV: 16 bits means 'not quantized'; set both bits to 16 or both below")
        _check_pack_dim(config.head_dim, (high_bits, low_bits))
        if recompress_every < 1:
            raise ValueError(f"recompress_every={recompress_every} must be >= 1")
        self.r, self.recent_ratio, self.bits, self.N = salient_ratio, recent_ratio, dict(hi=high_bits, lo=low_bits), \
            recompress_every
        self.quantized = high_bits < 16
        super().__init__(config)

    def info(self):
        return f"mikv {self.bits['hi']}/{self.bits['lo']}-bit, {self.r:.0%} salient, recent {self.recent_ratio:.0%}"

    def _groups(self, st):
        return (st.hi, self.bits["hi"]), (st.lo, self.bits["lo"])

    def _append(self, st, k, v, hi, lo):
        for (store, bits), idx in zip(self._groups(st), (hi, lo)):
            if idx.shape[-1] == 0:
                continue
            kc, ks, km = quant.quantize(_gather_tokens(k, idx), bits, dim=-1)          # per token: s [B, H, m, 1]
            vc, vs, vm = quant.quantize(_gather_tokens(v, idx), bits, dim=-1)
            store.append(k_codes=quant.pack(kc, bits), v_codes=quant.pack(vc, bits),
                                  k_scale=ks[..., 0], k_min=km[..., 0], v_scale=vs[..., 0], v_min=vm[..., 0])

    def _prefill(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        B, H, L, D = k.shape
        st = MiKVState()
        if not self.quantized:
            st.buf.append(min_cap=L + self.N, k=k.half(), v=v.half())
            return st, out
        scores = saliency.probe_scores(q, k, torch.arange(L), "accumulated")             # the full matrix
        scores[..., L - math.floor(self.recent_ratio * L):] = float("inf")              # recent tokens are salient
        hi, lo = saliency.split(scores, self.r)
        self._append(st, k.float(), v.float(), hi, lo)
        st.buf.append(min_cap=self.N, k=k.new_zeros(B, H, 0, D, dtype=torch.float16),
                      v=k.new_zeros(B, H, 0, D, dtype=torch.float16), acc=k.new_zeros(B, H, 0, dtype=torch.float32))
        return st, out

    def kv(self, layer):
        """(K̂, V̂) fp32 [B, H_kv, n, D]: hi | lo | fp16 buffer."""
        st = self.layers[layer]
        K, V = [], []
        for s, bits in self._groups(st):
            if s.n:
                K.append(quant.dequantize(quant.unpack(s["k_codes"], bits), s["k_scale"][..., None],
                                          s["k_min"][..., None]))
                V.append(quant.dequantize(quant.unpack(s["v_codes"], bits), s["v_scale"][..., None],
                                          s["v_min"][..., None]))
        K.append(st.buf["k"].float())
        V.append(st.buf["v"].float())
        return torch.cat(K, 2), torch.cat(V, 2)

    def _decode(self, layer, st, q, k, v):
        extra = {"acc": k.new_zeros(k.shape[:3], dtype=torch.float32)} if "acc" in st.buf.full else {}
        st.buf.append(k=k.half(), v=v.half(), **extra)
        K, V = self.kv(layer)
        out, p = _attention(q, K, V)                                                     # eager: p [B, H, 1, n]
        if self.quantized:
            n = st.buf.n
            st.buf["acc"].add_(saliency.group_sum(p[:, :, 0, -n:], k.shape[1]))
            if n == self.N:  # flush: split the buffer by the attention it accumulated
                hi, lo = saliency.split(st.buf["acc"], self.r)
                self._append(st, st.buf["k"].float(), st.buf["v"].float(), hi, lo)
                st.buf.n = 0
        return out.to(q.dtype)

    def _held(self, st):
        return st.seen

    def _paper_terms(self, st):
        qel = bits = par = 0
        for s, b in self._groups(st):
            if s.n:
                e = 2 * s["k_codes"].shape[0] * s["k_codes"].shape[1] * s.n * self.shape[2]
                qel, bits, par = qel + e, bits + e * b, par + 4 * s["k_scale"].numel()
        return qel, bits, par


# -----------------------------------------------------------------------------
# simulated quantization at a chosen granularity (the Table 1 ablation)

GRANULARITIES = ("groupwise", "tokenwise", "channelwise", "cst")


def fake_quantize(x, bits, gran, group=32):
    """x [B, H, T, D] -> dequantize(quantize(x)) at one granularity (quant.py), and the number of fp16 parameters."""
    B, H, T, D = x.shape
    if gran == "groupwise":       # 32 consecutive channels of one token
        c, s, m = quant.quantize_groupwise(x, bits, group=group, dim=-1)
        return quant.dequantize_groupwise(c, s, m, group=group, dim=-1), 2 * B * H * T * (D // group)
    if gran == "tokenwise":       # one pair per token over its D channels
        c, s, m = quant.quantize_tokenwise(x, bits)
        return quant.dequantize(c, s, m), 2 * B * H * T
    if gran == "channelwise":     # one pair per channel over the tokens
        c, s, m = quant.quantize_channelwise(x, bits)
        return quant.dequantize(c, s, m), 2 * B * H * D
    if gran == "cst":             # channel normalizer, then one pair per token (ZipCache values)
        c, s, m, chan = quant.quantize_cst(x, bits)
        return quant.dequantize_cst(c, s, m, chan), B * H * D + 2 * B * H * T
    raise ValueError(f"granularity {gran!r} is unknown; use one of {GRANULARITIES}")


@dataclass(kw_only=True)
class SimQuantState(DenseState):
    """A DenseState (the dequantized prompt) + n_el quantized elements and n_par fp16 parameters, for the ratio."""
    n_el: int = 0
    n_par: int = 0

    def nbytes(self, allocated=False):
        return super().nbytes(allocated) + 16


class SimQuantCache(DenseCache):
    """*Simulated* quantization for the granularity ablation (paper Table 1): the prompt's K and V are quantized at
    `bits` with the given granularities and kept dequantized in fp16; decode tokens stay fp16. It isolates the
    quantizer's error from storage, so its ratio is the paper formula over the parameter count (no real bytes)."""
    name = "simquant"
    options = ("bits", "k_gran", "v_gran")

    def __init__(self, config, bits=4, k_gran="channelwise", v_gran="cst"):
        for g in (k_gran, v_gran):
            if g not in GRANULARITIES:
                raise ValueError(f"granularity {g!r} is unknown; use one of {GRANULARITIES}")
        self.bits, self.k_gran, self.v_gran = bits, k_gran, v_gran
        super().__init__(config)

    def _prefill(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        kh, pk = fake_quantize(k, self.bits, self.k_gran)
        vh, pv = fake_quantize(v, self.bits, self.v_gran)
        dense, _ = super()._prefill(layer, q, kh.to(k.dtype), vh.to(v.dtype))
        return SimQuantState(kv=dense.kv, n_el=2 * k.numel(), n_par=pk + pv), out

    def ratios(self):
        st = [s for s in self.layers if s is not None]
        el, par = sum(s.n_el for s in st), sum(s.n_par for s in st)
        return dict(real=float("nan"), paper=16 * el / (self.bits * el + 16 * par))


# -----------------------------------------------------------------------------
# ZipCache as the official code runs it

class OfficialZipCache(ZipCache):
    """ZipCache with the official code's behaviour where it changes numbers, each switched by its config field
    (ZipCacheConfig.official() sets all three; OFFICIAL_SWITCHES lists ours):

        requantize=True             a flush merges the new block with the dequantized cache and re-quantizes each
                                    precision group whole, as one block (ours: every block keeps its own statistics)
        decode_score="last_query"   a flushed block is split by the attention of its last decode query alone (ours:
                                    the normalized attention of all its decode queries; the buffer has no acc column)
        lo_order="score"            the regular rows of a block in ascending score order, as the official top-k
                                    returns them (ours: by position); it changes numbers only with v_token_scope="row"
                                    and H_kv > 1, where a value row spans all KV heads
    """
    official_code = True

    @staticmethod
    def wanted(opts):
        """Whether make_cache's options for "zipcache" ask for this class: official=True, or an official switch."""
        return bool(opts.get("official")) or any(opts.get(k, ours) != ours for k, ours in OFFICIAL_SWITCHES.items())

    def _split(self, scores):
        hi, lo = super()._split(scores)
        if self.cfg.lo_order == "score":
            lo = lo.gather(-1, scores.gather(-1, lo).sort(dim=-1, stable=True).indices)
        return hi, lo

    def _score_rows(self, B, H, n, device):
        return super()._score_rows(B, H, n, device) if self.cfg.decode_score == "normalized" else {}

    def _decode_scores(self, st, q1, lse, full):
        if self.cfg.decode_score == "normalized":
            return super()._decode_scores(st, q1, lse, full)
        if full:   # the last query's attention over the rows past the sinks
            return saliency.decode_probabilities(q1, st.buf["k"], lse)[..., st.n_sink or 0:]
        return None

    def _append_block(self, st, k, v, hi, lo):
        """requantize: after the prompt's block, dequantize the cache, append the new block's raw fp16 tokens k, v
        [B, H, N, D] to each precision group (hi/lo indices into the block), and quantize each merged group once."""
        if not self.cfg.requantize or st.parent.n == 0:
            return super()._append_block(st, k, v, hi, lo)
        (Kh, Vh), (Kl, Vl) = self._dequantized(st)
        kf, vf = k.float(), v.float()
        K = torch.cat([Kh, _gather_tokens(kf, hi), Kl, _gather_tokens(kf, lo)], 2)      # [B, H, n_all, D]
        V = torch.cat([Vh, _gather_tokens(vf, hi), Vl, _gather_tokens(vf, lo)], 2)
        B, H, n, D = K.shape
        nh = Kh.shape[2] + hi.shape[-1]
        new = self._new_state(B, K.device)
        idx = torch.arange(n, device=K.device).expand(B, H, -1)
        super()._append_block(new, K, V, idx[..., :nh], idx[..., nh:])
        st.hi, st.lo, st.v_chan, st.parent = new.hi, new.lo, new.v_chan, new.parent
