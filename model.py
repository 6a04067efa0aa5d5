"""
A llama-like transformer in one file: config, RMSNorm, RoPE (with Llama-3.1 frequency scaling), attention with
MHA/GQA/MQA, SwiGLU, the Transformer, and checkpoint loading (Hugging Face, Meta, and our own ckpt.pt).

The model knows nothing about KV caches beyond one call: attention hands (layer, q, k, v) to the cache object it was
given and gets the attention output back. Everything about compression lives in cache.py.
"""
import glob
import json
import math
import os
from dataclasses import dataclass, field, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# config

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
    # when 1); "mha"/"mqa" are the same module with the head count checked. Cross-layer and latent variants are
    # registered in ATTENTION below.
    attn: str = "gqa"

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
        if self.attn not in ATTENTION:
            raise ValueError(f"unknown attn={self.attn!r}; choose one of {sorted(ATTENTION)}")
        # mha/gqa/mqa are one module; the name must agree with n_kv_heads so a config says what it is
        if (self.attn == "mha" and self.n_kv_heads != self.n_heads) or (self.attn == "mqa" and self.n_kv_heads != 1):
            raise ValueError(f"attn={self.attn!r} contradicts n_kv_heads={self.n_kv_heads} (n_heads={self.n_heads}); "
                             f"use attn='gqa' or set n_kv_heads to {self.n_heads if self.attn == 'mha' else 1}")

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
        # normalise in fp32 (as Meta and HF do), then cast back before the gain
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


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
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
    t = torch.arange(config.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq)                                  # [max_seq_len, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle pos*inv_freq[i] (Meta's convention).

    x: [B, H, T, D]; cos, sin: [T, D/2]. HF checkpoints use rotate-half instead; their q/k weights are permuted on load
    so that both conventions compute the same scores.
    """
    xf = x.float().unflatten(-1, (-1, 2))                              # [B, H, T, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# -----------------------------------------------------------------------------
# attention variants

class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads: MHA (n_kv = n_heads), GQA, MQA (n_kv = 1).

    Query head i reads KV head i // (n_heads // n_kv_heads) (consecutive grouping, as SDPA's enable_gqa).
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, shared=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # [B, H, T, D]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # [B, H_kv, T, D]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # [B, H_kv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = cache.attend(self.layer_idx, q, k, v)                                 # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# The one place where the attention variant is chosen: config.attn -> module class. A class takes
# (config, layer_idx) and its forward takes (x, cos, sin, cache, shared); `shared` is a dict that lives for one
# forward pass, so cross-layer variants (CLA, CLLA) can hand tensors from a producer layer to its consumers.
ATTENTION = {"mha": Attention, "gqa": Attention, "mqa": Attention}


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)   # down
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)   # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                  # SwiGLU


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = ATTENTION[config.attn](config, layer_idx)
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

    def forward(self, idx, targets=None, cache=None, last_only=False):
        """idx [B, T] token ids -> (logits [B, T, V] fp32 (or [B, 1, V] if last_only), loss or None).

        With a cache, positions continue from cache.pos, and each layer's attention goes through cache.attend.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens at position {start} exceed max_seq_len={self.config.max_seq_len}; "
                             f"shorten the prompt or lower --max_new_tokens")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]    # [T, D/2]
        h = self.tok_embeddings(idx)                                                  # [B, T, dim]
        shared = {}
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


# -----------------------------------------------------------------------------
# checkpoint loading: our ckpt.pt, Hugging Face Llama directories, Meta's original layout

def load_model(path, device="cpu", dtype=None):
    """Load a model from a ckpt.pt, a Hugging Face Llama directory or a Meta directory.

    Returns (model in eval mode, meta) where meta["tokenizer"] is a tokenizer spec (or None) and meta["format"] says
    which layout was found. Weights load with weights_only=True: a checkpoint cannot run code.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found; pass --checkpoint a ckpt.pt or a model directory")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            config, sd, meta = _read_hf(path)
        elif os.path.exists(os.path.join(path, "params.json")):
            config, sd, meta = _read_meta(path)
        elif os.path.exists(os.path.join(path, "ckpt.pt")):
            return load_model(os.path.join(path, "ckpt.pt"), device, dtype)
        else:
            raise FileNotFoundError(f"{path!r} has no config.json (Hugging Face), params.json (Meta) or ckpt.pt")
    else:
        config, sd, meta = _read_ckpt(path)
    with torch.device("meta"):
        model = Transformer(config)                     # no memory: weights arrive with load_state_dict(assign=True)
    sd = _check_shapes(model, sd, path)
    if config.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_rope()
    return model.to(device).eval(), meta


def _check_shapes(model, sd, path):
    """Name the first tensor that is missing, unexpected or of the wrong shape, in one line."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("output.weight", None)
        sd.pop("output.weight", None)
    for k, v in expected.items():
        if k not in sd:
            raise ValueError(f"{path}: tensor {k} is missing from the checkpoint (config/weights mismatch)")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)} but the config implies "
                             f"{tuple(v.shape)} (config/weights mismatch)")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise ValueError(f"{path}: unexpected tensor {extra[0]} in the checkpoint (config/weights mismatch)")
    return sd


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt file, truncated download, or a pickle that needs code execution
        raise ValueError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _read_ckpt(path):
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path!r} is not a ckpt.pt written by train.py (expected keys 'model' and 'config')")
    config = ModelConfig.from_dict(ckpt["config"])
    # strip wrappers added by torch.compile and DDP
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    meta = {"format": "ckpt", "tokenizer": ckpt.get("tokenizer"), "step": ckpt.get("step")}
    return config, sd, meta


def _find_tokenizer(path):
    for cand in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
        if os.path.exists(os.path.join(path, cand)):
            return {"kind": "llama3", "path": os.path.join(path, cand)}
    return None


def _hf_unpermute(w, n_heads):
    """Undo the q/k row permutation HF applies for its rotate-half RoPE.

    HF's converter maps Meta rows (head, i, pair) -> (head, pair, i); viewing rows as [heads, 2, D/2] and swapping
    back restores adjacent pairs.
    """
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_config_to_model_config(c):
    """Translate a Hugging Face LlamaConfig dict (transformers 4.x or 5.x) into a ModelConfig."""
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope_type {rope_type!r} is not supported (only default and llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    n_heads = c["num_attention_heads"]
    return ModelConfig(
        dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads, vocab_size=c["vocab_size"],
        norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=theta,
        max_seq_len=c.get("max_position_embeddings", 2048), rope_scaling=scaling,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads, hidden_dim=c["intermediate_size"],
        attn="gqa")


def _read_hf(path):
    from safetensors.torch import load_file
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    config = hf_config_to_model_config(c)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path!r} has config.json but no model.safetensors (or sharded index)")
    hf = {}
    for fn in files:
        try:
            hf.update(load_file(os.path.join(path, fn)))
        except Exception as e:
            raise ValueError(f"cannot read {os.path.join(path, fn)!r}: {str(e).splitlines()[0][:200]}") from None
    # HF names -> ours; q/k rows un-permuted back to Meta's adjacent-pair RoPE layout
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {}
    for k, v in hf.items():
        if k == "model.embed_tokens.weight":
            sd["tok_embeddings.weight"] = v
        elif k == "model.norm.weight":
            sd["norm.weight"] = v
        elif k == "lm_head.weight":
            sd["output.weight"] = v
        elif k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            mod, leaf = rest.rsplit(".", 1)
            if mod not in names:
                raise ValueError(f"{path}: unexpected tensor {k} (not a Llama weight)")
            if mod == "self_attn.q_proj":
                v = _hf_unpermute(v, config.n_heads)
            elif mod == "self_attn.k_proj":
                v = _hf_unpermute(v, config.n_kv_heads)
            sd[f"layers.{i}.{names[mod]}.{leaf}"] = v
        elif not k.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"{path}: unexpected tensor {k} (not a Llama weight)")
    return config, sd, {"format": "hf", "tokenizer": _find_tokenizer(path)}


# Meta shards split each matrix across model-parallel ranks: column-parallel layers along dim 0, row-parallel ones
# (wo, w2) along dim 1; norms are replicated. The embedding is split along dim 1 in Llama 2 and dim 0 in Llama 3.
_META_CAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _read_meta(path):
    with open(os.path.join(path, "params.json")) as f:
        params = json.load(f)
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise FileNotFoundError(f"{path!r} has params.json but no consolidated.*.pth")
    parts = [_torch_load(s) for s in shards]
    sd = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        if len(ts) == 1 or ts[0].dim() == 1:
            sd[k] = ts[0]
        elif k == "tok_embeddings.weight":
            sd[k] = torch.cat(ts, dim=1 if ts[0].shape[1] * len(ts) == params["dim"] else 0)
        else:
            sd[k] = torch.cat(ts, dim=_META_CAT_DIM[k.split(".")[-2]])
    sd.pop("rope.freqs", None)
    if params.get("vocab_size", -1) <= 0:
        params["vocab_size"] = sd["tok_embeddings.weight"].shape[0]
    if params.pop("use_scaled_rope", False):    # Llama 3.1/3.2 params.json: the scaling constants are fixed in code
        params["rope_scaling"] = {"factor": params.pop("rope_scaling_factor", 8.0), "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    params.setdefault("max_seq_len", 8192 if "rope_scaling" in params or params.get("rope_theta", 0) > 1e5 else 4096)
    params["tie_embeddings"] = "output.weight" not in sd
    params["attn"] = "gqa"          # covers MHA and MQA too; the head counts say which
    config = ModelConfig.from_dict(params)
    return config, sd, {"format": "meta", "tokenizer": _find_tokenizer(path)}
