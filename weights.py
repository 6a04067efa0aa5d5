"""
Checkpoint reading. For now: GGUF, llama.cpp's single-file format (metadata + possibly quantized tensors).

    config, sd = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", torch.float32)

Every tensor is dequantized on load (F32, F16, BF16, Q4_0..Q8_0, the K-quants: whatever `gguf.quants` handles) to
the requested dtype, so the model runs in plain floating point and the only lossy step is the one the file already
made. The KV cache is what this project compresses; the weights are not.
"""
import functools
import math

import numpy as np
import torch

from model import ModelConfig, rope_frequencies

# GGUF tensor name (after "blk.N.") -> our parameter name (after "layers.N."); see model.Block
GGUF_BLOCK_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
GGUF_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


@functools.lru_cache(maxsize=2)
def gguf_reader(path):
    """Open a GGUF file; a truncated or corrupt one is one clear line, not a numpy traceback. Cached: parsing the
    metadata of a 49k-token vocabulary takes seconds, and the model and its tokenizer read the same file."""
    from gguf import GGUFReader
    try:
        return GGUFReader(path)
    except Exception as e:
        raise ValueError(f"cannot read GGUF {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''});"
                         f" the file is truncated or corrupt: download it again") from None


def gguf_field(reader, key, default=None):
    """One metadata value as a Python object (str, int, float, bool or list), or default if absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path, tensors):
    """llama.* metadata -> ModelConfig."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, but only 'llama' GGUFs (Llama, SmolLM, Mistral "
                         f"without sliding window) are supported; convert a Llama-architecture model instead")

    def get(key, default=None):
        v = gguf_field(reader, f"llama.{key}", default)
        if v is None:
            raise ValueError(f"{path}: metadata llama.{key} is missing; the file is not a complete llama GGUF")
        return v

    n_heads, dim = get("attention.head_count"), get("embedding_length")
    head_dim = gguf_field(reader, "llama.attention.key_length") or dim // n_heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: partial RoPE (rope.dimension_count != head_dim {head_dim}) is not supported")
    if gguf_field(reader, "llama.rope.scaling.type", "none") not in ("none",):
        raise ValueError(f"{path}: rope scaling {gguf_field(reader, 'llama.rope.scaling.type')!r} is not supported "
                         f"(only none, and Llama-3.1's frequency factors)")
    theta = float(get("rope.freq_base", 10000.0))
    embd = tensors["token_embd.weight"]
    cfg = dict(dim=dim, n_layers=get("block_count"), n_heads=n_heads,
               n_kv_heads=gguf_field(reader, "llama.attention.head_count_kv") or n_heads,
               vocab_size=gguf_field(reader, "llama.vocab_size") or int(embd.shape[1]),
               norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
               max_seq_len=get("context_length", 2048), head_dim=head_dim, hidden_dim=get("feed_forward_length"),
               tie_embeddings="output.weight" not in tensors, attn="gqa")
    if "rope_freqs.weight" in tensors:
        cfg["rope_scaling"] = llama31_scaling(dequantize(tensors["rope_freqs.weight"], path), head_dim, theta, path)
    return ModelConfig(**cfg)


def llama31_scaling(factors, head_dim, theta, path):
    """llama.cpp stores Llama-3.1's RoPE scaling as per-frequency divisors (rope_freqs.weight, [D/2]); recover the
    four constants our rope_frequencies takes (Meta's fixed low=1, high=4, 8192), and check they reproduce the file."""
    factors = torch.as_tensor(factors, dtype=torch.float64).flatten()
    s = dict(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192)
    want = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)) / factors
    got = rope_frequencies(head_dim, theta, s).double()
    if factors.numel() != head_dim // 2 or not torch.allclose(got, want, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight is not Llama-3.1's frequency scaling; this RoPE variant is "
                         f"not supported")
    return s


def dequantize(t, path, dtype=torch.float32):
    """A GGUFReader tensor -> torch tensor in PyTorch's [out, in] order (GGUF lists dims innermost first)."""
    from gguf import quants
    try:
        a = quants.dequantize(t.data, t.tensor_type)            # float32, numpy shape = reversed GGUF shape
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf.quants cannot dequantize;"
                         f" use a file quantized as F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 or a K-quant") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({type(e).__name__}); the file is truncated or "
                         f"corrupt") from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    if a.size != math.prod(shape):
        raise ValueError(f"{path}: tensor {t.name} holds {a.size} values, expected {shape}; the file is truncated or "
                         f"corrupt: download it again")
    # np.array copies: F32/F16 data would otherwise be a read-only view of the memory-mapped file
    return torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape)).to(dtype)


def load_gguf(path, dtype=torch.float32):
    """A llama GGUF -> (ModelConfig, state_dict in model.Transformer's names).

    No q/k row permutation is needed: llama.cpp's converter stores q/k in Meta's adjacent-pair RoPE layout, the one
    model.apply_rope uses (it undoes HF's rotate-half permutation). Checked against transformers' own GGUF loading
    of SmolLM2-135M-Instruct in tests/test_gguf.py.
    """
    reader = gguf_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor; not a llama GGUF (or the file is corrupt)")
    config = gguf_config(reader, path, tensors)
    sd = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue                                            # folded into config.rope_scaling above
        base, leaf = name.rsplit(".", 1)
        if base.startswith("blk."):
            _, i, part = base.split(".", 2)
            ours = f"layers.{i}.{GGUF_BLOCK_NAMES.get(part, '?')}.{leaf}"
            known = part in GGUF_BLOCK_NAMES
        else:
            ours, known = f"{GGUF_TOP_NAMES.get(base, '?')}.{leaf}", base in GGUF_TOP_NAMES
        if not known or leaf != "weight":
            raise ValueError(f"{path}: unexpected tensor {name} (not a Llama weight)")
        sd[ours] = dequantize(t, path, dtype)
    return config, sd
