"""
KV caches behind one interface (the model knows nothing else):

    out = cache.attend(layer, q, k, v)    q [B, H, T, D], k/v [B, H_kv, T, D] (RoPE applied) -> out [B, H, T, D]
    cache.pos                             the position of the next token (tokens processed)
    len(cache)                            tokens held (fewer than pos when a cache evicts, as H2O does)
    cache.nbytes(), cache.ratios(), cache.reset(), cache.info()
    cache.set_padding(pad)                before the prefill of a left-padded (ragged) batch: DenseCache, ZipCache

Prefill and decode. The first attend on an empty layer is the prefill (T = prompt length): every cache returns
exactly causal SDPA's output on the unquantized q, k, v, and then compresses what it keeps. Later calls are decode
steps (T = 1), answered from what was kept.

This file, in reading order:
    storage         Store (named tensors that grow along one axis), the typed per-layer states
    Cache           the interface above: validation, prefill/decode dispatch, bytes and ratios
    DenseCache      fp16 K/V, the reference
    ZipCache        mixed 4/2-bit, saliency from probe queries, channelwise K, CST V, fused decode (ZipCacheConfig)
    PerSequence     a ragged batch as B single-sequence caches (ZipCache's)

Elsewhere: the baselines (KIVI, H2O, MiKV, SimQuant, OfficialZipCache) in baselines.py, the caches of the
cross-layer and latent attention variants (CLACache, LatentCache) in latent.py, and make_cache, a cache by name, in
generate.py.

Real bytes: codes are packed uint8, parameters fp16, and nbytes() counts every stored tensor (used part) plus 8 B
per integer counter. Storage grows by doubling; the spare capacity is never read.
"""
import math
from dataclasses import dataclass, field, fields, replace
from functools import partial

import torch
import torch.nn.functional as F

import decode_kernel
import quant
import saliency

BITS = (2, 4, 8, 16)  # 16 = not quantized (kept fp16)


# -----------------------------------------------------------------------------
# small shared helpers

def _check_bits(name, bits):
    if bits not in BITS:
        raise ValueError(f"{name}={bits} is not supported; use one of {BITS} (16 = keep fp16)")


def _check_ratio(name, r):
    if not (0.0 <= r <= 1.0):
        raise ValueError(f"{name}={r} must be a fraction in [0, 1]")


def _check_pack_dim(D, bits_list):
    if any(b < 16 for b in bits_list) and D % 4:
        raise ValueError(f"head_dim={D} cannot be split into the 4 planar quarters of 2/4-bit packing "
                         f"; use a head size divisible by 4, or --cache dense")


def _bits_shorthand(opts, bits):
    """make_cache's `bits`: both precision groups at once (ZipCache, MiKV); given with high_bits or low_bits, it is
    an error, as one would silently overwrite the other."""
    if bits is None:
        return opts
    both = [f"{k}={opts[k]}" for k in ("high_bits", "low_bits") if k in opts]
    if both:
        raise ValueError(f"bits={bits} sets both groups and conflicts with {', '.join(both)}; pass either "
                         f"bits or high_bits/low_bits")
    return dict(opts, high_bits=bits, low_bits=bits)


def check_prompt_lengths(lengths, cache=None):
    """A batch of unequal-length prompts needs a cache with a padding mask (cache.ragged: DenseCache, ZipCache)."""
    lengths = [int(n) for n in lengths]
    if len(set(lengths)) > 1 and not getattr(cache, "ragged", False):
        name = getattr(cache, "name", "this cache")
        raise ValueError(f"prompts of unequal lengths {sorted(set(lengths))} in one batch are not supported by "
                         f"--cache {name} (no padding mask); use --cache dense or zipcache, batch prompts of equal "
                         f"length, or run them one at a time")


def _pad_mask(pad, T, n, device):
    """Attention mask of a left-padded batch, [B, 1, T, n] (True = visible): query i of a T-token chunk sits at
    position n - T + i and sees keys j <= n - T + i that are not padding (j >= pad[b]). A padded query sees only
    itself, so its softmax row stays finite (its output is never used)."""
    j = torch.arange(n, device=device)                                                   # [n]
    i = torch.arange(n - T, n, device=device)[:, None]                                   # [T, 1]
    real = j >= pad.to(device)[:, None, None, None]                                      # [B, 1, 1, n]
    return (j <= i) & (real | (j == i))                                                  # [B, 1, T, n]


def _causal_tail_mask(T, n, device):
    """Query i of a T-token chunk sits at position n - T + i and sees keys j <= n - T + i. None when T == 1."""
    if T == 1:
        return None
    return torch.arange(n, device=device)[None, :] <= torch.arange(n - T, n, device=device)[:, None]   # [T, n]


def _gather_tokens(x, idx):
    """x [B, H, L, D], idx [B, H, n] -> x at those token positions, [B, H, n, D]."""
    B, H = idx.shape[:2]
    bh = torch.arange(B * H, device=x.device)[:, None]
    return x.flatten(0, 1)[bh, idx.flatten(0, 1)].view(B, H, idx.shape[-1], x.shape[-1])  # row copies, not gather


# -----------------------------------------------------------------------------
# storage: growing tensors, and the typed per-layer states that hold them

class Store:
    """Named tensors that share one growing axis: 2 for token rows [B, H, CAP, ...], 1 for per-block parameters,
    row tables and a latent's rows [B, CAP, ...]. The first n entries along it are used:

        store["k"]        the used part, n entries: what every reader of the cache sees
        store.full["k"]   the whole buffer, CAP >= n entries: only the decode kernel reads it (with n beside it),
                          so that a growing cache hands it the same storage every step; entries past n are garbage

    When full, the capacity doubles and the used part is copied. Used bytes scale with n."""
    __slots__ = ("axis", "__dict__")   # the axis is layout, not state: a slot, outside what a walk of vars() sees

    def __init__(self, axis=2):
        self.axis, self.n, self.full = axis, 0, {}

    def __getitem__(self, name):
        return self.full[name].narrow(self.axis, 0, self.n)

    def append(self, min_cap=1, **chunks):
        """Write equal-length chunks after the used part, growing every tensor of the store together."""
        m = next(iter(chunks.values())).shape[self.axis]
        need = self.n + m
        for name, c in chunks.items():
            t = self.full.get(name)
            if t is None or t.shape[self.axis] < need:
                cap = max(need, min_cap) if t is None else max(need, 2 * t.shape[self.axis])
                shape = list(c.shape)
                shape[self.axis] = cap
                new = torch.zeros(shape, dtype=c.dtype, device=c.device)
                if t is not None:
                    new.narrow(self.axis, 0, self.n).copy_(t.narrow(self.axis, 0, self.n))
                self.full[name] = t = new
            t.narrow(self.axis, self.n, m).copy_(c)
        self.n = need

    def drop_front(self, m):
        """Forget the m oldest entries (a sliding window), shifting the rest to the front."""
        for t in self.full.values():
            t.narrow(self.axis, 0, self.n - m).copy_(t.narrow(self.axis, m, self.n - m).clone())
        self.n -= m

    def nbytes(self, allocated=False):
        """Bytes of the used part (allocated=True: the capacity) of every tensor, + 8 B for the counter n."""
        total = 0
        for t in self.full.values():
            per = t.numel() // max(1, t.shape[self.axis]) * t.element_size()
            total += per * (t.shape[self.axis] if allocated else self.n)
        return total + 8


def _stores_nbytes(stores, allocated):
    return sum(s.nbytes(allocated) for s in stores if s is not None)


@dataclass(kw_only=True)
class LayerState:
    """What every cache keeps per layer: seen = tokens processed by the layer (the RoPE position of its next token).
    A state holds tensors, stores and integer counters only, never configuration; nbytes() counts each of them."""
    seen: int = 0

    def nbytes(self, allocated=False):
        return 8                                                    # the counter seen


@dataclass(kw_only=True)
class DenseState(LayerState):
    kv: Store = field(default_factory=Store)                        # k, v [B, H_kv, CAP, D]

    def nbytes(self, allocated=False):
        return self.kv.nbytes(allocated) + 8


# -----------------------------------------------------------------------------
# the interface

class Cache:
    """Base class: validation, prefill/decode dispatch, pos/len/nbytes/ratios. Subclasses implement _prefill (returns
    (state, out)), _decode (returns out), _held (tokens kept), and optionally _paper_terms."""
    name = "cache"
    multi_token_decode = False  # only DenseCache accepts T > 1 chunks after the prefill
    ragged = False              # accepts a left-padded batch (set_padding): DenseCache masks the padding, ZipCache
                                # holds each sequence in a cache of its own (PerSequence)
    options = ()                # the options make_cache (generate.py) passes on to from_options

    @classmethod
    def from_options(cls, config, **opts):
        """The cache from make_cache's options (checked against cls.options): its constructor's arguments, unless a
        class has shorthands of its own."""
        return cls(config, **opts)

    def __init__(self, config):
        self.config = config
        self.n_layers = config.n_layers
        self.max_seq_len = config.max_seq_len
        self.validate = True  # check K/V for NaN/Inf (one host sync per layer and step)
        self.reset()

    def reset(self):
        self.layers = [None] * self.n_layers
        self.shape = None  # (B, H_kv, D), learned at the first attend
        self.pad = None    # [B] left-pad tokens per sequence, or None (no padding); see set_padding
        self.subs = None   # a ragged batch held as B single-sequence caches (PerSequence), or None

    def set_padding(self, pad):
        """Declare a left-padded (ragged) batch before the prefill: pad[b] = padding tokens in front of sequence b.

        The model reads cache.pad to start each sequence's RoPE positions at 0 at its first real token (a padded
        sequence gets the logits it gets alone); the cache keeps padded keys out of every attention, score and byte
        count. All-zero padding is the same as none."""
        if not self.ragged:
            raise ValueError(f"{self.name}: ragged batches (left-padded prompts) are not supported (no padding "
                             f"mask); batch prompts of equal length, or use --cache dense or zipcache")
        if any(s is not None for s in self.layers):
            raise ValueError(f"{self.name}: set_padding after the prefill; call cache.reset() and set it before")
        pad = torch.as_tensor(pad, dtype=torch.long).flatten()
        if (pad < 0).any():
            raise ValueError(f"{self.name}: negative padding {pad.tolist()}; pad[b] counts tokens in front of b")
        self.pad = pad if pad.any() else None

    @property
    def pos(self):
        """Tokens fully processed = RoPE position of the next token (layers advance together within a forward)."""
        return min(s.seen if s is not None else 0 for s in self.layers)

    def __len__(self):
        return min(self._held(s) if s is not None else 0 for s in self.layers)

    def attend(self, layer, q, k, v):
        st = self.layers[layer]
        self._check(layer, q, k, v, st)
        if self.pad is not None and (len(self.pad) != k.shape[0] or (st is None and int(self.pad.max()) >= k.shape[2])):
            raise ValueError(f"{self.name}: padding {self.pad.tolist()} does not fit a batch of {k.shape[0]} "
                             f"sequence(s) of {k.shape[2]} token(s); every sequence needs one real token")
        run = self if self.subs is None else self.subs         # a ragged batch held per sequence: its B caches
        if st is None:
            self.shape = self.shape or (k.shape[0], k.shape[1], k.shape[3])
            st, out = run._prefill(layer, q, k, v)
            self.layers[layer] = st
        else:
            out = run._decode(layer, st, q, k, v)
        st.seen += q.shape[2]
        return out

    def state(self, layer, what):
        """Layer `layer`'s state, for a method that reads the stored contents (`what`, for the error)."""
        if self.subs is not None:
            raise ValueError(f"{self.name}: {what} of a ragged batch is per sequence; read cache.subs[b].{what}")
        return self.layers[layer]

    def _check(self, layer, q, k, v, st):
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for a cache built for {self.n_layers} layers")
        if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or \
                q.shape[2:] != k.shape[2:] or q.shape[1] % k.shape[1]:
            raise ValueError(f"attend expects q [B, H, T, D] and k, v [B, H_kv, T, D] with H % H_kv == 0, got "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        T = q.shape[2]
        if T == 0 or k.shape[0] == 0:
            raise ValueError(f"{self.name}: got {k.shape[0]} sequence(s) of {T} token(s); a prompt must hold at "
                             f"least one token and a batch at least one sequence")
        seen = st.seen if st is not None else 0
        if seen + T > self.max_seq_len:
            raise ValueError(f"{self.name}: {seen} cached + {T} new tokens exceed max_seq_len={self.max_seq_len}; "
                             f"shorten the prompt or lower --max_new_tokens")
        if st is not None:
            if (k.shape[0], k.shape[1], k.shape[3]) != self.shape:
                raise ValueError(f"{self.name}: k {tuple(k.shape)} does not match the cached (B, H_kv, D) = "
                                 f"{self.shape}; call cache.reset() before a new batch")
            if T != 1 and not self.multi_token_decode:
                raise ValueError(f"{self.name}: got a {T}-token chunk after the prefill; this cache decodes one token "
                                 f"per step (feed generated tokens one at a time, or use --cache dense)")
        if self.validate:
            # the range of what is stored: fp16 (scales, mins, buffers, dense K/V) unless a cache keeps another dtype
            limit = torch.finfo(getattr(self, "dtype", torch.float16)).max
            quant.check_finite(k, f"{self.name} layer {layer} keys", limit)
            quant.check_finite(v, f"{self.name} layer {layer} values", limit)

    # bytes and ratios
    def nbytes(self, allocated=False):
        """Bytes of every stored tensor (used part; allocated=True: capacity) plus 8 B per integer counter."""
        if self.subs is not None:
            return self.subs.nbytes(allocated)
        return sum(s.nbytes(allocated) for s in self.layers if s is not None)

    def dense_nbytes(self):
        """What an fp16 cache would hold for the same tokens: 4 * B * H_kv * D bytes per token (K and V)."""
        if self.shape is None:
            return 0
        B, H, D = self.shape
        n_pad = 0 if self.pad is None else int(self.pad.sum())          # padded rows are no tokens
        return sum(4 * H * D * (B * s.seen - n_pad) for s in self.layers if s is not None)

    def _paper_terms(self, st):
        """(quantized K/V elements, their code bits, stored fp16 parameters) of one layer, for the paper ratio."""
        return 0, 0, 0

    def _all_paper_terms(self):
        if self.subs is not None:
            return self.subs.paper_terms()
        return [self._paper_terms(s) for s in self.layers if s is not None]

    def ratios(self):
        """real = dense fp16 bytes / nbytes() (everything counted); paper = 16 * n_qelem / (code_bits + 16 *
        n_params) over the quantized tokens only, ignoring buffers, tables and index storage (as the paper does)."""
        nb = self.nbytes()
        terms = self._all_paper_terms()
        qel, cbits, npar = (sum(t[i] for t in terms) for i in range(3)) if terms else (0, 0, 0)
        return dict(real=self.dense_nbytes() / nb if nb else 1.0,
                    paper=16 * qel / (cbits + 16 * npar) if qel else 1.0)

    def info(self):
        return self.name


# -----------------------------------------------------------------------------
# DenseCache

class DenseCache(Cache):
    """fp16 K/V [B, H_kv, CAP, D]. Accepts multi-token chunks after the prefill (causal within the chunk).

    Ragged batches (set_padding): the padded rows are stored (one rectangular tensor) but masked out of every
    attention, and nbytes() leaves them out, as a cache that stores each sequence on its own would."""
    name = "dense"
    multi_token_decode = True
    ragged = True
    options = ("dtype",)

    def __init__(self, config, dtype=torch.float16):
        self.dtype = dtype  # fp16 by contract; float32 only for exactness tests
        super().__init__(config)

    def _prefill(self, layer, q, k, v):
        st = DenseState()
        st.kv.append(min_cap=64, k=k.to(self.dtype), v=v.to(self.dtype))
        if self.pad is not None:  # causal and no padded key
            mask = _pad_mask(self.pad, q.shape[2], k.shape[2], q.device)                # [B, 1, T, T]
            return st, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return st, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def _decode(self, layer, st, q, k, v):
        st.kv.append(k=k.to(self.dtype), v=v.to(self.dtype))
        K, V = st.kv["k"].to(q.dtype), st.kv["v"].to(q.dtype)
        T, n = q.shape[2], st.kv.n
        mask = None
        if self.pad is not None:
            mask = _pad_mask(self.pad, T, n, q.device)                                   # [B, 1, T, n]
        else:
            mask = _causal_tail_mask(T, n, q.device)                                     # None for one token
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)

    def nbytes(self, allocated=False):
        nb = super().nbytes(allocated)
        if self.pad is None or allocated:
            return nb
        B, H, D = self.shape   # K and V rows of the padded positions, every layer
        return nb - 2 * H * D * torch.finfo(self.dtype).bits // 8 * int(self.pad.sum()) * \
            sum(s is not None for s in self.layers)

    def _held(self, st):
        return st.kv.n


# -----------------------------------------------------------------------------
# ZipCache

# The default before k_low_bits, as make_cache options (README "Beyond the paper"): 2-bit regular keys, 50% salient,
# key groups of 16; the experiments' "2-bit keys" rows, the paired "before" of the 4-bit-key default
TWO_BIT_KEYS = dict(k_low_bits=0, salient_ratio=0.5, k_group=16)

# ZipCacheConfig fields where the official code's behaviour differs from ours, with ours (OfficialZipCache's switches)
OFFICIAL_SWITCHES = dict(requantize=False, decode_score="normalized", lo_order="position")


@dataclass
class ZipCacheConfig:
    # the paper's algorithm (paper() turns off what follows it)
    high_bits: int = 4                     # salient tokens: attention depends on them most
    low_bits: int = 2                      # regular tokens: most of the saving
    salient_ratio: float = 0.2             # r: the paper's 4.98x setting is 0.6; fewer 4-bit values pay for k_low_bits
    score: str = "normalized"              # normalized (ZipCache, Fig. 3) | accumulated (H2O/MiKV) | locality
    norm: str = "full"                     # the normalized score's divisor: L - j ("full", official) or probe count
    probe_strategy: str = "recent+random"  # recent | random | recent+random | special | all: which queries score
    probe_recent: float = 0.05             # share of prompt rows used as recent probes: scores from 10% of the rows
    probe_random: float = 0.05             # share used as random probes (with replacement, seeded)
    recompress_every: int = 100            # N: decode tokens per compressed block (the official recompress interval)
    # beyond the paper, one switch each (README "Beyond the paper")
    k_group: int = 64                      # rows of a precision group per key (min, scale): 2-bit keys need ~16, 4-bit
                                           # keys hold passkey at 64 (0 = one per block, the paper)
    k_stat_bits: int = 4                   # 4: those statistics as codes under one fp16 (base, step) per block
                                           # (quant.quantize_nested), 0.5 bits a key element at 16 rows, not 2; 16: fp16
    n_sink: int = 4                        # first positions kept fp16, never compressed: attention sinks (StreamingLLM)
                                           # take a large share of every query's attention
    n_recent: int = 0                      # last prompt tokens kept fp16 until the first flush (KIVI's residual window)
    k_low_bits: int = 4                    # regular tokens' keys at this width, their values at low_bits (0: low_bits,
                                           # the paper): the real model's passkey misses came from 2-bit keys alone
    score_pool: int = 0                    # w > 0: the prompt's scores averaged over 2w+1 neighbouring positions before
                                           # the split, so a span (a needle's sentence) is salient together (SnapKV)
    # implementation
    v_token_scope: str = "row"             # value (min, scale) per row over all KV heads ("row", official): 4.94x at
                                           # D=64 where "head" (per token and KV head) stores 4.62x, more accurately
    keep_saliency_mask: bool = False       # a 1-bit salient mask per (seq, KV head, position), for analysis (counted)
    kernel: str = "auto"                   # decode attention: auto | triton | c | torch (decode_kernel.decode_attention)
    seed: int = 0                          # the random probes' generator
    scale_eps: float = 2 ** -14            # scale clamp: constant groups stay finite (official: 0, NaN there)
    pool_batch_stats: bool = False         # official: key statistics and V normalizer pooled over the batch
    # the official code's behaviour where ZipCache's differs (OFFICIAL_SWITCHES: OfficialZipCache implements them)
    decode_score: str = "normalized"       # a flushed block's saliency: the normalized attention of all its decode
                                           # queries, or last_query (official)
    requantize: bool = False               # official: re-quantize the whole cache at every flush
    lo_order: str = "position"             # regular rows of a block by position, or by score as the official top-k
                                           # returns them (a change only with v_token_scope="row" and H_kv > 1)

    def __post_init__(self):
        _check_bits("high_bits", self.high_bits)
        _check_bits("low_bits", self.low_bits)
        if (self.high_bits == 16) != (self.low_bits == 16):
            raise ValueError(f"high_bits={self.high_bits}, low_bits={self.low_bits}: 16 bits means 'not quantized' and "
                             f"applies to the whole cache; set both to 16, or pick both from (2, 4, 8)")
        for name in ("salient_ratio", "probe_recent", "probe_random"):
            _check_ratio(name, getattr(self, name))
        choices = dict(probe_strategy=saliency.PROBE_MODES, score=saliency.SCORES, norm=saliency.NORMS,
                       decode_score=("normalized", "last_query"), v_token_scope=("head", "row"),
                       lo_order=("position", "score"), kernel=("auto", "triton", "c", "torch"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; use one of {allowed}")
        if self.recompress_every < 1:
            raise ValueError(f"recompress_every={self.recompress_every} must be >= 1 (decode tokens per compressed "
                             f"block)")
        if self.scale_eps < 0:
            raise ValueError(f"scale_eps={self.scale_eps} must be >= 0")
        if not 0 <= self.n_recent < self.recompress_every:   # the tail is compressed with the first decode block
            raise ValueError(f"n_recent={self.n_recent} must be >= 0 and below recompress_every="
                             f"{self.recompress_every} (prompt tokens kept fp16 until the first flush)")
        if self.n_sink < 0:
            raise ValueError(f"n_sink={self.n_sink} must be >= 0 (fp16 tokens kept at the start of the prompt)")
        if self.k_stat_bits not in (4, 16):
            raise ValueError(f"k_stat_bits={self.k_stat_bits} must be 4 (nested key statistics) or 16 (fp16)")
        if self.k_low_bits and self.high_bits < 16:
            _check_bits("k_low_bits", self.k_low_bits)
            if self.k_low_bits == 16:
                raise ValueError("k_low_bits=16 is not a code width; use 2, 4 or 8 (or 0 = low_bits)")
        if self.score_pool < 0:
            raise ValueError(f"score_pool={self.score_pool} must be >= 0 (half-width of the score smoothing; 0 = off)")
        if self.k_group < 0:
            raise ValueError(f"k_group={self.k_group} must be >= 0 (0 = one key (min, scale) per block, the paper)")

    @property
    def nested(self):
        """Key group statistics stored as quant.quantize_nested codes."""
        return self.k_group > 0 and self.k_stat_bits < 16

    def paper(self):
        """The paper's algorithm: one key (min, scale) per channel per block and precision group, no fp16 sinks,
        60% salient; our storage and statistics choices stay (per-sequence statistics, scale clamp)."""
        return replace(self, k_group=0, k_stat_bits=16, n_sink=0, n_recent=0, score_pool=0, k_low_bits=0,
                       salient_ratio=0.6)

    def official(self):
        """The official code's behaviour where it changes numbers: the paper preset plus pooled
        batch statistics, no scale clamp, last-query decode scores, whole-cache re-quantization."""
        return replace(self.paper(), pool_batch_stats=True, scale_eps=0.0, decode_score="last_query", requantize=True,
                       v_token_scope="row", k_group=0, k_stat_bits=16, n_sink=0, n_recent=0, lo_order="score")

    def official_switches(self):
        """The fields set to the official code's behaviour where ZipCache differs (OfficialZipCache implements them)."""
        return [f"{n}={getattr(self, n)!r}" for n, ours in OFFICIAL_SWITCHES.items() if getattr(self, n) != ours]

    def describe(self):
        """These settings in one line (cache.info())."""
        if self.high_bits == 16:
            return "zipcache 16-bit (not quantized)"
        share = {"recent": f"{self.probe_recent:.0%}", "random": f"{self.probe_random:.0%}",
                 "recent+random": f"{self.probe_recent:.0%}+{self.probe_random:.0%}"}.get(self.probe_strategy)
        return (f"zipcache {self.high_bits}/{self.low_bits}-bit, {self.salient_ratio:.0%} salient, {self.score} score, "
                f"probes {self.probe_strategy}{f' ({share})' if share else ''}, block {self.recompress_every}"
                f"{', requantize' if self.requantize else ''}{', pooled stats' if self.pool_batch_stats else ''}"
                f"{f', regular keys {self.k_low_bits}-bit' if self.k_low_bits else ''}"
                f"{f', key groups {self.k_group}' if self.k_group else ''}"
                f"{' (4-bit nested stats)' if self.nested else ''}"
                f"{f', {self.n_sink} fp16 sinks' if self.n_sink else ''}"
                f"{f', {self.n_recent} fp16 recent' if self.n_recent else ''}")


@dataclass
class ZipGroup:
    """One precision group's stores (all blocks of a layer). Bs = 1 with pooled statistics, else B; Hv = H with
    per-head value parameters (v_token_scope="head"), else 1.

        codes   k_codes, v_codes [B, H, CAP, D*bits/8] uint8 (packed), v_scale, v_min [B, Hv, CAP] fp16: per row
        params  k_scale, k_min [Bs, CAP_sub, H, D] fp16, or nested: k_stat [Bs, CAP_sub, H, D] uint8: per sub-block
        base    k_base [Bs, CAP_blocks, H, 4, D] fp16: per block, nested statistics only (else None)
        rows    rows [B, CAP_sub + 1] int32: the row table, sub-block j holds rows [rows[j], rows[j + 1])
    """
    codes: Store
    params: Store
    rows: Store
    base: Store | None = None

    @classmethod
    def empty(cls, B, nested, device):
        g = cls(codes=Store(), params=Store(axis=1), rows=Store(axis=1), base=Store(axis=1) if nested else None)
        g.rows.append(rows=torch.zeros(B, 1, dtype=torch.int32, device=device))
        return g

    def nbytes(self, allocated=False):
        return _stores_nbytes((self.codes, self.params, self.rows, self.base), allocated)

    def segment(self, bits):
        """The group as stored, for the decode view (full-capacity tensors, read in place): fp16 key (scale, min)
        per sub-block, or the nested codes and their per-block (base, step) (decode_kernel.ZipSegment).
        bits = (key bits, value bits)."""
        t, p = self.codes.full, self.params.full
        nested = self.base is not None
        kb, vb = bits
        return decode_kernel.ZipSegment(kb, t["k_codes"], t["v_codes"], t["v_scale"], t["v_min"],
                                        None if nested else p["k_scale"], None if nested else p["k_min"],
                                        self.rows.full["rows"], k_stat=p["k_stat"] if nested else None,
                                        k_base=self.base.full["k_base"] if nested else None,
                                        v_bits=None if vb == kb else vb)

    def paper_terms(self, bits, H, D):
        """(quantized K/V elements, their code bits, fp16 parameters); a nested pair is 8 bits, half a parameter.
        bits = (key bits, value bits)."""
        B, _, n, _ = self.codes["k_codes"].shape
        e = B * H * n * D                                           # elements of K, and as many of V
        k_par = (self.params["k_stat"].numel() // 2 + self.base["k_base"].numel() if self.base is not None
                 else 2 * self.params["k_scale"].numel())
        return 2 * e, e * sum(bits), 2 * self.codes["v_scale"].numel() + k_par


@dataclass(kw_only=True)
class ZipState(LayerState):
    """One layer of a ZipCache.

        buf       k, v [B, H, CAP, D] fp16: sinks | recent prompt tail | decode tokens not yet compressed, and
                  acc [B, H, CAP] fp32: the attention each received from the block's decode queries
        v_chan    v_chan [Bs, CAP_blocks, H, D] fp16: the CST value normalizer of each block
        parent    parent [1, CAP_sub] int32: the block of each sub-block
        hi, lo    the two precision groups (None at 16 bits: everything stays in buf)
        mask      m [B, H, CAP/8] uint8: the salient bit of every position (keep_saliency_mask, else None)
        n_sink    fp16 sink rows at the front of buf; n_tail: recent prompt rows after them until the first flush.
                  Counters only when their option is on (None otherwise; nbytes counts 8 B each)
    """
    buf: Store = field(default_factory=Store)
    v_chan: Store = field(default_factory=partial(Store, axis=1))
    parent: Store = field(default_factory=partial(Store, axis=1))
    hi: ZipGroup | None = None
    lo: ZipGroup | None = None
    mask: Store | None = None
    n_sink: int | None = None
    n_tail: int | None = None

    def nbytes(self, allocated=False):
        groups = sum(g.nbytes(allocated) for g in (self.hi, self.lo) if g is not None)
        counters = 8 * (1 + (self.n_sink is not None) + (self.n_tail is not None))        # seen, n_sink, n_tail
        return _stores_nbytes((self.buf, self.v_chan, self.parent, self.mask), allocated) + groups + counters

    def view(self, bits, tables=None):
        """The layout decode_kernel.decode_attention reads, as stored: full-capacity tensors + valid counts, the
        per-block CST normalizer and key statistics with the sub-blocks' parent table; bits = ((key, value) bits of
        hi, of lo), ZipCache.bits.
        view(...).expand() is the Triton kernel's form (statistics per sub-block, decoded for that call)."""
        if self.hi is None:
            return decode_kernel.dense_view(self.buf["k"], self.buf["v"])
        hi, lo = (g.segment(b) for g, b in zip((self.hi, self.lo), bits))
        return decode_kernel.ZipLayerView(hi=hi, lo=lo, v_chan=self.v_chan.full["v_chan"], k_buf=self.buf.full["k"],
                                          v_buf=self.buf.full["v"], n_buf=self.buf.n, n_blocks=self.parent.n,
                                          tables=tables, parent=self.parent.full["parent"][0])

    def paper_terms(self, bits):
        """(quantized K/V elements, their code bits, fp16 parameters) for the paper ratio: codes and parameters only."""
        if self.hi is None:
            return 0, 0, 0
        H, D = self.v_chan["v_chan"].shape[2:]
        terms = [g.paper_terms(b, H, D) for g, b in zip((self.hi, self.lo), bits)]
        qel, code_bits, par = (sum(t[i] for t in terms) for i in range(3))
        return qel, code_bits, par + self.v_chan["v_chan"].numel()


class ZipCache(Cache):
    """Mixed-precision KV cache (ZipCache, He et al. 2024), in the paper's order:

    prefill   the output is exact SDPA; then the prompt is compressed as block 0
    saliency  normalized attention scores from a few probe queries (saliency.py)
    split     per (seq, KV head), the top r tokens are salient (high_bits), the rest regular (low_bits; their keys
              at k_low_bits when set, the default's 4: beyond the paper)
    quantize  keys channelwise per precision group (and key group), values CST, codes packed (quant.py), appended
    decode    new tokens wait in an fp16 buffer; attention is one decode_kernel.decode_attention call over
              [hi blocks | lo blocks | buffer], and the buffer's tokens are scored by the attention they receive
    flush     every recompress_every steps the buffer becomes a new block with its own statistics and split
    Tokens are stored grouped by precision, not by position: decode attention is order-invariant and keys carry RoPE,
    so no index lists are kept.
    """
    name = "zipcache"
    ragged = True
    official_code = False  # the config's official-code switches are OfficialZipCache's (baselines.py), not this class's
    options = ("official", "paper", "bits", "probe_ratio", *(f.name for f in fields(ZipCacheConfig)))

    @classmethod
    def from_options(cls, config, official=False, paper=False, bits=None, probe_ratio=None, **opts):
        """ZipCacheConfig fields plus four shorthands: official / paper (the presets), bits (both precision groups)
        and probe_ratio (split over the probe kinds of probe_strategy)."""
        opts = _bits_shorthand(opts, bits)
        if bits is not None and bits < 16:
            opts.setdefault("k_low_bits", bits)     # "every token at `bits`" includes the regular keys
        if probe_ratio is not None:
            _check_ratio("probe_ratio", probe_ratio)
            if probe_ratio == 0:
                raise ValueError("probe_ratio=0 selects no probe queries; use a fraction in (0, 1] (default 0.1), "
                                 "or --probe_strategy all for the exact attention")
            both = opts.get("probe_strategy", "recent+random") == "recent+random"
            opts["probe_recent"] = opts["probe_random"] = probe_ratio / 2 if both else probe_ratio
        base = ZipCacheConfig().official() if official else ZipCacheConfig().paper() if paper else ZipCacheConfig()
        return cls(config, replace(base, **opts))

    def __init__(self, config, zcfg=None):
        self.cfg = zcfg or ZipCacheConfig()
        switches = self.cfg.official_switches()
        if switches and not self.official_code:
            raise ValueError(f"{', '.join(switches)}: the official code's behaviour is baselines.OfficialZipCache's, "
                             f"not ZipCache's; build that class (generate.make_cache does for --official and these "
                             f"options)")
        self.quantized = self.cfg.high_bits < 16
        c = self.cfg                   # (key, value) bits of the salient group and of the regular group
        self.bits = ((c.high_bits, c.high_bits), (c.k_low_bits or c.low_bits, c.low_bits))
        _check_pack_dim(config.head_dim, sum(self.bits, ()))
        self.special = None
        super().__init__(config)

    def reset(self):
        super().reset()
        self.gen = torch.Generator().manual_seed(self.cfg.seed)  # probes: one draw per layer, in layer order
        # per layer: the kernel's split tables, derived from the row tables; emptied whenever a block is appended
        # (prefill, flush), so the kernel rebuilds them only then, not every step (scratch, not cache bytes)
        self.split_tables = [{} for _ in range(self.n_layers)]

    def set_padding(self, pad):
        """A ragged batch is held as B single-sequence caches of this class (PerSequence), each drawing its probes
        from its own generator, seeded alike: everything is what the sequence gets alone."""
        super().set_padding(pad)
        if self.pad is not None:
            self.subs = PerSequence(type(self), self.pad, self.config, self.cfg)
            for sub in self.subs:
                sub.special = self.special

    def set_special_positions(self, positions):
        """Prompt positions to use as probes with probe_strategy='special' (see saliency.special_positions)."""
        self.special = torch.as_tensor(positions, dtype=torch.long)
        for sub in self.subs or ():
            sub.special = self.special

    def info(self):
        return self.cfg.describe()

    def nbytes(self, allocated=False):
        """Cache.nbytes plus the Triton launcher's split tables (int32 [B, 2, S, 4] per layer), which are kept between
        steps and derived from the row tables, so they count while held; a CPU run never builds them."""
        tables = sum(t.numel() * t.element_size() for d in self.split_tables for t in d.values())
        return super().nbytes(allocated) + tables

    # prefill: exact output, then the prompt becomes block 0 ---------------------------------------
    def _prefill(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # the output never changes
        B, H, L, D = k.shape
        c = self.cfg
        st = self._new_state(B, k.device)
        self.split_tables[layer] = {}
        if not self.quantized:  # 16 bits: everything stays in the fp16 buffer
            st.buf.append(min_cap=L + c.recompress_every, k=k.half(), v=v.half())
            return st, out
        S = min(c.n_sink, L - 1)             # sink tokens: the buffer's first S rows, never flushed (block 0 keeps
                                             # at least one prompt token, so every layer has the same layout)
        R = min(c.n_recent, L - 1 - S)       # recent prompt tokens: buffered until the first flush
        if c.n_sink:
            st.n_sink = S                    # counters only when the option is on (nbytes counts 8 B each)
        if c.n_recent:
            st.n_tail = R
        # saliency: normalized attention from the probe rows
        rows = saliency.probe_positions(L, c.probe_strategy, c.probe_recent, c.probe_random, self.gen, self.special)
        scores = saliency.probe_scores(q, k, rows, c.score, c.norm)                     # [B, H_kv, L]
        if c.score_pool:
            scores = saliency.pool_scores(scores, c.score_pool)                         # [B, H_kv, L]
        hi, lo = self._split(scores[..., S:L - R])
        self._append_block(st, k[:, :, S:L - R], v[:, :, S:L - R], hi, lo)              # the prompt = block 0
        if c.keep_saliency_mask:
            self._record_mask(st, S, L - R - S, hi)
        keep = torch.cat([torch.arange(S), torch.arange(L - R, L)]).to(k.device)        # sinks | recent tail
        st.buf.append(min_cap=S + max(R, c.recompress_every), k=k[:, :, keep].half(), v=v[:, :, keep].half(),
                      **self._score_rows(B, H, S + R, k.device))                          # [B, H_kv, S + R, D]
        return st, out

    def _new_state(self, B, device):
        """An empty layer: its two precision groups when quantized, and the salient mask when kept."""
        st = ZipState()
        if self.quantized:
            st.hi, st.lo = ZipGroup.empty(B, self.cfg.nested, device), ZipGroup.empty(B, self.cfg.nested, device)
            st.mask = Store() if self.cfg.keep_saliency_mask else None
        return st

    def _split(self, scores):
        """scores [B, H_kv, n] -> (hi [B, H_kv, m_hi], lo [B, H_kv, m_lo]) indices: the top r are salient."""
        return saliency.split(scores, self.cfg.salient_ratio)

    def _append_block(self, st, k, v, hi, lo):
        """Quantize one block k, v [B, H, n, D], split into salient/regular indices hi, lo [B, H, m_p], and append
        it: keys channelwise per precision group, values CST under one normalizer per block, codes packed.

        With k_group > 0 each group is cut into n_sub runs of consecutive rows (quant.quantize_runs); the j-th run of
        each group forms sub-block j, with its own key (min, scale) per channel, stored as 4-bit codes under one fp16
        (base, step) per block and group when nested (quant.quantize_nested). k_group = 0: one run, the paper.
        """
        c = self.cfg
        eps, pool = c.scale_eps, c.pool_batch_stats
        n_sub = max(1, math.ceil(max(hi.shape[-1], lo.shape[-1]) / c.k_group)) if c.k_group else 1
        kf, vf = k.float(), v.float()
        chan = quant.cst_normalizer(vf, eps, dim=(0, 2) if pool else 2)                  # [Bs, H, 1, D] per block
        st.v_chan.append(min_cap=4, v_chan=chan.transpose(1, 2))                         # [Bs, 1, H, D]
        st.parent.append(min_cap=4, parent=torch.full((1, n_sub), st.v_chan.n - 1, dtype=torch.int32,
                                                      device=k.device))                  # block of each sub-block
        v_dims = (-1,) if c.v_token_scope == "head" else (1, -1)    # a value (min, scale) per (token, head) or row
        for g, (kb, vb), idx in zip((st.hi, st.lo), self.bits, (hi, lo)):
            kc, k_stats = quant.quantize_runs(_gather_tokens(kf, idx), kb, n_sub, pool, eps, c.nested)
            vc, vs, vm, _ = quant.quantize_cst(_gather_tokens(vf, idx), vb, v_dims, eps, chan=chan, check=False)
            k_stats = [s.transpose(1, 2) for s in k_stats]          # [Bs, n_sub, H, D] (a nested base [Bs, 1, H, 4, D])
            rows = g.codes.n + quant.run_sizes(idx.shape[-1], n_sub, k.device).cumsum(0).to(torch.int32)
            g.codes.append(k_codes=quant.pack(kc, kb), v_codes=quant.pack(vc, vb),       # [B, H, m, D*bits/8]
                           v_scale=vs[..., 0], v_min=vm[..., 0])                         # [B, Hv, m]
            if g.base is not None:
                g.params.append(min_cap=4, k_stat=k_stats[0])
                g.base.append(min_cap=4, k_base=k_stats[1])
            else:
                g.params.append(min_cap=4, k_scale=k_stats[0], k_min=k_stats[1])
            g.rows.append(min_cap=5, rows=rows.expand(k.shape[0], -1).contiguous())     # the row table, [B, n_sub]

    def _record_mask(self, st, start, n, hi):
        """The salient bit of positions [start, start + n): 1 for the hi indices [B, H, m] of the block there."""
        B, H = hi.shape[:2]
        old = quant.unpack_bits(st.mask["m"])[..., :start] if st.mask.n else hi.new_zeros(B, H, 0, dtype=torch.uint8)
        old = F.pad(old, (0, start - old.shape[-1]), value=1)        # fp16 sink positions count as high precision
        new = torch.zeros(B, H, n, dtype=torch.uint8, device=hi.device).scatter_(2, hi, 1)
        st.mask.n = 0
        st.mask.append(min_cap=64, m=quant.pack_bits(torch.cat([old, new], 2)))

    # decode: attention over what is stored; the buffer's tokens are scored as they wait ----------
    def _decode(self, layer, st, q, k, v):
        c = self.cfg
        extra = {"acc": k.new_zeros(*k.shape[:3], dtype=torch.float32)} if "acc" in st.buf.full else {}
        st.buf.append(k=k.half(), v=v.half(), **extra)
        q1 = q[:, :, 0]                                                                  # [B, H, D]
        # the Triton kernel takes fp16/bf16 queries (its dots run on fp16 tensor-core operands); an fp32 model (CPU)
        # hands it q rounded to fp16, the precision the keys are stored at anyway
        qk = q1.half() if c.kernel == "triton" and q1.dtype == torch.float32 else q1
        view = st.view(self.bits, self.split_tables[layer])                              # as stored
        out, lse = decode_kernel.decode_attention(qk, view, kernel=c.kernel, return_lse=True)
        out = out.to(q1.dtype)
        if self.quantized:
            full = st.buf.n - (st.n_sink or 0) == c.recompress_every    # the flush rule: N rows past the sinks
            score = self._decode_scores(st, q1, lse, full)
            if full:
                self._flush(st, score)
                self.split_tables[layer] = {}
        return out[:, :, None]                                                           # [B, H, 1, D]

    def _score_rows(self, B, H, n, device):
        """The buffer's score column for n rows: acc [B, H, n], the attention each receives from decode queries."""
        return {"acc": torch.zeros(B, H, n, dtype=torch.float32, device=device)}

    def _decode_scores(self, st, q1, lse, full):
        """Saliency of the buffered rows: this step's attention (q1 [B, H, D], lse [B, H]) is accumulated; when the
        buffer is full, -> the normalized scores [B, H_kv, N] of its rows past the sinks (each row's accumulated
        attention over the number of decode queries that saw it, saliency.normalize_block)."""
        st.buf["acc"].add_(saliency.decode_probabilities(q1, st.buf["k"], lse))          # [B, H_kv, n_buf]
        if full:
            return saliency.normalize_block(st.buf["acc"][..., st.n_sink or 0:], st.n_tail or 0)
        return None

    def _flush(self, st, score):
        """The full buffer's rows past the sinks become a new block with its own statistics and split, by score."""
        N, S = self.cfg.recompress_every, st.n_sink or 0                # buffer rows [S, S + N) are compressed
        hi, lo = self._split(score)
        k, v = st.buf["k"][:, :, S:], st.buf["v"][:, :, S:]                             # [B, H_kv, N, D] fp16
        if self.cfg.keep_saliency_mask:
            self._record_mask(st, st.seen + 1 - N, N, hi)   # the block's first position (seen counts this step later)
        self._append_block(st, k, v, hi, lo)
        st.buf.n = S
        if st.n_tail is not None:
            st.n_tail = 0

    # reading what is stored ----------------------------------------------------------------------
    def layer_view(self, layer):
        """The layer in the decode kernel's expanded form (ZipLayerView.expand: fp16 statistics per sub-block), for
        tests and analysis; decoding reads ZipState.view, the stored form."""
        return self.state(layer, "layer_view(layer)").view(self.bits, self.split_tables[layer]).expand()

    def _dequantized(self, st):
        """[(K̂, V̂) of hi, (K̂, V̂) of lo], fp32 [B, H, n_p, D] in storage order, each block with its own
        parameters."""
        view = st.view(self.bits).expand()
        return [decode_kernel.dequantize_segment(seg, view.v_chan, decode_kernel.row_blocks(seg.rows[0], view.n_blocks),
                                                 torch.float32) for seg in view.segments]   # rows equal per sequence

    def kv(self, layer):
        """(K̂, V̂) fp32 [B, H_kv, n, D] as decode attention reads them: hi | lo | fp16 buffer (tests, analysis)."""
        st = self.state(layer, "kv(layer)")
        parts = self._dequantized(st) if self.quantized else []
        parts.append((st.buf["k"].float(), st.buf["v"].float()))
        return torch.cat([a for a, _ in parts], 2), torch.cat([b for _, b in parts], 2)

    def salient_mask(self, layer):
        """bool [B, H_kv, positions before the buffer's recent part]: which tokens were stored at high_bits (or kept
        fp16 as sinks; needs keep_saliency_mask)."""
        st = self.state(layer, "salient_mask(layer)")
        return quant.unpack_bits(st.mask["m"])[..., :st.seen - st.buf.n + (st.n_sink or 0)] > 0

    def _held(self, st):
        return st.seen

    def _paper_terms(self, st):
        return st.paper_terms(self.bits)


class PerSequence:
    """A left-padded (ragged) batch held as B single-sequence caches of one class, each fed its own sequence without
    the padding, so that what the cache computes from a sequence is what it computes for the sequence alone. It
    wraps a cache class as kvpress's AdaKVPress wraps a press: the owning cache keeps the interface (validation,
    positions, the padding, dense_nbytes) and hands each layer's prefill, decode, bytes and paper terms here
    (Cache.attend, nbytes, ratios). Decode runs the B caches one after the other (B kernel calls, not one): simple
    and exact, not the fast path. subs[b] is sequence b's cache."""

    def __init__(self, cls, pad, *args):
        self.pad = pad.tolist()
        self.caches = [cls(*args) for _ in self.pad]
        for c in self.caches:
            c.validate = False                                   # the owner's attend validated k, v

    def __getitem__(self, b):
        return self.caches[b]

    def __iter__(self):
        return iter(self.caches)

    def __len__(self):
        return len(self.caches)

    def _prefill(self, layer, q, k, v):
        """Sequence b's unpadded slice to its own cache; its padded rows output 0."""
        outs = [F.pad(c.attend(layer, q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:]), (0, 0, p, 0))
                for b, (c, p) in enumerate(zip(self.caches, self.pad))]                 # [1, H, T, D] each
        return LayerState(), torch.cat(outs)                                             # [B, H, T, D]

    def _decode(self, layer, st, q, k, v):
        return torch.cat([c.attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                          for b, c in enumerate(self.caches)])                           # [B, H, 1, D]

    def nbytes(self, allocated=False):
        return sum(c.nbytes(allocated) for c in self.caches)

    def paper_terms(self):
        return [t for c in self.caches for t in c._all_paper_terms()]


def paper_formula_ratio(b, l, hd, r=0.6, bits=(4, 2), P=None):
    """The paper's compression ratio: 2*b*l*hd*16 / (2*b*l*hd*k_avg + 16*P), k_avg = r*hi + (1-r)*lo,
    P = number of fp16 quantization parameters (default 5*hd + 2*b*l: two key (min, scale) vectors, the V normalizer,
    and a (min, scale) per token). Reproduces 4.98x (r=0.6) and 4.69x (r=0.7) at b=8, l=840, hd=4096."""
    hi, lo = (bits, bits) if isinstance(bits, int) else bits
    k_avg = r * hi + (1 - r) * lo
    P = 5 * hd + 2 * b * l if P is None else P
    return 2 * b * l * hd * 16 / (2 * b * l * hd * k_avg + 16 * P)
