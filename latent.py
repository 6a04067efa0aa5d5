"""
The caches of the cross-layer and latent attention variants (README "CLLA"), and their KV accounting:

    CLACache            fp16 K/V stored once per group of layers, for attn="cla" models (cross-layer attention)
    LatentCache         the latent c_KV and rope key k_R of MLA / CLLA models, fp16 or packed int8/int4
    kv_bits_per_token   what a model's cache stores per token by formula, and kv_ratio: that against fp16 MHA

Each variant needs its own cache (generate.make_cache routes "dense" to it): a layer of a group reads what its
producer wrote.
"""
import torch
import torch.nn.functional as F

import quant
from cache import DenseCache, DenseState, Store, _causal_tail_mask
from model import LATENT, LayerRole


# -----------------------------------------------------------------------------
# the formula

def kv_bits_per_token(cfg):
    """Bits the KV cache stores per token over all layers, scales and mins included.

    Unquantized entries count 16 bits (fp16/bf16 cache). Quantized ones: b bits per element plus an fp16 scale and an
    fp16 min (32 bits) per group; k_rope in groups of min(g, d_r), or 16 bits if kv_quant_rope is off.
    """
    roles = [LayerRole(cfg, i) for i in range(cfg.n_layers)]
    if cfg.attn not in LATENT:                            # mha/gqa/mqa, cla: K and V of n_kv heads, producers only
        return sum(2 * cfg.n_kv_heads * cfg.head_dim * 16 for r in roles if r.own_latent)

    def bits(d, quantized):
        if cfg.kv_bits == 16 or not quantized:
            return 16 * d
        g = d if cfg.kv_quant_group == "token" else min(cfg.kv_quant_group, d)
        return d * cfg.kv_bits + 32 * (d // g)

    c, r = bits(cfg.kv_lora_rank, True), bits(cfg.qk_rope_dim, cfg.kv_quant_rope)
    return sum(c * x.own_latent + r * x.own_rope for x in roles)


def kv_ratio(cfg):
    """The cache relative to fp16 MHA of the same width (n_heads x head_dim, all layers): the '2%' of the paper."""
    return kv_bits_per_token(cfg) / (2 * cfg.n_heads * cfg.head_dim * 16 * cfg.n_layers)


# -----------------------------------------------------------------------------
# CLA

class CLACache(DenseCache):
    """Cross-layer attention (Brandon et al. 2024): the producer (first layer of a group) appends its k, v; the
    consumers are handed the same k, v by the model and only read the group's store. Stored once: the cache is
    1/share_factor of a DenseCache with the same KV heads."""
    name = "cla"
    ragged = False

    def __init__(self, config, dtype=torch.float16):
        self.share = config.share_factor
        super().__init__(config, dtype=dtype)

    def _producer(self, layer):
        return self.config.kv_owner(layer)[0]             # the model's group rule

    def _prefill(self, layer, q, k, v):
        if layer == self._producer(layer):
            return super()._prefill(layer, q, k, v)
        prod = self.layers[self._producer(layer)]
        if prod is None or prod.kv.n != q.shape[2]:
            raise ValueError(f"cla: layer {layer} attended before its producer layer {self._producer(layer)} wrote "
                             f"this chunk; run the layers in order")
        # the consumer's state shares the producer's store (nbytes counts it once)
        return DenseState(kv=prod.kv), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def _decode(self, layer, st, q, k, v):
        if layer == self._producer(layer):
            return super()._decode(layer, st, q, k, v)
        K, V = st.kv["k"].to(q.dtype), st.kv["v"].to(q.dtype)                      # the group's K/V, already updated
        mask = _causal_tail_mask(q.shape[2], st.kv.n, q.device)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)

    def nbytes(self, allocated=False):
        # producers: their store and counters; consumers: only their `seen` counter (8 B)
        return sum(s.nbytes(allocated) if i == self._producer(i) else 8
                   for i, s in enumerate(self.layers) if s is not None)

    def info(self):
        return f"cla (share_factor {self.share}, {self.dtype})"


# -----------------------------------------------------------------------------
# LatentCache: the cache of the latent attention variants (MLA, CLLA)

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
    options = ("dtype",)

    @classmethod
    def from_options(cls, config, **opts):
        return cls(config, **opts)

    def __init__(self, config, dtype=torch.float16):
        c = self.config = config
        if c.attn not in LATENT:
            raise ValueError(f"LatentCache is for attn='mla' or 'clla', not {c.attn!r}; use --cache dense")
        self.dtype = dtype                                    # dtype: unquantized rows (fp16; float32 for tests)
        self.bits, self.group, self.quant_rope = c.kv_bits, c.kv_quant_group, c.kv_quant_rope
        self.max_seq_len, self.n_layers = c.max_seq_len, c.n_layers
        self.d = {"c": c.kv_lora_rank, "r": c.qk_rope_dim}
        # layer -> its slot keys, named after the layer that writes them (config.kv_owner: the model's group rule)
        self.slot_of = [(("c", own_c), ("r", own_r)) for own_c, own_r in map(c.kv_owner, range(c.n_layers))]
        # slot (and (c slot, r slot) pair) -> the last layer that reads it
        self.last_reader = {key: i for i, keys in enumerate(self.slot_of) for key in (*keys, keys)}
        self.reset()

    def reset(self):
        self.slots = {key: Store(axis=1) for keys in self.slot_of for key in keys}
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
            quant.check_finite(x, f"latent cache layer {layer} {kind}", torch.finfo(self.dtype).max)
            self.batch = x.shape[0]
            if not self._quantized(kind):
                store.append(min_cap=64, x=x.detach().to(self.dtype))
            else:  # README "CLLA": asymmetric min/scale per token or per g channels, fp16 parameters
                codes, scale, mn = quant.quantize(x.detach().unflatten(-1, (-1, self._g(kind))), self.bits, dim=-1,
                                                  check=False)                         # checked above
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
        decode_kernel.py does for ZipCache keys: q_g . (s x + m) = s (q_g . x) + m sum(q_g), summed over the groups."""
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
