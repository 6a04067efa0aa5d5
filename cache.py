"""
KV caches behind one interface (the model knows nothing else):

    out = cache.attend(layer, q, k, v)    q [B, H, T, D], k/v [B, H_kv, T, D] (RoPE applied) -> out [B, H, T, D]
    cache.pos, len(cache), cache.nbytes(), cache.ratios(), cache.reset(), cache.info()
    cache.set_padding(pad)                before the prefill of a left-padded (ragged) batch: DenseCache, ZipCache

The first call on an empty layer is the prefill (T = prompt length): every cache returns exactly causal SDPA's
output on the unquantized q, k, v, and then compresses what it keeps. Later calls are decode steps (T = 1).

    DenseCache   fp16 K/V, the reference                                                 
    ZipCache     mixed 4/2-bit, saliency from probe queries, channelwise K, CST V, fused decode
    KIVICache    2/4-bit: keys per channel, values per token, fp16 residual window     
    H2OCache     heavy hitters + recent window, everything else evicted                 
    MiKVCache    mixed 4/2-bit per-token, accumulated scores from the full attention matrix
    make_cache(name, config, **options)

Real bytes: codes are packed uint8, parameters fp16, and nbytes() counts every stored tensor (used part) plus 8 B
per integer counter. Storage grows by doubling; the spare capacity is never read.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

import kernels
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


def _gather_tokens(x, idx):
    """x [B, H, L, D], idx [B, H, n] -> x at those token positions, [B, H, n, D]."""
    B, H = idx.shape[:2]
    bh = torch.arange(B * H, device=x.device)[:, None]
    return x.flatten(0, 1)[bh, idx.flatten(0, 1)].view(B, H, idx.shape[-1], x.shape[-1])  # row copies, not gather


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


class _Growing:
    """Named tensors that share one growing axis (`dim`); the first n entries along it are used. When full, the
    capacity doubles and the used part is copied; the spare part is never read. Used bytes scale with n."""
    dim = 2  # [B, H, CAP, ...] token rows

    def __init__(self):
        self.n = 0
        self.t = {}

    def __getitem__(self, name):  # the used part
        return self.t[name].narrow(self.dim, 0, self.n)

    def append(self, min_cap=1, **chunks):
        """Write equal-length chunks after the used part, growing every tensor of the store together."""
        m = next(iter(chunks.values())).shape[self.dim]
        need = self.n + m
        for name, c in chunks.items():
            t = self.t.get(name)
            if t is None or t.shape[self.dim] < need:
                cap = max(need, min_cap) if t is None else max(need, 2 * t.shape[self.dim])
                shape = list(c.shape)
                shape[self.dim] = cap
                new = torch.zeros(shape, dtype=c.dtype, device=c.device)
                if t is not None:
                    new.narrow(self.dim, 0, self.n).copy_(t.narrow(self.dim, 0, self.n))
                self.t[name] = t = new
            t.narrow(self.dim, self.n, m).copy_(c)
        self.n = need

    def drop_front(self, m):
        """Forget the m oldest entries (a sliding window), shifting the rest to the front."""
        for t in self.t.values():
            t.narrow(self.dim, 0, self.n - m).copy_(t.narrow(self.dim, m, self.n - m).clone())
        self.n -= m

    def nbytes(self, allocated=False):
        total = 0
        for t in self.t.values():
            per = t.numel() // max(1, t.shape[self.dim]) * t.element_size()
            total += per * (t.shape[self.dim] if allocated else self.n)
        return total + 8  # + the counter n


class _Blocks(_Growing):
    dim = 1  # [Bs, NB_CAP, ...] per-block parameters and the [B, NB_CAP+1] row table


def _state_bytes(obj, allocated):
    """Bytes of a layer's state: every store (used part, or capacity), every tensor, 8 B per int counter."""
    if isinstance(obj, _Growing):
        return obj.nbytes(allocated)
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, bool) or obj is None:
        return 0
    if isinstance(obj, int):
        return 8
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(x, allocated) for x in obj)
    if isinstance(obj, dict):
        return sum(_state_bytes(x, allocated) for x in obj.values())
    return sum(_state_bytes(x, allocated) for x in vars(obj).values())


class _Segment:
    """A bag of stores (nbytes walks it): tensors, stores and int counters only, never configuration."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _State(_Segment):
    """Per-layer state; `seen` = tokens processed by this layer (the RoPE position of its next token)."""

    def __init__(self, **kw):
        super().__init__(seen=0, **kw)


# -----------------------------------------------------------------------------
# the interface

class Cache:
    """Base class: validation, prefill/decode dispatch, pos/len/nbytes/ratios. Subclasses implement _prefill (returns
    (state, out)), _decode (returns out), _held (tokens kept), and optionally _paper_terms."""
    name = "cache"
    multi_token_decode = False  # only DenseCache accepts T > 1 chunks after the prefill
    ragged = False              # accepts a left-padded batch (set_padding): DenseCache and ZipCache

    def __init__(self, config, validate=True):
        self.config = config
        self.n_layers = config.n_layers
        self.max_seq_len = config.max_seq_len
        self.validate = validate  # check K/V for NaN/Inf (one host sync per layer and step)
        self.reset()

    def reset(self):
        self.layers = [None] * self.n_layers
        self.shape = None  # (B, H_kv, D), learned at the first attend
        self.pad = None    # [B] left-pad tokens per sequence, or None (no padding); see set_padding

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
        if st is None:
            self.shape = self.shape or (k.shape[0], k.shape[1], k.shape[3])
            st, out = self._prefill(layer, q, k, v)
            self.layers[layer] = st
        else:
            out = self._decode(layer, st, q, k, v)
        st.seen += q.shape[2]
        return out

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
        return sum(_state_bytes(s, allocated) for s in self.layers if s is not None)

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

    def __init__(self, config, dtype=torch.float16, **kw):
        self.dtype = dtype  # fp16 by contract; float32 only for exactness tests
        super().__init__(config, **kw)

    def _prefill(self, layer, q, k, v):
        st = _State(kv=_Growing())
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
        elif T > 1:  # query i (at position n - T + i) sees keys j <= n - T + i
            mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - T, n, device=q.device)[:, None]
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

@dataclass
class ZipCacheConfig:
    bits_hi: int = 4                 # salient tokens
    bits_lo: int = 2                 # regular tokens
    salient_ratio: float = 0.5       # r (the paper uses 0.6, its 4.98x setting; see k_group for why 0.5 here)
    probe_recent: float = 0.05       # fraction of prompt rows used as recent probes
    probe_random: float = 0.05       # fraction used as random probes (with replacement, seeded)
    probe_mode: str = "recent+random"  # recent | random | recent+random | special | all 
    score: str = "normalized"        # normalized (ZipCache) | accumulated (H2O/MiKV) | locality
    norm: str = "full"               # divisor of the normalized score: L - j ("full", official) or probe count
    seed: int = 0
    block_size: int = 100            # N: decode tokens per compressed block (the official recompress interval)
    decode_score: str = "normalized"  # normalized attention from the block's own queries | last_query (official)
    requantize: bool = False         # official: re-quantize the whole cache every N steps
    pool_batch_stats: bool = False   # official: key params and V normalizer pooled over the batch
    scale_eps: float = 2 ** -14      # official: 0 (NaN on constant groups in the official code)
    # value (min, scale): one pair per row over all KV heads ("row", official) or per (token, KV head) ("head").
    # Default "row": at 4k tokens it stores 4.94x (D=64) / 4.96x (D=128) fewer bytes than fp16, "head" 4.62x /
    # 4.80x, missing the 4.7x target at D=64; "head" is more accurate when heads differ in value magnitude.
    v_token_scope: str = "row"
    keep_saliency_mask: bool = False  # store a 1-bit salient/regular mask per (seq, KV head, position)
    kernel: str = "auto"             # decode attention: auto | triton | torch
    # Beyond the paper (README "Closing the gap on a real model"): at most k_group rows of each precision group share
    # one key (min, scale) per channel. 0 = the paper's one pair per channel over the whole block. A block is cut
    # into sub-blocks of consecutive (by position) rows of each group, so the stored layout and the kernel are
    # unchanged; the CST value normalizer is then taken per sub-block too. Costs 32/k_group bits per key element.
    k_group: int = 128
    # Beyond the paper: the first n_sink positions (the "attention sinks" of StreamingLLM, which take a large share
    # of every query's attention) stay in fp16, bit-identical to a dense cache, and are never compressed.
    n_sink: int = 4
    # Beyond the paper: the last n_recent prompt tokens (the question, on a long-context task) wait in the fp16
    # buffer and are compressed with the first decode block, as KIVI's full-precision residual window does.
    n_recent: int = 0
    # order of the regular rows inside a block: by position, or by ascending score as the official top-k returns
    # them. Only changes numbers with v_token_scope="row" and H_kv > 1 (a value row spans all KV heads).
    lo_order: str = "position"

    def __post_init__(self):
        _check_bits("bits_hi", self.bits_hi)
        _check_bits("bits_lo", self.bits_lo)
        if (self.bits_hi == 16) != (self.bits_lo == 16):
            raise ValueError(f"bits_hi={self.bits_hi}, bits_lo={self.bits_lo}: 16 bits means 'not quantized' and "
                             f"applies to the whole cache; set both to 16, or pick both from (2, 4, 8)")
        for name in ("salient_ratio", "probe_recent", "probe_random"):
            _check_ratio(name, getattr(self, name))
        choices = dict(probe_mode=saliency.PROBE_MODES, score=saliency.SCORES, norm=saliency.NORMS,
                       decode_score=("normalized", "last_query"), v_token_scope=("head", "row"), lo_order=("position", "score"),
                       kernel=("auto", "triton", "torch"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; use one of {allowed}")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1 (decode tokens per compressed block)")
        if self.scale_eps < 0:
            raise ValueError(f"scale_eps={self.scale_eps} must be >= 0")
        if self.n_recent < 0:
            raise ValueError(f"n_recent={self.n_recent} must be >= 0 (prompt tokens kept fp16 until the first flush)")
        if self.n_sink < 0:
            raise ValueError(f"n_sink={self.n_sink} must be >= 0 (fp16 tokens kept at the start of the prompt)")
        if self.k_group < 0:
            raise ValueError(f"k_group={self.k_group} must be >= 0 (0 = one key (min, scale) per block, the paper)")

    def paper(self):
        """The paper's algorithm: one key (min, scale) per channel per block and precision group, no fp16 sinks,
        60% salient; our storage and statistics choices stay (per-sequence statistics, scale clamp)."""
        return replace(self, k_group=0, n_sink=0, n_recent=0, salient_ratio=0.6)

    def official(self):
        """The official code's behaviour where it changes numbers: the paper preset plus pooled
        batch statistics, no scale clamp, last-query decode scores, whole-cache re-quantization."""
        return replace(self.paper(), pool_batch_stats=True, scale_eps=0.0, decode_score="last_query", requantize=True,
                       v_token_scope="row", k_group=0, n_sink=0, n_recent=0, lo_order="score")


class ZipCache(Cache):
    """Mixed-precision KV cache (ZipCache, He et al. 2024).

    Prefill: SDPA output; normalized saliency from probe rows (saliency.py); per (seq, KV head) the top r tokens go
    to the 4-bit segment, the rest to the 2-bit one; keys channelwise per segment, values CST (quant.py).
    Decode: new tokens wait in an fp16 buffer; attention is one kernels.decode_attention call over
    [hi blocks | lo blocks | buffer]; every block_size steps the buffer becomes a new block with its own statistics
    and its own split (scored by the attention it received from the block's decode queries).
    Tokens are stored grouped by precision, not by position: decode attention is order-invariant and keys carry RoPE,
    so no index lists are kept.
    """
    name = "zipcache"
    ragged = True

    def __init__(self, config, zcfg=None, **kw):
        self.cfg = zcfg or ZipCacheConfig()
        self.quantized = self.cfg.bits_hi < 16
        _check_pack_dim(config.head_dim, (self.cfg.bits_hi, self.cfg.bits_lo))
        self.special = None
        super().__init__(config, **kw)

    def reset(self):
        super().reset()
        self.gen = torch.Generator().manual_seed(self.cfg.seed)  # probes: one draw per layer, in layer order
        self.subs = None  # ragged batch: one single-sequence ZipCache per sequence (set_padding)

    def set_padding(self, pad):
        """A ragged batch is held as B single-sequence ZipCaches, each fed its sequence without the padding: the
        probes (each cache draws from its own generator, seeded alike), saliency, split, quantization statistics and
        bytes are exactly those of the sequence run alone. Decode runs the B caches one after the other (B kernel
        calls, not one): simple and exact, not the fast path."""
        super().set_padding(pad)
        if self.pad is not None:
            self.subs = [ZipCache(self.config, self.cfg, validate=False) for _ in self.pad]  # attend validated k, v
            for sub in self.subs:
                sub.special = self.special

    def _ragged_only_per_sequence(self, what):
        if self.subs is not None:
            raise ValueError(f"zipcache: {what} of a ragged batch is per sequence; read cache.subs[b].{what}")

    def set_special_positions(self, positions):
        """Prompt positions to use as probes with probe_mode='special' (see saliency.special_positions)."""
        self.special = torch.as_tensor(positions, dtype=torch.long)
        for sub in self.subs or ():
            sub.special = self.special

    def info(self):
        c = self.cfg
        if not self.quantized:
            return "zipcache 16-bit (not quantized)"
        share = {"recent": f"{c.probe_recent:.0%}", "random": f"{c.probe_random:.0%}",
                 "recent+random": f"{c.probe_recent:.0%}+{c.probe_random:.0%}"}.get(c.probe_mode)
        return (f"zipcache {c.bits_hi}/{c.bits_lo}-bit, {c.salient_ratio:.0%} salient, {c.score} score, probes "
                f"{c.probe_mode}{f' ({share})' if share else ''}, block {c.block_size}"
                f"{', requantize' if c.requantize else ''}{', pooled stats' if c.pool_batch_stats else ''}"
                f"{f', key groups {c.k_group}' if c.k_group else ''}{f', {c.n_sink} fp16 sinks' if c.n_sink else ''}"
                f"{f', {c.n_recent} fp16 recent' if c.n_recent else ''}")

    # storage of one layer ------------------------------------------------------------------------
    def _new_state(self, B, H, D, device):
        st = _State(buf=_Growing(), v_chan=_Blocks())
        if self.quantized:
            for p in ("hi", "lo"):  # codes/value params per row, key params per block, the row table
                seg = _Segment(codes=_Growing(), params=_Blocks(), rows=_Blocks())
                seg.rows.append(rows=torch.zeros(B, 1, dtype=torch.int32, device=device))
                setattr(st, p, seg)
            if self.cfg.keep_saliency_mask:
                st.mask = _Growing()
        return st

    def _bits(self, p):
        return self.cfg.bits_hi if p == "hi" else self.cfg.bits_lo

    def _append_block(self, st, k, v, hi, lo):
        """Append one block, cut into sub-blocks of at most k_group rows per precision group when k_group > 0."""
        G, m_hi, m_lo = self.cfg.k_group, hi.shape[-1], lo.shape[-1]
        n_sub = math.ceil(max(m_hi, m_lo) / G) if G else 1
        if n_sub <= 1:
            return self._append_one_block(st, k, v, hi, lo)
        # the j-th run of consecutive salient rows and the j-th run of regular rows form sub-block j
        for h, l in zip(hi.tensor_split(n_sub, -1), lo.tensor_split(n_sub, -1)):
            sel = torch.cat([h, l], -1)                                                  # [B, H, m_j]
            idx = torch.arange(sel.shape[-1], device=k.device).expand(*sel.shape[:2], -1)
            self._append_one_block(st, _gather_tokens(k, sel), _gather_tokens(v, sel),
                                   idx[..., :h.shape[-1]], idx[..., h.shape[-1]:])

    def _append_one_block(self, st, k, v, hi, lo):
        """Quantize one block k, v [B, H, n, D] split into hi/lo indices [B, H, n_p] and append it."""
        c = self.cfg
        B, H, n, D = k.shape
        eps, pool = c.scale_eps, c.pool_batch_stats
        kf, vf = k.float(), v.float()
        # CST normalizer over all n tokens of the block, before the split: both groups share it
        chan = quant.cst_normalizer(vf, eps, dim=(0, 2) if pool else 2)                 # [Bs, H, 1, D]
        st.v_chan.append(min_cap=4, v_chan=chan.transpose(1, 2))                        # [Bs, 1, H, D]
        Bs = chan.shape[0]
        for p, idx in (("hi", hi), ("lo", lo)):
            seg, bits, m = getattr(st, p), self._bits(p), idx.shape[-1]
            Hv = H if c.v_token_scope == "head" else 1
            if m == 0:  # empty group: no rows; a zero parameter slot keeps block indices aligned
                ks = km = torch.zeros(Bs, 1, H, D, dtype=torch.float16, device=k.device)
                kc = vc = torch.zeros(B, H, 0, D * bits // 8, dtype=torch.uint8, device=k.device)
                vs = vm = torch.zeros(B, Hv, 0, dtype=torch.float16, device=k.device)
            else:
                kg, vg = _gather_tokens(kf, idx), _gather_tokens(vf, idx)              # [B, H, m, D]
                # keys: channelwise over this group's tokens of the block (and the batch, if pooled)
                codes, ks, km = quant.quantize(kg, bits, dim=(0, 2) if pool else 2, scale_eps=eps, check=False)
                kc = quant.pack(codes, bits)                                           # [B, H, m, W]
                ks, km = ks.transpose(1, 2), km.transpose(1, 2)                        # [Bs, 1, H, D]
                # values: x / c, then one (min, scale) per (token, head) or per row over all heads
                codes, vs, vm, _ = quant.quantize_cst(vg, bits, (-1,) if Hv == H else (1, -1), eps, chan=chan,
                                                      check=False)                     # attend validated k, v
                vc = quant.pack(codes, bits)
                vs, vm = vs[..., 0], vm[..., 0]                                         # [B, Hv, m]
            seg.codes.append(k_codes=kc, v_codes=vc, v_scale=vs, v_min=vm)
            seg.params.append(min_cap=4, k_scale=ks, k_min=km)
            seg.rows.append(min_cap=5, rows=torch.full((B, 1), seg.codes.n, dtype=torch.int32, device=k.device))

    def _split(self, scores):
        hi, lo = saliency.split(scores, self.cfg.salient_ratio)
        if self.cfg.lo_order == "score":  # official: the regular rows in ascending score order
            lo = lo.gather(-1, scores.gather(-1, lo).sort(dim=-1, stable=True).indices)
        return hi, lo

    def _record_mask(self, st, start, n, hi):
        """Set the 1-bit salient mask for positions [start, start+n) (bit i of byte j = position 8j + i)."""
        B, H = hi.shape[:2]
        old = st.mask["m"] if st.mask.n else torch.zeros(B, H, 0, dtype=torch.uint8, device=hi.device)
        bits = ((old[..., None] >> torch.arange(8, device=hi.device, dtype=torch.uint8)) & 1).flatten(2)[..., :start]
        bits = F.pad(bits, (0, start - bits.shape[-1]), value=1)    # fp16 sink positions count as high precision
        new = torch.zeros(B, H, n, dtype=torch.uint8, device=hi.device).scatter_(2, hi, 1)
        bits = torch.cat([bits, new], 2)
        bits = F.pad(bits, (0, -bits.shape[-1] % 8)).unflatten(2, (-1, 8))
        packed = (bits << torch.arange(8, device=hi.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
        st.mask.n = 0
        st.mask.append(min_cap=64, m=packed)

    def salient_mask(self, layer):
        """bool [B, H_kv, positions before the buffer's recent part]: which tokens were stored at bits_hi (or kept
        fp16 as sinks; needs keep_saliency_mask)."""
        self._ragged_only_per_sequence("salient_mask(layer)")
        st = self.layers[layer]
        m = st.mask["m"]
        n_pos = st.seen - st.buf.n + getattr(st, "n_sink", 0)
        return ((m[..., None] >> torch.arange(8, device=m.device, dtype=torch.uint8)) & 1).flatten(2)[..., :n_pos] > 0

    # prefill --------------------------------------------------------------------------------------
    def _prefill(self, layer, q, k, v):
        if self.subs is not None:  # ragged: sequence b's unpadded slice to its own cache; padded rows output 0
            outs = [F.pad(sub.attend(layer, q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:]), (0, 0, p, 0))
                    for b, (sub, p) in enumerate(zip(self.subs, self.pad.tolist()))]            # [1, H, T, D] each
            return _State(), torch.cat(outs)                                                     # [B, H, T, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # the output never changes
        B, H, L, D = k.shape
        st = self._new_state(B, H, D, k.device)
        if not self.quantized:  # 16 bits: everything stays in the fp16 buffer
            st.buf.append(min_cap=L + self.cfg.block_size, k=k.half(), v=v.half())
            return st, out
        c = self.cfg
        rows = saliency.probe_positions(L, c.probe_mode, c.probe_recent, c.probe_random, self.gen, self.special)
        scores = saliency.probe_scores(q, k, rows, c.score, c.norm)                     # [B, H_kv, L]
        S = min(c.n_sink, L - 1)             # sink tokens: the buffer's first S rows, never flushed (block 0 keeps
                                             # at least one prompt token, so every layer has the same layout)
        R = min(c.n_recent, L - 1 - S)       # recent prompt tokens: buffered until the first flush
        if c.n_sink:
            st.n_sink = S                    # counters only when the option is on (nbytes counts 8 B each)
        if c.n_recent:
            st.n_tail = R
        hi, lo = self._split(scores[..., S:L - R])
        self._append_block(st, k[:, :, S:L - R], v[:, :, S:L - R], hi, lo)              # the prompt = block 0
        if c.keep_saliency_mask:
            self._record_mask(st, S, L - R - S, hi)
        keep = torch.cat([torch.arange(S), torch.arange(L - R, L)]).to(k.device)        # sinks | recent tail
        buf = dict(k=k[:, :, keep].half(), v=v[:, :, keep].half())                      # [B, H_kv, S + R, D]
        if c.decode_score == "normalized":
            buf["acc"] = k.new_zeros(B, H, S + R, dtype=torch.float32)
        st.buf.append(min_cap=S + max(R, c.block_size), **buf)
        return st, out

    # decode ---------------------------------------------------------------------------------------
    def layer_view(self, layer):
        """The layout kernels.decode_attention consumes: full-capacity tensors + valid counts."""
        self._ragged_only_per_sequence("layer_view(layer)")
        st = self.layers[layer]
        if not self.quantized:
            return kernels.dense_view(st.buf["k"], st.buf["v"])

        def segment(p):
            seg = getattr(st, p)
            t, pt = seg.codes.t, seg.params.t
            return kernels.ZipSegment(self._bits(p), t["k_codes"], t["v_codes"], t["v_scale"], t["v_min"],
                                      pt["k_scale"], pt["k_min"], seg.rows.t["rows"])

        return kernels.ZipLayerView(hi=segment("hi"), lo=segment("lo"), v_chan=st.v_chan.t["v_chan"],
                                    k_buf=st.buf.t["k"], v_buf=st.buf.t["v"], n_buf=st.buf.n,
                                    n_blocks=st.v_chan.n)

    def _decode(self, layer, st, q, k, v):
        if self.subs is not None:
            return torch.cat([sub.attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1])
                              for b, sub in enumerate(self.subs)])                               # [B, H, 1, D]
        c = self.cfg
        extra = {"acc": k.new_zeros(*k.shape[:3], dtype=torch.float32)} if "acc" in st.buf.t else {}
        st.buf.append(k=k.half(), v=v.half(), **extra)
        q1 = q[:, :, 0]                                                                  # [B, H, D]
        # the Triton kernel takes fp16/bf16 queries (its dots run on fp16 tensor-core operands); an fp32 model (CPU)
        # hands it q rounded to fp16, the precision the keys are stored at anyway
        qk = q1.half() if c.kernel == "triton" and q1.dtype == torch.float32 else q1
        out, lse = kernels.decode_attention(qk, self.layer_view(layer), kernel=c.kernel, return_lse=True)
        out = out.to(q1.dtype)
        if self.quantized:
            flush = st.buf.n - getattr(st, "n_sink", 0) == c.block_size
            if c.decode_score == "normalized" or flush:
                # each buffered token's true probability under this query, summed over its group's heads
                B, H, D = q1.shape
                Hkv = k.shape[1]
                s = q1.float().reshape(B, Hkv, H // Hkv, 1, D) @ st.buf["k"].float()[:, :, None].transpose(-1, -2)
                p = torch.exp(s[..., 0, :] * D ** -0.5 - lse.view(B, Hkv, H // Hkv, 1)).sum(2)   # [B, H_kv, n_buf]
                if c.decode_score == "normalized":
                    st.buf["acc"].add_(p)
            if flush:
                self._flush(st, p)
        return out[:, :, None]                                                           # [B, H, 1, D]

    def _flush(self, st, p_last):
        """Compress the full buffer into a new block with its own statistics and split."""
        c, N, S = self.cfg, self.cfg.block_size, getattr(st, "n_sink", 0)                 # buffer rows [S, S + N) are compressed
        if c.decode_score == "normalized":
            # decode row j was seen by N - j queries; the R prompt-tail rows in front by all N - R decode queries
            R = getattr(st, "n_tail", 0)
            score = st.buf["acc"][..., S:] / (N - torch.arange(N, device=p_last.device).clamp(min=R))
        else:
            score = p_last[..., S:]                                              # official: the last query's attention
        hi, lo = self._split(score)
        start = st.seen + 1 - N  # position of the block's first token (seen is updated after this step)
        k, v = st.buf["k"][:, :, S:], st.buf["v"][:, :, S:]                     # [B, H_kv, N, D] fp16
        if c.keep_saliency_mask:
            self._record_mask(st, start, N, hi)
        if c.requantize:
            self._requantize(st, k, v, hi, lo)
        else:
            self._append_block(st, k, v, hi, lo)
        st.buf.n = S
        if hasattr(st, "n_tail"):
            st.n_tail = 0

    def _dequantize(self, st, p):
        """One segment -> K̂, V̂ fp32 [B, H, n, D] in storage order, each block with its own parameters."""
        seg, bits = getattr(st, p), self._bits(p)
        n = seg.codes.n
        rows = seg.rows["rows"][0].long()          # row counts are equal for every sequence
        blk = torch.searchsorted(rows, torch.arange(n, device=rows.device), right=True) - 1
        a = seg.params["k_scale"][:, blk].float().transpose(1, 2)                        # [Bs, H, n, D]
        mu = seg.params["k_min"][:, blk].float().transpose(1, 2)
        ch = st.v_chan["v_chan"][:, blk].float().transpose(1, 2)
        x = quant.unpack(seg.codes["k_codes"], bits).float()
        y = quant.unpack(seg.codes["v_codes"], bits).float()
        sig, nu = seg.codes["v_scale"].float()[..., None], seg.codes["v_min"].float()[..., None]
        return a * x + mu, ch * (sig * y + nu)

    def _requantize(self, st, k, v, hi, lo):
        """Official behaviour: dequantize the cache, append the new block's raw fp16 tokens k, v [B, H, N, D] to each
        precision group (hi/lo indices into the block), and quantize each merged group once, as one block."""
        (Kh, Vh), (Kl, Vl) = self._dequantize(st, "hi"), self._dequantize(st, "lo")
        kf, vf = k.float(), v.float()
        K = torch.cat([Kh, _gather_tokens(kf, hi), Kl, _gather_tokens(kf, lo)], 2)      # [B, H, n_all, D]
        V = torch.cat([Vh, _gather_tokens(vf, hi), Vl, _gather_tokens(vf, lo)], 2)
        B, H, n, D = K.shape
        nh = Kh.shape[2] + hi.shape[-1]
        new = self._new_state(B, H, D, K.device)
        idx = torch.arange(n, device=K.device).expand(B, H, -1)
        self._append_block(new, K, V, idx[..., :nh], idx[..., nh:])
        st.hi, st.lo, st.v_chan = new.hi, new.lo, new.v_chan

    def kv(self, layer):
        """(K̂, V̂) fp32 [B, H_kv, n, D] as decode attention reads them: hi | lo | fp16 buffer (tests, analysis)."""
        self._ragged_only_per_sequence("kv(layer)")
        st = self.layers[layer]
        parts = [self._dequantize(st, p) for p in ("hi", "lo")] if self.quantized else []
        parts.append((st.buf["k"].float(), st.buf["v"].float()))
        return torch.cat([a for a, _ in parts], 2), torch.cat([b for _, b in parts], 2)

    def _held(self, st):
        return st.seen

    def nbytes(self, allocated=False):
        if self.subs is not None:
            return sum(sub.nbytes(allocated) for sub in self.subs)
        return super().nbytes(allocated)

    def dense_nbytes(self):
        if self.subs is not None:
            return sum(sub.dense_nbytes() for sub in self.subs)
        return super().dense_nbytes()

    def _all_paper_terms(self):
        if self.subs is not None:
            return [t for sub in self.subs for t in sub._all_paper_terms()]
        return super()._all_paper_terms()

    def _paper_terms(self, st):
        if not self.quantized:
            return 0, 0, 0
        qel = bits = par = 0
        Bs, nb, H, D = st.v_chan["v_chan"].shape
        for p in ("hi", "lo"):
            seg = getattr(st, p)
            B, _, n, _ = seg.codes["k_codes"].shape
            e = 2 * B * H * n * D
            qel, bits = qel + e, bits + e * self._bits(p)
            par += 2 * seg.codes["v_scale"].numel() + 2 * seg.params["k_scale"].numel()
        return qel, bits, par + st.v_chan["v_chan"].numel()


def paper_formula_ratio(b, l, hd, r=0.6, bits=(4, 2), P=None):
    """The paper's compression ratio: 2*b*l*hd*16 / (2*b*l*hd*k_avg + 16*P), k_avg = r*hi + (1-r)*lo,
    P = number of fp16 quantization parameters (default 5*hd + 2*b*l: two key (min, scale) vectors, the V normalizer,
    and a (min, scale) per token). Reproduces 4.98x (r=0.6) and 4.69x (r=0.7) at b=8, l=840, hd=4096."""
    hi, lo = (bits, bits) if isinstance(bits, int) else bits
    k_avg = r * hi + (1 - r) * lo
    P = 5 * hd + 2 * b * l if P is None else P
    return 2 * b * l * hd * 16 / (2 * b * l * hd * k_avg + 16 * P)


# -----------------------------------------------------------------------------
# KIVI

class KIVICache(Cache):
    """KIVI: keys quantized per channel in groups of G tokens, values per token in groups of G channels.

    Keys wait in fp16 until R have accumulated, then are quantized as one chunk (old codes untouched); values keep a
    sliding fp16 window of the R newest, and each step quantizes the one that leaves it. Decode attention
    dequantizes, then runs SDPA (KIVI's fused kernels are a CUDA affair).
    """
    name = "kivi"

    def __init__(self, config, bits=2, group=32, residual=128, **kw):
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
        super().__init__(config, **kw)

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
        st = _State(kq=_Growing(), kp=_Growing(), kf=_Growing(), vq=_Growing(), vf=_Growing())
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

class H2OCache(Cache):
    """Heavy-hitter oracle: keep the rec newest tokens plus the hh with the largest accumulated attention, evict the
    rest for good. hh = floor(heavy_ratio * L), rec = floor(recent_ratio * L), fixed at the prefill; slots
    [B, H_kv, hh + rec + 1, D] with an int32 position each (-1 = free). heavy + recent >= 1 never evicts."""
    name = "h2o"

    def __init__(self, config, heavy_ratio=0.1, recent_ratio=0.1, **kw):
        _check_ratio("heavy_ratio", heavy_ratio)
        _check_ratio("recent_ratio", recent_ratio)
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio
        self.unbounded = heavy_ratio + recent_ratio >= 1.0
        super().__init__(config, **kw)

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
        st = _State(slots=_Growing())
        st.slots.append(min_cap=hh + rec + 1, k=_gather_tokens(k, keep).half(), v=_gather_tokens(v, keep).half(),
                        score=torch.gather(scores, 2, keep), posn=keep.to(torch.int32))
        st.slots.t["posn"][:, :, st.slots.n:] = -1                                       # free slots
        return st, out

    def _decode(self, layer, st, q, k, v):
        t = st.seen  # position of the new token
        s = st.slots
        if self.unbounded:
            s.append(k=k.half(), v=v.half(), score=k.new_zeros(k.shape[:3], dtype=torch.float32),
                     posn=torch.full(k.shape[:3], t, dtype=torch.int32, device=k.device))
        else:  # write into the free slot (the one holding position -1)
            free = s.t["posn"].argmin(-1, keepdim=True)                                  # [B, H_kv, 1]
            s.t["k"].scatter_(2, free[..., None].expand_as(k), k.half())
            s.t["v"].scatter_(2, free[..., None].expand_as(v), v.half())
            s.t["score"].scatter_(2, free, 0.0)
            s.t["posn"].scatter_(2, free, t)
            s.n += 1
        width, valid = self._valid(s)                                                    # [B, H_kv, S]
        K, V, posn = s.t["k"][:, :, :width], s.t["v"][:, :, :width], s.t["posn"][:, :, :width]
        g = q.shape[1] // k.shape[1]
        out, p = _attention(q, K, V, valid.repeat_interleave(g, 1)[:, :, None, :])
        s.t["score"][:, :, :width] += saliency.group_sum(p[:, :, 0], k.shape[1])         # accumulated attention
        hh, rec = self.budget
        if not self.unbounded and s.n > hh + rec:  # evict the lowest score among the non-recent tokens
            cand = valid & (posn < t + 1 - rec)
            e = s.t["score"][:, :, :width].masked_fill(~cand, float("inf")).argmin(-1, keepdim=True)
            s.t["posn"].scatter_(2, e, -1)
            s.n -= 1
        return out.to(q.dtype)

    def _valid(self, s):
        width = s.n if self.unbounded else s.t["posn"].shape[2]  # bounded: every slot, the free one masked
        return width, s.t["posn"][:, :, :width] >= 0

    def kept_positions(self, layer):
        """int32 [B, H_kv, n] positions currently held, in slot order."""
        s = self.layers[layer].slots
        width, valid = self._valid(s)
        return s.t["posn"][:, :, :width][valid].view(*valid.shape[:2], -1)

    def kv(self, layer):
        """(K, V) fp32 [B, H_kv, n, D] of the kept tokens (slot order)."""
        s = self.layers[layer].slots
        width, valid = self._valid(s)
        B, H = valid.shape[:2]
        K = s.t["k"][:, :, :width][valid].view(B, H, -1, s.t["k"].shape[-1]).float()
        V = s.t["v"][:, :, :width][valid].view(B, H, -1, s.t["v"].shape[-1]).float()
        return K, V

    def _held(self, st):
        return st.slots.n

    def _paper_terms(self, st):
        # eviction as "compression": tokens seen over tokens kept, in fp16 (scores and positions ignored)
        B, H, D = self.shape
        return 2 * B * H * D * st.seen, 16 * 2 * B * H * D * st.slots.n, 0


# -----------------------------------------------------------------------------
# MiKV

class MiKVCache(Cache):
    """MiKV: accumulated attention from the full prefill matrix picks the salient tokens (plus the recent ones);
    K and V are quantized per token at bits_hi (salient) / bits_lo. Decode is eager: every step dequantizes the whole
    cache and materializes the attention row; every block_size steps the fp16 buffer is split by the attention its
    tokens accumulated and quantized. Nothing is ever re-classified. (The optional channel balancer is not built.)"""
    name = "mikv"

    def __init__(self, config, salient_ratio=0.6, recent_ratio=0.1, bits_hi=4, bits_lo=2, block_size=100, **kw):
        _check_ratio("salient_ratio", salient_ratio)
        _check_ratio("recent_ratio", recent_ratio)
        _check_bits("bits_hi", bits_hi)
        _check_bits("bits_lo", bits_lo)
        if (bits_hi == 16) != (bits_lo == 16):
            raise ValueError("MiKV: 16 bits means 'not quantized'; set both bits to 16 or both below")
        _check_pack_dim(config.head_dim, (bits_hi, bits_lo))
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.r, self.recent_ratio, self.bits, self.N = salient_ratio, recent_ratio, dict(hi=bits_hi, lo=bits_lo), \
            block_size
        self.quantized = bits_hi < 16
        super().__init__(config, **kw)

    def info(self):
        return f"mikv {self.bits['hi']}/{self.bits['lo']}-bit, {self.r:.0%} salient, recent {self.recent_ratio:.0%}"

    def _append(self, st, k, v, hi, lo):
        for p, idx in (("hi", hi), ("lo", lo)):
            bits, m = self.bits[p], idx.shape[-1]
            if m == 0:
                continue
            kc, ks, km = quant.quantize(_gather_tokens(k, idx), bits, dim=-1)          # per token: s [B, H, m, 1]
            vc, vs, vm = quant.quantize(_gather_tokens(v, idx), bits, dim=-1)
            getattr(st, p).append(k_codes=quant.pack(kc, bits), v_codes=quant.pack(vc, bits),
                                  k_scale=ks[..., 0], k_min=km[..., 0], v_scale=vs[..., 0], v_min=vm[..., 0])

    def _prefill(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        B, H, L, D = k.shape
        st = _State(hi=_Growing(), lo=_Growing(), buf=_Growing())
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
        for p in ("hi", "lo"):
            s = getattr(st, p)
            if s.n:
                K.append(quant.dequantize(quant.unpack(s["k_codes"], self.bits[p]), s["k_scale"][..., None],
                                          s["k_min"][..., None]))
                V.append(quant.dequantize(quant.unpack(s["v_codes"], self.bits[p]), s["v_scale"][..., None],
                                          s["v_min"][..., None]))
        K.append(st.buf["k"].float())
        V.append(st.buf["v"].float())
        return torch.cat(K, 2), torch.cat(V, 2)

    def _decode(self, layer, st, q, k, v):
        extra = {"acc": k.new_zeros(k.shape[:3], dtype=torch.float32)} if "acc" in st.buf.t else {}
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
        for p in ("hi", "lo"):
            s = getattr(st, p)
            if s.n:
                e = 2 * s["k_codes"].shape[0] * s["k_codes"].shape[1] * s.n * self.shape[2]
                qel, bits, par = qel + e, bits + e * self.bits[p], par + 4 * s["k_scale"].numel()
        return qel, bits, par


# -----------------------------------------------------------------------------
# the factory

_ALIASES = {"high_bits": "bits_hi", "low_bits": "bits_lo", "recompress_every": "block_size",
            "probe_strategy": "probe_mode"}


def make_cache(name, config, **options):
    """Build a cache by name (dense, zipcache, kivi, h2o, mikv). Options set to None are ignored, so a command line
    can pass every flag. Accepted: zipcache: any ZipCacheConfig field, paper, official, bits (both groups), probe_ratio
    (split over the probe kinds of probe_mode), and the aliases high_bits, low_bits, recompress_every,
    probe_strategy; kivi: bits, group, residual; h2o: heavy_ratio, recent_ratio, keep_ratio (= heavy + recent,
    split evenly); mikv: salient_ratio, recent_ratio, bits / bits_hi / bits_lo, block_size. All: validate."""
    opts = {_ALIASES.get(k, k): v for k, v in options.items() if v is not None}
    common = {k: opts.pop(k) for k in ("validate",) if k in opts}
    if name == "latent" or getattr(config, "attn", "gqa") in ("cla", "mla", "clla"):
        return _make_shared_cache(name, config, {**opts, **common})   # CLACache / LatentCache (end of this file)

    def take(allowed):
        unknown = sorted(set(opts) - set(allowed))
        if unknown:
            raise ValueError(f"option(s) {unknown} do not apply to --cache {name}; it accepts {sorted(allowed)}")
        return opts

    if name == "dense":
        return DenseCache(config, **take(()), **common)
    both = sorted({"bits_hi", "bits_lo"} & set(opts))
    # bits sets both groups: a high_bits/low_bits beside it would be silently overwritten
    if "bits" in opts and both and name in ("zipcache", "mikv"):
        alias = {"bits_hi": "high_bits", "bits_lo": "low_bits"}
        raise ValueError(f"bits={opts['bits']} sets both groups and conflicts with "
                         f"{', '.join(f'{alias[b]}={opts[b]}' for b in both)}; pass either bits or high_bits/low_bits")
    if name == "zipcache":
        official, paper = opts.pop("official", False), opts.pop("paper", False)
        if "bits" in opts:
            opts["bits_hi"] = opts["bits_lo"] = opts.pop("bits")
        if "probe_ratio" in opts:
            pr, mode = opts.pop("probe_ratio"), opts.get("probe_mode", "recent+random")
            _check_ratio("probe_ratio", pr)
            if pr == 0:
                raise ValueError("probe_ratio=0 selects no probe queries; use a fraction in (0, 1] (default 0.1), "
                                 "or --probe_strategy all for the exact attention")
            opts["probe_recent"] = pr / 2 if mode == "recent+random" else pr
            opts["probe_random"] = pr / 2 if mode == "recent+random" else pr
        base = ZipCacheConfig().official() if official else ZipCacheConfig().paper() if paper else ZipCacheConfig()
        return ZipCache(config, replace(base, **take([f.name for f in fields(ZipCacheConfig)])), **common)
    if name == "kivi":
        return KIVICache(config, **take(("bits", "group", "residual")), **common)
    if name == "h2o":
        if "keep_ratio" in opts:
            kr = opts.pop("keep_ratio")
            _check_ratio("keep_ratio", kr)
            if kr == 0:
                raise ValueError("keep_ratio=0 keeps no tokens at all; use a fraction in (0, 1], e.g. 0.2")
            opts["heavy_ratio"] = opts["recent_ratio"] = kr / 2
        return H2OCache(config, **take(("heavy_ratio", "recent_ratio")), **common)
    if name == "mikv":
        if "bits" in opts:
            opts["bits_hi"] = opts["bits_lo"] = opts.pop("bits")
        return MiKVCache(config, **take(("salient_ratio", "recent_ratio", "bits_hi", "bits_lo", "block_size")),
                         **common)
    raise ValueError(f"unknown cache {name!r}; use one of dense, zipcache, kivi, h2o, mikv")


# =============================================================================
# CLLA section (the CLLA engineer's; the README): caches for the cross-layer and latent attention variants.
#   CLACache     attn="cla": one fp16 K/V store per group of share_factor layers
#   LatentCache  attn="mla"/"clla": the latent c_KV and the rope key k_R, once per group, fp16 or packed int8/int4
# make_cache routes to them from the config (attn), so `--cache dense` does the right thing for every variant.
# The layer -> group rule is model.LayerRole's (cache.py does not import model.py): layer i is in group i // s and
# produces iff i % s == 0; the last group may be shorter. A test checks nbytes() against model.kv_bits_per_token.

class _Rows(_Growing):
    dim = 1  # [B, CAP, ...] token rows (no head axis: one latent per token)


def _causal_tail_mask(T, n, device):
    """Query i of a T-token chunk sits at position n - T + i and sees keys j <= n - T + i. None when T == 1."""
    if T == 1:
        return None
    return torch.arange(n, device=device)[None, :] <= torch.arange(n - T, n, device=device)[:, None]   # [T, n]


class CLACache(DenseCache):
    """Cross-layer attention (Brandon et al. 2024): the producer (first layer of a group) appends its k, v; the
    consumers are handed the same k, v by the model and only read the group's store. Stored once: the cache is
    1/share_factor of a DenseCache with the same KV heads."""
    name = "cla"
    ragged = False

    def __init__(self, config, dtype=torch.float16, **kw):
        self.share = config.share_factor
        super().__init__(config, dtype=dtype, **kw)

    def _producer(self, layer):
        return layer - layer % self.share

    def _prefill(self, layer, q, k, v):
        if layer == self._producer(layer):
            return super()._prefill(layer, q, k, v)
        prod = self.layers[self._producer(layer)]
        if prod is None or prod.kv.n != q.shape[2]:
            raise ValueError(f"cla: layer {layer} attended before its producer layer {self._producer(layer)} wrote "
                             f"this chunk; run the layers in order")
        # the consumer's state shares the producer's store (nbytes counts it once)
        return _State(kv=prod.kv), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def _decode(self, layer, st, q, k, v):
        if layer == self._producer(layer):
            return super()._decode(layer, st, q, k, v)
        K, V = st.kv["k"].to(q.dtype), st.kv["v"].to(q.dtype)                      # the group's K/V, already updated
        mask = _causal_tail_mask(q.shape[2], st.kv.n, q.device)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)

    def nbytes(self, allocated=False):
        # producers: their store and counters; consumers: only their `seen` counter (8 B)
        return sum(_state_bytes(s, allocated) if i == self._producer(i) else 8
                   for i, s in enumerate(self.layers) if s is not None)

    def info(self):
        return f"cla (share_factor {self.share}, {self.dtype})"


class LatentCache:
    """The cache of MLA and CLLA (README): per token, the latent c [d_c] and the rope key k_R [d_r], stored
    once per slot. Slots: latent+rope: one per group; latent_only: + one k_R slot per layer; rope_only: one k_R slot
    per group and one latent slot per layer. kv_bits=16: fp16 rows [B, L, d]; 8/4: packed codes [B, L, d*b/8] (planar,
    quant.pack) + fp16 scale and min [B, L, n_groups], the same quantizer as the model's fake-quant, so the
    bytes read back reproduce the training-time tensor exactly.

    The model calls (it never hands over weights, the cache never sees any):
        write(layer, c, k_R)                    owners only; raw (unquantized) tensors [B, T, d_c], [B, T, d_r] or None
        length(layer)                           tokens in the slots this layer reads
        latent(layer, dtype) -> (C, R)          dequantized history [B, L, d_c], [B, L, d_r] (reference)
        attend_latent(layer, q_lat, q_R, scale) absorbed attention -> z [B, H, T, d_c]
    plus pos, len(), nbytes(), reset(), ratios(), dense_nbytes(), info() like every cache.
    A decode step (T = 1) never dequantizes the history: attend_codes folds the scales and mins into the products
    with the integer codes (README "CLLA"); prefill chunks and the tests use attend_reference.
    """
    name = "latent"

    def __init__(self, config, dtype=torch.float16, validate=True):
        c = self.config = config
        if c.attn not in ("mla", "clla"):
            raise ValueError(f"LatentCache is for attn='mla' or 'clla', not {c.attn!r}; use --cache dense")
        self.dtype, self.validate = dtype, validate           # dtype: unquantized rows (fp16; float32 for tests)
        self.bits, self.group, self.quant_rope = c.kv_bits, c.kv_quant_group, c.kv_quant_rope
        self.max_seq_len, self.n_layers = c.max_seq_len, c.n_layers
        self.d = {"c": c.kv_lora_rank, "r": c.qk_rope_dim}
        s = c.share_factor if c.attn == "clla" else 1
        mode = c.share_mode if c.attn == "clla" else "latent+rope"
        # layer -> slot keys; a layer writes the slots named after itself
        self.slot_of = [(("c", i if mode == "rope_only" else i - i % s), ("r", i if mode == "latent_only" else i - i % s))
                        for i in range(c.n_layers)]
        # slot (and (c slot, r slot) pair) -> the last layer that reads it
        self.last_reader = {key: i for i, keys in enumerate(self.slot_of) for key in (*keys, keys)}
        self.reset()

    def reset(self):
        self.slots = {key: _Rows() for keys in self.slot_of for key in keys}
        self.batch = None
        # decode scratch: a slot's codes unpacked to the compute dtype, shared by the layers of a group within one
        # step and dropped by the last layer that reads it, so nothing outlives the forward (not cache storage)
        self.scratch = {}

    # ---- storage
    def _quantized(self, kind):
        return self.bits < 16 and (kind == "c" or self.quant_rope)

    def _g(self, kind):
        return self.d[kind] if self.group == "token" else min(self.group, self.d[kind])

    def write(self, layer, c, k_r):
        """Append this layer's own latent and/or rope key, [B, T, d_c] / [B, T, d_r] (None = not its own)."""
        for kind, x in (("c", c), ("r", k_r)):
            key = self.slot_of[layer][kind == "r"]
            if x is None:
                continue
            if key[1] != layer:
                raise ValueError(f"latent cache: layer {layer} wrote a {kind} entry it does not own (its group's "
                                 f"producer layer {key[1]} does); the cache's share settings differ from the model's")
            store = self.slots[key]
            if x.dim() != 3 or x.shape[-1] != self.d[kind]:
                raise ValueError(f"latent cache: expected {kind} [B, T, {self.d[kind]}], got {tuple(x.shape)}")
            if self.batch is not None and x.shape[0] != self.batch:
                raise ValueError(f"latent cache: batch {x.shape[0]} differs from the cached {self.batch}; call "
                                 f"cache.reset() before a new batch")
            if store.n + x.shape[1] > self.max_seq_len:
                raise ValueError(f"latent cache: {store.n} cached + {x.shape[1]} new tokens exceed max_seq_len="
                                 f"{self.max_seq_len}; shorten the prompt or lower --max_new_tokens")
            if self.validate:
                quant.check_finite(x, f"latent cache layer {layer} {kind}", torch.finfo(self.dtype).max)
            self.batch = x.shape[0]
            if not self._quantized(kind):
                store.append(min_cap=64, x=x.detach().to(self.dtype))
            else:  # the README: asymmetric min/scale per token or per g channels, fp16 parameters
                codes, scale, mn = quant.quantize(x.detach().unflatten(-1, (-1, self._g(kind))), self.bits, dim=-1,
                                                  check=not self.validate)             # else checked above
                store.append(min_cap=64, codes=quant.pack(codes.flatten(-2), self.bits),      # [B, T, d*b/8]
                             scale=scale.squeeze(-1), mn=mn.squeeze(-1))                        # [B, T, n_grp]

    def _read(self, key, dtype):
        store, kind = self.slots[key], key[0]
        if not self._quantized(kind):
            return store["x"].to(dtype)
        codes = quant.unpack(store["codes"], self.bits).unflatten(-1, (-1, self._g(kind)))  # [B, L, n_grp, g]
        return quant.dequantize(codes, store["scale"][..., None], store["mn"][..., None], dtype).flatten(-2)

    def length(self, layer):
        return min(self.slots[key].n for key in self.slot_of[layer])

    def latent(self, layer, dtype=torch.float32):
        """(C [B, L, d_c], R [B, L, d_r]): the dequantized history this layer attends over."""
        kc, kr = self.slot_of[layer]
        if self.slots[kc].n != self.slots[kr].n:
            raise ValueError(f"latent cache: layer {layer} reads {self.slots[kc].n} latents but "
                             f"{self.slots[kr].n} rope keys; its producer has not written this chunk yet")
        return self._read(kc, dtype), self._read(kr, dtype)

    def attend_latent(self, layer, q_lat, q_r, scale):
        """Absorbed attention: q_lat [B, H, T, d_c] (= q_C W_UK), q_r [B, H, T, d_r] (RoPE applied) ->
        z [B, H, T, d_c] = softmax((q_lat.C + q_r.R) * scale) @ C, causal within a T-token chunk. MQA over one latent
        'head' with key width d_c + d_r and value width d_c; the model applies W_UV to z. A single-token decode step
        takes the folded path (attend_codes) over the stored codes; longer chunks, the dequantize-everything one."""
        if q_lat.shape[2] == 1:
            return self.attend_codes(layer, q_lat, q_r, scale)
        return self.attend_reference(layer, q_lat, q_r, scale)

    def attend_reference(self, layer, q_lat, q_r, scale):
        """attend_latent by dequantizing the whole history and one SDPA: the reference for every T."""
        C, R = self.latent(layer, q_lat.dtype)                                          # [B, L, d_c], [B, L, d_r]
        k = torch.cat([C, R], dim=-1).unsqueeze(1)                                      # [B, 1, L, d_c + d_r]
        mask = _causal_tail_mask(q_lat.shape[2], C.shape[1], q_lat.device)
        return F.scaled_dot_product_attention(torch.cat([q_lat, q_r], dim=-1), k, C.unsqueeze(1), attn_mask=mask,
                                              scale=scale, enable_gqa=True)

    def _codes(self, key, dtype, layer):
        """_unpacked(key, dtype), computed once per decode step for all the layers of a group that read the slot and
        dropped by the last of them: a working buffer of one forward, like an activation, not stored cache bytes."""
        tag = (self.slots[key].n, dtype)
        hit = self.scratch.pop(key, None)
        out = hit[1] if hit is not None and hit[0] == tag else self._unpacked(key, dtype)
        if layer != self.last_reader[key]:
            self.scratch[key] = (tag, out)
        return out

    def _unpacked(self, key, dtype):
        """A slot as (x [B, n_grp, L, g] in `dtype`, scale, mn [B, n_grp, 1, L] or None): the integer codes of a
        quantized slot (x_hat = scale*x + mn; codes < 256 are exact in any float dtype), or the stored rows (scale =
        mn = None). Groups go first so that each per-group product below is one batched matmul; with per-token
        scales (one group) that transpose is free."""
        store, kind = self.slots[key], key[0]
        if not self._quantized(kind):
            return store["x"].to(dtype).unsqueeze(1), None, None                       # [B, 1, L, d]
        packed = store["codes"]                                                          # [B, L, d*b/8] uint8
        B, L, W = packed.shape
        if self.bits == 4:  # quant.unpack less one shift: byte j holds channels j (low nibble) and j + d/2 (high)
            packed = torch.cat([packed & 15, packed >> 4], dim=-1)                     # [B, L, d] uint8
        x = packed.to(dtype)
        x = x.view(B, L, -1, self._g(kind)).transpose(1, 2)                            # [B, n_grp, L, g]
        s, m = (store[n].to(dtype).mT.unsqueeze(2) for n in ("scale", "mn"))          # [B, n_grp, 1, L]
        return x, s, m

    @staticmethod
    def _scores(q, x, s, m):
        """q [B, n_grp, H, g], a slot (x, s, m) of _codes -> q . x_hat [B, H, L] with the scales folded in, as
        kernels.py does for ZipCache keys: q_g . (s x + m) = s (q_g . x) + m sum(q_g), summed over the groups."""
        dot = q @ x.mT                                                                   # [B, n_grp, H, L]
        if s is not None:
            dot = torch.addcmul(q.sum(-1, keepdim=True) * m, dot, s)                    # s, m: [B, n_grp, 1, L]
        return dot.sum(1) if dot.shape[1] > 1 else dot.squeeze(1)                        # [B, H, L]

    def attend_codes(self, layer, q_lat, q_r, scale):
        """Absorbed decode (T = 1) straight over the stored int4/int8 codes: the dequantized history is never built
        (the codes are only converted to q's dtype).
        Scores as in _scores; values z_g = sum_t p_t (s_tg x_tg + m_tg) = (p * s_g) @ x_g + p @ m_g per latent group.
        Absorption: DeepSeek-V2 §2.1; the int4 latent: CLLA (arXiv 2410.15252). Equals attend_reference (a test)."""
        kc, kr = self.slot_of[layer]
        if self.slots[kc].n != self.slots[kr].n:
            self.latent(layer)                                                           # its one clear error
        B, H, _, d_c = q_lat.shape
        dt = q_lat.dtype
        # the one-matrix form divides by the scale (>= 2^-14): m/s can pass fp16's 65504, so fp32/fp64 only
        if self.group == "token" and self._quantized("c") and self._quantized("r") and dt.itemsize >= 4:
            return self._attend_tokenwise(layer, q_lat, q_r, scale)
        xc, sc, mc = self._codes(kc, dt, layer)                                          # [B, G_c, L, g_c]
        xr, sr, mr = self._codes(kr, dt, layer)                                          # [B, G_r, L, g_r]
        qc = q_lat.view(B, H, xc.shape[1], -1).transpose(1, 2)                          # [B, G_c, H, g_c]
        qr = q_r.view(B, H, xr.shape[1], -1).transpose(1, 2)                            # [B, G_r, H, g_r]
        s = (self._scores(qc, xc, sc, mc) + self._scores(qr, xr, sr, mr)) * scale       # [B, H, L]
        p = s.float().softmax(-1).to(dt).unsqueeze(1)                                    # [B, 1, H, L], fp32 softmax
        if sc is None:
            z = p @ xc                                                                   # [B, 1, H, d_c]
        else:
            z = ((p * sc) @ xc).add_(p @ mc.mT)                                          # [B, G_c, H, g_c]
        return z.transpose(1, 2).reshape(B, H, 1, d_c)                                   # [B, H, 1, d_c]

    def _attend_tokenwise(self, layer, q_lat, q_r, scale):
        """attend_codes when the latent and k_R both have one (scale, min) per token (the clla-quant preset): the two
        slots and both min terms become one key matrix, built once per step for the group (scratch, as _codes):
            q_lat.c_hat + q_r.r_hat = s_c * ([q_lat, q_r, sum q_lat, sum q_r] . [x_c, x_r s_r/s_c, m_c/s_c, m_r/s_c])
        so a step is one matmul for the scores and one for the values (its m_c/s_c column gives p @ m_c)."""
        B, H, _, d_c = q_lat.shape
        kc, kr = self.slot_of[layer]
        key, tag = ("cr", kc, kr), (self.slots[kc].n, q_lat.dtype)
        hit = self.scratch.pop(key, None)
        if hit is not None and hit[0] == tag:
            X, sc = hit[1]
        else:
            xc, sc, mc = self._unpacked(kc, q_lat.dtype)                               # [B, 1, L, d_c], [B, 1, 1, L]
            xr, sr, mr = self._unpacked(kr, q_lat.dtype)                               # [B, 1, L, d_r]
            X = torch.cat([xc, xr * (sr / sc).mT, (mc / sc).mT, (mr / sc).mT], -1)   # [B, 1, L, d_c + d_r + 2]
        if layer != self.last_reader[kc, kr]:                                          # another layer reads this pair
            self.scratch[key] = (tag, (X, sc))
        q = torch.cat([q_lat, q_r, q_lat.sum(-1, keepdim=True), q_r.sum(-1, keepdim=True)], -1)  # [B, H, 1, d+2]
        s = (q.view(B, 1, H, -1) @ X.mT) * (sc * scale)                                # [B, 1, H, L]
        p = s.float().softmax(-1).to(q_lat.dtype)                                      # fp32 softmax
        zm = (p * sc) @ X                                                              # [B, 1, H, d_c + d_r + 2]
        z = zm[..., :d_c] + zm[..., -2:-1]                                             # sum_t p s x + sum_t p m_c
        return z.view(B, H, 1, d_c)                                                    # [B, H, 1, d_c]

    # ---- the common cache interface
    @property
    def pos(self):
        """Tokens fully processed: every slot is written once per forward, so the least-filled one says."""
        return min(s.n for s in self.slots.values())

    def __len__(self):
        return self.pos

    def nbytes(self, allocated=False):
        """Codes, fp16 scales/mins, fp16 rows (used part; allocated=True: capacity) + 8 B per slot counter."""
        return sum(s.nbytes(allocated) for s in self.slots.values())

    def dense_nbytes(self):
        """An fp16 MHA cache of the same width: K and V of n_heads x head_dim per layer (the '% of MHA' reference)."""
        c = self.config
        return 4 * (self.batch or 0) * c.n_heads * c.head_dim * c.n_layers * self.pos

    def ratios(self):
        """real: MHA bytes / nbytes() (counters included); paper: the same per token without counters."""
        nb, counters = self.nbytes(), 8 * len(self.slots)
        return dict(real=self.dense_nbytes() / nb if nb else 1.0,
                    paper=self.dense_nbytes() / (nb - counters) if nb > counters else 1.0)

    def info(self):
        c = self.config
        share = f", {c.share_mode} s={c.share_factor}" if c.attn == "clla" else ""
        q = (f"int{self.bits} {self.group}" + ("" if self.quant_rope else ", k_R fp16")) if self.bits < 16 \
            else str(self.dtype).removeprefix("torch.")
        return f"latent ({c.attn}{share}, {q})"


def _make_shared_cache(name, config, opts):
    """make_cache for attn = cla / mla / clla: these store K/V (or the latent) once per group of layers, which only
    CLACache / LatentCache know how to do. The precision of a latent cache comes from the config (kv_bits)."""
    attn = getattr(config, "attn", "gqa")
    if attn in ("mla", "clla") and name in ("dense", "latent"):
        cls = LatentCache
    elif attn == "cla" and name in ("dense", "cla"):
        cls = CLACache
    else:
        raise ValueError(f"--cache {name} does not apply to attn={attn!r}: "
                         + ("the latent variants cache c_KV and k_rope, use --cache dense (a LatentCache; the "
                            "checkpoint's kv_bits sets its precision)" if attn in ("mla", "clla") else
                            "CLA shares K/V across layers, use --cache dense (a CLACache)" if attn == "cla" else
                            "the latent cache is for attn='mla' or 'clla'"))
    unknown = sorted(set(opts) - {"validate", "dtype"})
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to the {cls.name} cache; it accepts ['dtype', 'validate']")
    return cls(config, **opts)
