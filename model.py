"""
A llama-like transformer in one file: config, RMSNorm, RoPE (with Llama-3.1 frequency scaling), attention with
MHA/GQA/MQA, CLA, MLA and CLLA (config.attn), SwiGLU and the Transformer. Reading and writing checkpoints is
weights.py's job.

The model knows nothing about KV caches beyond one call: attention hands (layer, q, k, v) to the cache object it was
given and gets the attention output back. Everything about compression lives in cache.py. The latent variants (MLA,
CLLA) cache no per-head K/V; they call the cache's latent interface instead (latent.LatentCache): write(layer, c,
k_rope), length(layer), attend_latent(layer, q_lat, q_rope, scale), and apply their own weights before and after.
"""
import math
from dataclasses import dataclass, field, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import fake_quant   # CLLA's latent QAT (pure torch; the cache quantizes with the same quant.py functions)


# -----------------------------------------------------------------------------
# config

# The longest context a model is built for: its RoPE tables (cos and sin, fp32, [max_seq_len, head_dim / 2]) are made
# for every position at once, 512 MB at 2^20 positions and head_dim 128. Released llama models declare up to 2^17.
MAX_SEQ_LEN = 2 ** 20


@dataclass
class ModelConfig:
    # field names follow Meta's params.json so a Llama params.json loads as ModelConfig(**params)
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None        # None -> n_heads (MHA); 1 -> MQA; a divisor of n_heads -> GQA
    vocab_size: int = 257
    multiple_of: int = 64                # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    rope_scaling: dict | None = None     # Llama-3.1: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    tie_embeddings: bool = False
    head_dim: int | None = None          # None -> dim // n_heads (HF configs may set it explicitly)
    hidden_dim: int | None = None        # None -> Meta's rule from dim/multiple_of/ffn_dim_multiplier (HF: intermediate_size)
    # The attention variant. "gqa" is standard attention with n_kv_heads KV heads (MHA when n_kv_heads == n_heads, MQA
    # when 1); "mha"/"mqa" are the same module with the head count checked; "cla" shares K/V across layers; the
    # latent variants (LATENT) are the other module (Block).
    attn: str = "gqa"
    # --- latent attention (attn = mla | clla), README "CLLA". None -> DeepSeek-V2-Lite's proportions scaled to
    # head_dim (d_c = 4*head_dim, d_r = head_dim/2, nope = v = head_dim); other variants must leave them unset.
    kv_lora_rank: int | None = None      # d_c: width of the cached latent c_KV
    q_lora_rank: int = 0                 # d_cq: 0 = plain wq (query compression saves activations, not cache)
    qk_nope_dim: int | None = None       # per-head query/key width without position
    qk_rope_dim: int | None = None       # d_r: decoupled RoPE width; one k_rope per token shared by all heads
    v_head_dim: int | None = None
    # --- cross-layer sharing (attn = cla | clla), README "CLLA". None -> 2 / "latent+rope" for those variants.
    share_factor: int | None = None      # s: layers per group; the first of each group produces, the rest consume
    share_mode: str | None = None        # clla: latent+rope | latent_only | rope_only (what consumers reuse)
    share_kv_proj: bool = False          # clla: consumers also reuse the producer's up-projection wkv_b
    # --- latent quantization (attn = mla | clla), README "CLLA" (the int4 latent)
    kv_bits: int = 16                    # 16 = none; 8 or 4: producer fake-quantizes in training, cache stores codes
    kv_quant_group: int | str = "token"  # "token": one (scale, min) per token; int g: per g channels
    kv_quant_rope: bool = True           # quantize k_rope too (else it is cached in 16 bits)
    kv_ste: bool = True                  # False: train unquantized, quantize only in eval/inference (PTQ)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)          # SwiGLU keeps the params of a 4*dim MLP with 3 matrices
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if not 1 <= self.max_seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be in 1..{MAX_SEQ_LEN} (the RoPE tables are built "
                             f"for every position); lower it")
        if self.attn not in ATTN_VARIANTS:
            raise ValueError(f"unknown attn={self.attn!r}; choose one of {sorted(ATTN_VARIANTS)}")
        # mha/gqa/mqa are one module; the name must agree with n_kv_heads so a config says what it is
        if (self.attn == "mha" and self.n_kv_heads != self.n_heads) or (self.attn == "mqa" and self.n_kv_heads != 1):
            raise ValueError(f"attn={self.attn!r} contradicts n_kv_heads={self.n_kv_heads} (n_heads={self.n_heads}); "
                             f"use attn='gqa' or set n_kv_heads to {self.n_heads if self.attn == 'mha' else 1}")
        self._check_cross_layer_and_latent()

    def _check_cross_layer_and_latent(self):
        """Resolve the CLA/MLA/CLLA fields and reject impossible combinations, one line each (README)."""
        a = self.attn

        def only(names, variants, hint):
            for n in names:
                if getattr(self, n) != ModelConfig.__dataclass_fields__[n].default:
                    raise ValueError(f"{n}={getattr(self, n)!r} applies to attn in {variants} only, not attn={a!r}; "
                                     f"{hint}")

        if a in LATENT:
            h = self.head_dim
            self.kv_lora_rank = 4 * h if self.kv_lora_rank is None else self.kv_lora_rank
            self.qk_rope_dim = h // 2 if self.qk_rope_dim is None else self.qk_rope_dim
            self.qk_nope_dim = h if self.qk_nope_dim is None else self.qk_nope_dim
            self.v_head_dim = h if self.v_head_dim is None else self.v_head_dim
            for n in ("kv_lora_rank", "qk_rope_dim", "qk_nope_dim", "v_head_dim"):
                if getattr(self, n) < 1:
                    raise ValueError(f"{n}={getattr(self, n)} must be at least 1")
            if self.q_lora_rank < 0:
                raise ValueError(f"q_lora_rank={self.q_lora_rank} must be 0 (no query compression) or positive")
            if self.qk_rope_dim % 2:
                raise ValueError(f"qk_rope_dim={self.qk_rope_dim} must be even for RoPE (it rotates pairs)")
        else:
            only(("kv_lora_rank", "q_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim", "kv_bits"),
                 LATENT, "use attn='mla' or 'clla', or drop the flag")
        if a in ("cla", "clla"):
            self.share_factor = 2 if self.share_factor is None else self.share_factor
            if self.share_factor < 1:
                raise ValueError(f"share_factor={self.share_factor} must be at least 1 (1 = no sharing)")
        else:
            only(("share_factor",), ("cla", "clla"), "set attn='cla' or 'clla' to share K/V across layers")
        if a == "clla":
            self.share_mode = "latent+rope" if self.share_mode is None else self.share_mode
            if self.share_mode not in SHARE_MODES:
                raise ValueError(f"share_mode={self.share_mode!r} is unknown; choose one of {', '.join(SHARE_MODES)}")
        else:
            only(("share_mode", "share_kv_proj"), ("clla",), "set attn='clla' (CLA shares whole K/V already)")
        if a in LATENT:
            b = self.kv_bits
            if b not in (16, 8, 4):
                raise ValueError(f"kv_bits={b} is not supported; use 16 (no quantization), 8 or 4")
            g = self.kv_quant_group
            if not (g == "token" or (isinstance(g, int) and not isinstance(g, bool) and g >= 1)):
                raise ValueError(f"kv_quant_group={g!r} must be 'token' or a positive int group size")
            if b < 16:
                if isinstance(g, int) and self.kv_lora_rank % g:
                    raise ValueError(f"kv_quant_group={g} does not divide kv_lora_rank={self.kv_lora_rank}; pick a "
                                     f"group size that divides it, or 'token'")
                if isinstance(g, int) and self.qk_rope_dim % min(g, self.qk_rope_dim):
                    raise ValueError(f"kv_quant_group={g} does not divide qk_rope_dim={self.qk_rope_dim} (k_rope uses "
                                     f"groups of min(g, d_r)); pick a group size that divides both, or 'token'")
                per_byte = 8 // b
                for n in ("kv_lora_rank",) + (("qk_rope_dim",) if self.kv_quant_rope else ()):
                    if getattr(self, n) % per_byte:
                        raise ValueError(f"{n}={getattr(self, n)} cannot be packed into {b}-bit codes: it must be a "
                                         f"multiple of {per_byte}")

    def kv_owner(self, i):
        """The one layer-group rule (CLA, CLLA): which layers computed what layer i attends over, as
        (owner of its K/V or latent c_KV, owner of its rope key k_R). Layer i is in group i // s, and the group's
        first layer produces for it; the last group may be shorter. CLLA's share_mode says what a consumer reuses:
        latent+rope both, latent_only the latent (it computes its own k_R), rope_only k_R. Without sharing, every
        layer owns its own. The model and the caches (CLACache, LatentCache) both ask this method."""
        s = self.share_factor if self.attn in ("cla", "clla") else 1
        mode = self.share_mode if self.attn == "clla" else "latent+rope"
        first = i - i % s
        return (i if mode == "rope_only" else first), (i if mode == "latent_only" else first)

    @property
    def rope_dim(self):
        """Width RoPE rotates: the whole head, or MLA's decoupled d_r slice (README)."""
        return self.qk_rope_dim if self.attn in LATENT else self.head_dim

    @classmethod
    def from_dict(cls, d):
        """Build from a dict (a params.json or a saved config), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as Meta and HF do), then cast back before the gain; F.rms_norm is one fused kernel
        # for x * rsqrt(mean(x^2) + eps) forward and backward, where the three-op form made a temporary per op
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)     # same math; the gain fused in too
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)


def rope_frequencies(head_dim, theta, scaling=None):
    """Inverse frequencies theta^(-2i/d), i < d/2, with Llama-3.1's wavelength-dependent scaling if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [D/2]
    if scaling:
        # Llama 3.1: leave high frequencies (short wavelengths) alone, divide low ones by `factor`, and blend linearly
        # in between, so the model sees longer contexts without disturbing local position information.
        factor = scaling["factor"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)   # 0 -> fully scaled, 1 -> untouched
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen < old_len / hi, inv_freq,
                               torch.where(wavelen > old_len / lo, inv_freq / factor, blended))
    return inv_freq.float()


def rope_cos_sin(config, device=None):
    inv_freq = rope_frequencies(config.rope_dim, config.rope_theta, config.rope_scaling).to(device)
    t = torch.arange(config.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq)                                  # [max_seq_len, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle pos*inv_freq[i] (Meta's convention).

    x: [B, H, T, D]; cos, sin: [T, D/2], or [B, 1, T, D/2] (per-sequence positions of a ragged batch). HF checkpoints
    use rotate-half instead; their q/k weights are permuted on load so that both conventions compute the same scores.
    """
    # An adjacent pair is one complex number x0 + i x1, and the rotation is one complex multiply by cos + i sin:
    # (x0 cos - x1 sin) + i (x0 sin + x1 cos). That is one pass over x, where slicing out x0 and x1 and stacking
    # the results made strided copies in the forward and again in the backward.
    xf = x if x.dtype == torch.float64 else x.float()
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))              # [B, H, T, D/2] complex
    out = torch.view_as_real(xc * torch.complex(cos.to(xf.dtype), sin.to(xf.dtype)))  # [B, H, T, D/2, 2]
    return out.flatten(-2).type_as(x)                                   # [B, H, T, D]


# -----------------------------------------------------------------------------
# attention variants

class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads: MHA (n_kv = n_heads), GQA, MQA (n_kv = 1), and CLA.

    Query head i reads KV head i // (n_heads // n_kv_heads) (consecutive grouping, as SDPA's enable_gqa).
    CLA (Brandon et al. 2024): only the first layer of each group of share_factor (the producer) computes K/V; the
    consumers have no wk/wv and attend over the producer's K/V (after RoPE) with their own queries. With a cache,
    consumers still call cache.attend(layer, q, k, v) with the producer's k, v; latent.CLACache stores them once.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.producer = config.kv_owner(layer_idx)[0] == layer_idx      # always, unless attn="cla"
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        if self.producer:
            self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
            self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, shared=None):
        B, T, _ = x.shape
        H, H_kv = self.n_heads, self.n_kv_heads
        if not self.producer:  # CLA consumer: own queries, the producer's K/V (gradients flow back into its wk/wv)
            q = apply_rope(self.wq(x).view(B, T, H, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, T, D]
            k, v = shared.kv
            return self._attend(q, k, v, cache)
        # q, k, v in one matmul over the stacked weights: one pass over x instead of three (the checkpoint keeps
        # wq/wk/wv). Stacking copies the weights, small next to a training batch's activations but more than the
        # matmul itself for a few decode tokens, which run the three projections and stack their outputs instead.
        if B * T >= 64:
            qkv = F.linear(x, torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]))
        else:
            qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        qkv = qkv.view(B, T, H + 2 * H_kv, self.head_dim).transpose(1, 2)             # [B, H + 2 H_kv, T, D]
        qk, v = qkv.split([H + H_kv, H_kv], dim=1)                    # split, not slices: one cat in the backward
        q, k = apply_rope(qk, cos, sin).split([H, H_kv], dim=1)       # [B, H, T, D], [B, H_kv, T, D]
        if shared is not None:
            shared.kv = k, v                                          # for this group's CLA consumers
        return self._attend(q, k, v, cache)

    def _attend(self, q, k, v, cache):
        B, _, T, _ = q.shape
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = cache.attend(self.layer_idx, q, k, v)                 # the cache: prefill or decode, cache.py
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))           # y: [B, H, T, D]


# -----------------------------------------------------------------------------
# cross-layer and latent attention: CLA, MLA, CLLA (README)

LATENT = ("mla", "clla")                                  # variants that cache a latent instead of per-head K/V
ATTN_VARIANTS = ("mha", "gqa", "mqa", "cla", *LATENT)    # config.attn: Attention, or LatentAttention for LATENT
SHARE_MODES = ("latent+rope", "latent_only", "rope_only")


class LayerRole:
    """What layer i computes itself, from config.kv_owner(i): the producer (first layer of its group) computes
    everything; a consumer its own latent (rope_only) or its own rope key (latent_only), or neither."""

    def __init__(self, config, i):
        owner_latent, owner_rope = config.kv_owner(i)
        self.producer = owner_latent == owner_rope == i
        self.own_latent, self.own_rope = owner_latent == i, owner_rope == i   # cla: "latent" = the layer's K/V


@dataclass
class GroupShare:
    """What a producer layer hands the consumers of its group within one forward pass (CLA, CLLA)."""
    kv: tuple = None                # CLA: the producer's (k, v) after RoPE
    latent: tuple = None            # CLLA: (c, k_R) as the producer computed them (fake-quantized if kv_bits < 16)
    wkv_b: torch.Tensor = None      # CLLA share_kv_proj: the producer's up-projection W_UK|W_UV
    latent_kv: tuple = None         # CLLA share_kv_proj: the producer's materialized per-head (k, v)


# Named attention settings; train.py accepts them as presets: `python train.py small clla-quant`
ATTN_PRESETS = {
    "clla": dict(attn="clla", share_factor=2, share_mode="latent+rope", kv_bits=16),
    "clla-quant": dict(attn="clla", share_factor=2, share_mode="latent+rope", kv_bits=4, kv_quant_group="token",
                       kv_quant_rope=True),
}


def latent_fake_quant(x, config, ste=True):
    """dequant(quant(x)) with the straight-through estimator (README "CLLA"), one (scale, min) per token ("token") or
    per g channels (an int group; k_rope uses min(g, d_r)). The cache quantizes with quant.quantize over the same
    groups, so what it stores reproduces this tensor exactly."""
    g = config.kv_quant_group
    if g == "token":
        return fake_quant(x, config.kv_bits, dim=-1, ste=ste)
    g = min(g, x.shape[-1])
    return fake_quant(x.unflatten(-1, (-1, g)), config.kv_bits, dim=-1, ste=ste).flatten(-2)


class LatentAttention(nn.Module):
    """MLA (DeepSeek-V2 §2.1, module names of DeepSeek-V3's inference/model.py) and CLLA, MLA whose latent c and
    rope key k_R are shared by groups of layers. attn="mla" is this module with share_factor 1.

    Training/prefill: materialize per-head K/V from the latent and run SDPA. Decode: fold W_UK into the
    query and W_UV after the attention, and attend over the cached latent through cache.attend_latent.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        c = self.config = config
        self.layer_idx = layer_idx
        self.role = LayerRole(config, layer_idx)
        self.n_heads, self.d_c, self.d_r = c.n_heads, c.kv_lora_rank, c.qk_rope_dim
        self.d_nope, self.d_v = c.qk_nope_dim, c.v_head_dim
        self.scale = (self.d_nope + self.d_r) ** -0.5     # over the whole query/key width (Megatron-LM #1501)
        q_out = c.n_heads * (self.d_nope + self.d_r)
        if c.q_lora_rank:
            self.wq_a = nn.Linear(c.dim, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.wq_b = nn.Linear(c.q_lora_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(c.dim, q_out, bias=False)
        # what this layer computes itself (README "CLLA": the share modes); consumers of the latent have no
        # down-projection
        if self.role.own_latent:
            self.wkv_a = nn.Linear(c.dim, self.d_c + (self.d_r if self.role.own_rope else 0), bias=False)  # W_DKV|W_KR
            self.kv_norm = RMSNorm(self.d_c, c.norm_eps)
        elif self.role.own_rope:
            self.wkr = nn.Linear(c.dim, self.d_r, bias=False)                   # latent_only consumer: own W_KR
        if self.role.producer or not c.share_kv_proj:
            self.wkv_b = nn.Linear(self.d_c, c.n_heads * (self.d_nope + self.d_v), bias=False)  # W_UK|W_UV fused
        self.wo = nn.Linear(c.n_heads * self.d_v, c.dim, bias=False)

    def _fq(self, x):
        # quantize when the cache will (kv_bits < 16), except while training with kv_ste=False (ablation run 11:
        # trained unquantized, quantized in eval and at inference)
        if self.config.kv_bits == 16 or (self.training and not self.config.kv_ste):
            return x
        return latent_fake_quant(x, self.config)

    def forward(self, x, cos, sin, cache=None, shared=None):
        B, T, _ = x.shape
        H, d_c, d_r, d_nope, d_v, role = self.n_heads, self.d_c, self.d_r, self.d_nope, self.d_v, self.role
        q = self.wq(x) if self.config.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, H, d_nope + d_r).transpose(1, 2)                        # [B, H, T, d_nope + d_r]
        q_c, q_r = q.split([d_nope, d_r], dim=-1)
        q_r = apply_rope(q_r, cos, sin)
        # the latent c and the rope key k_R: computed here, or the group producer's
        c_raw = kr_raw = None
        if role.own_latent:
            kv = self.wkv_a(x)                                                   # [B, T, d_c (+ d_r)]
            c_raw = self.kv_norm(kv[..., :d_c])                                  # [B, T, d_c]
            c = self._fq(c_raw)
        if role.own_rope:
            kr = kv[..., d_c:] if role.own_latent else self.wkr(x)              # [B, T, d_r], one key for all heads
            kr_raw = apply_rope(kr.unsqueeze(1), cos, sin).squeeze(1)           # RoPE before caching
            kr = self._fq(kr_raw) if self.config.kv_quant_rope else kr_raw
        if role.producer:
            shared.latent, shared.wkv_b, shared.latent_kv = (c, kr), self.wkv_b.weight, None
        else:
            c = c if role.own_latent else shared.latent[0]                      # gradients reach the producer
            kr = kr if role.own_rope else shared.latent[1]
        w = (self.wkv_b.weight if hasattr(self, "wkv_b") else shared.wkv_b).view(H, d_nope + d_v, d_c)
        w_uk, w_uv = w[:, :d_nope], w[:, d_nope:]                               # [H, d_nope, d_c], [H, d_v, d_c]

        if cache is not None:
            if not hasattr(cache, "attend_latent"):
                raise ValueError(f"attn={self.config.attn!r} caches a latent, but got a {type(cache).__name__}; build "
                                 f"the cache with make_cache('dense', config) (a LatentCache)")
            if role.own_latent or role.own_rope:
                cache.write(self.layer_idx, c_raw, kr_raw)                      # raw: the cache quantizes as _fq did
            if cache.length(self.layer_idx) > T:   # history before this chunk: decode (or a continued prefill)
                # absorbed attention over the cached latent, README "CLLA"
                q_lat = torch.einsum("bhtn,hnc->bhtc", q_c, w_uk)                # [B, H, T, d_c]
                z = cache.attend_latent(self.layer_idx, q_lat, q_r, self.scale)  # [B, H, T, d_c], in latent space
                y = torch.einsum("bhtc,hvc->bhtv", z, w_uv)                      # [B, H, T, d_v]
                return self.wo(y.transpose(1, 2).reshape(B, T, H * d_v))
        # training / prefill: materialize per-head K and V. A share_kv_proj consumer in latent+rope mode
        # sees exactly its producer's K/V, so it reuses them (CLA on top of MLA).
        reuse = not role.producer and self.config.share_kv_proj and not (role.own_latent or role.own_rope)
        if reuse and shared.latent_kv is not None:
            k, v = shared.latent_kv
        else:
            kv = F.linear(c, w.flatten(0, 1)).view(B, T, H, d_nope + d_v).transpose(1, 2)   # [B, H, T, d_nope + d_v]
            k_c, v = kv.split([d_nope, d_v], dim=-1)
            k = torch.cat([k_c, kr.unsqueeze(1).expand(B, H, T, d_r)], dim=-1)  # [B, H, T, d_nope + d_r]
            if role.producer:
                shared.latent_kv = k, v
        y = F.scaled_dot_product_attention(torch.cat([q_c, q_r], dim=-1), k, v, is_causal=True, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * d_v))                # y: [B, H, T, d_v]


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)   # down
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)   # up

    def forward(self, x):
        # two matmuls, not one over stacked w1|w3: the halves of a fused output are strided views, and the slower
        # elementwise ops and the gradient concatenation cost more than the call saved (bench_train.py on CPU)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                  # SwiGLU


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        # the one place where the attention variant is chosen. Both classes take (config, layer_idx) and their forward
        # (x, cos, sin, cache, shared); `shared` is a GroupShare that lives for one forward pass, so cross-layer
        # variants (CLA, CLLA) can hand tensors from a producer layer to its consumers
        self.attention = (LatentAttention if config.attn in LATENT else Attention)(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, cache=None, shared=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, shared)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_rope()
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def init_rope(self, device=None):
        # fp32 tables, not saved in checkpoints (they are a function of the config)
        cos, sin = rope_cos_sin(self.config, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def check_ids(self, idx):
        """One line for an id outside the vocabulary, not the embedding's bare 'index out of range'. Run on prompts
        (a prefill, or the first step): a decode step feeds back the model's own samples, always in range, and skips
        this host sync; so does training, whose tokenizer train.py has matched to the vocabulary."""
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < self.config.vocab_size):
            bad = int(idx.max()) if int(idx.max()) >= self.config.vocab_size else int(idx.min())
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{self.config.vocab_size - 1}); "
                             f"use the tokenizer the model was trained with")

    def forward(self, idx, targets=None, cache=None, last_only=False):
        """idx [B, T] token ids -> (logits [B, T, V] fp32 (or [B, 1, V] if last_only), loss or None).

        With a cache, positions continue from cache.pos, and each layer's attention goes through cache.attend.
        A ragged batch is left-padded, and the cache told so before the prefill (cache.set_padding(pad), pad[b] =
        padding tokens in front of sequence b): sequence b's RoPE positions then start at 0 at its first real token,
        so it gets the logits it gets alone; the cache keeps the padded keys out of attention.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if not self.training and (T > 1 or start == 0):
            self.check_ids(idx)
        if start + T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens at position {start} exceed max_seq_len={self.config.max_seq_len}; "
                             f"shorten the prompt or lower --max_new_tokens")
        pad = getattr(cache, "pad", None)
        if pad is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]    # [T, D/2]
        else:  # per-sequence positions; padded tokens get position 0 (they are masked anyway)
            pos = (start + torch.arange(T, device=idx.device) - pad.to(idx.device)[:, None]).clamp(min=0)  # [B, T]
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]           # [B, 1, T, D/2]
        h = self.tok_embeddings(idx)                                                  # [B, T, dim]
        shared = GroupShare()
        for layer in self.layers:
            h = layer(h, cos, sin, cache, shared)
        h = self.norm(h)
        if last_only and targets is None:
            h = h[:, -1:]
        logits = self.output(h).float()                                               # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
