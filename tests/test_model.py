"""model.py against Hugging Face's LlamaForCausalLM on the same random weights, Meta layout, and the dense cache.

Tolerances: HF and we both compute in float32 with the same op order up to RoPE (cos/sin tables built slightly
differently) and the rotate-half vs adjacent-pair layout, so logits agree to ~1e-6; the bound is 1e-4.
"""
import json
import os

import pytest
import torch

import model as M
import weights
transformers = pytest.importorskip("transformers")

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}


def make_hf(tmp_path, tie, rope_scaling, n_kv=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=rope_scaling, tie_word_embeddings=tie, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF inits norms to ones; randomise them so a swapped norm would show
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in n else 0.02))
    d = tmp_path / f"hf_tie{int(tie)}_{'scaled' if rope_scaling else 'plain'}"
    hf.save_pretrained(d, safe_serialization=True)
    return hf, str(d)


@pytest.mark.parametrize("tie,rope_scaling", [(False, LLAMA31_ROPE), (True, None), (True, LLAMA31_ROPE)])
def test_hf_parity(tmp_path, tie, rope_scaling):
    hf, d = make_hf(tmp_path, tie, rope_scaling)
    ours, meta = weights.load_model(d)
    assert meta["format"] == "hf" and ours.config.n_kv_heads == 2
    assert ours.config.tie_embeddings == tie
    idx = torch.randint(0, 97, (2, 100))          # 100 > original_max_position_embeddings: scaling matters
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = ours(idx)
    assert (got - want).abs().max().item() < 1e-4


def test_rope_scaling_changes_logits(tmp_path):
    # guard against a parity test that passes because scaling is silently ignored on both sides
    _, d = make_hf(tmp_path, False, LLAMA31_ROPE)
    m, _ = weights.load_model(d)
    f_scaled = M.rope_frequencies(16, 10000.0, m.config.rope_scaling)
    f_plain = M.rope_frequencies(16, 10000.0, None)
    assert not torch.allclose(f_scaled, f_plain)
    assert torch.equal(f_scaled[0], f_plain[0])        # the highest frequency is left alone


def _hf_to_meta_state(hf_sd, n_heads, n_kv):
    """Convert HF names and the rotate-half q/k layout to Meta's, written independently of model.py."""
    def unpermute(w, h):  # HF converter: view(h, D/2, 2, in).transpose(1, 2); undo it
        o, i = w.shape
        return w.reshape(h, 2, o // h // 2, i).permute(0, 2, 1, 3).reshape(o, i)
    out = {"tok_embeddings.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"]}
    if "lm_head.weight" in hf_sd:
        out["output.weight"] = hf_sd["lm_head.weight"]
    for k, v in hf_sd.items():
        if not k.startswith("model.layers."):
            continue
        i = k.split(".")[2]
        for hf_name, meta_name, fix in [("q_proj", "attention.wq", n_heads), ("k_proj", "attention.wk", n_kv),
                                        ("v_proj", "attention.wv", None), ("o_proj", "attention.wo", None),
                                        ("gate_proj", "feed_forward.w1", None), ("down_proj", "feed_forward.w2", None),
                                        ("up_proj", "feed_forward.w3", None),
                                        ("input_layernorm", "attention_norm", None),
                                        ("post_attention_layernorm", "ffn_norm", None)]:
            if f".{hf_name}." in k:
                out[f"layers.{i}.{meta_name}.weight"] = unpermute(v, fix) if fix else v
    return out


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_same_logits(tmp_path, n_shards):
    hf, d = make_hf(tmp_path, False, LLAMA31_ROPE)
    meta_sd = _hf_to_meta_state(hf.state_dict(), 4, 2)
    md = tmp_path / "meta"
    md.mkdir()
    json.dump({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "multiple_of": 16,
               "ffn_dim_multiplier": None, "hidden_dim": 176, "norm_eps": 1e-5, "rope_theta": 10000.0,
               "max_seq_len": 128, "rope_scaling": {k: v for k, v in LLAMA31_ROPE.items() if k != "rope_type"}},
              open(md / "params.json", "w"))
    # model-parallel shards: column-parallel weights split on dim 0, row-parallel (wo, w2) and the Llama-2 style
    # embedding on dim 1, norms replicated
    for r in range(n_shards):
        shard = {}
        for k, v in meta_sd.items():
            dim = 1 if k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
            shard[k] = v if v.dim() == 1 else v.chunk(n_shards, dim=dim)[r].clone()
        torch.save(shard, md / f"consolidated.{r:02d}.pth")
    a, _ = weights.load_model(d)
    b, meta = weights.load_model(str(md))
    assert meta["format"] == "meta"
    idx = torch.randint(0, 97, (1, 60))
    with torch.no_grad():
        assert torch.allclose(a(idx)[0], b(idx)[0], atol=1e-6, rtol=0)


def test_bad_config_and_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown attn"):
        M.ModelConfig(attn="nope")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        M.ModelConfig.from_dict({"dim": 64, "n_layer": 2})
    with pytest.raises(FileNotFoundError, match="not found"):
        weights.load_model(str(tmp_path / "missing"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        weights.load_model(str(bad))
    # a checkpoint whose weights do not match its config names the first mismatching tensor
    cfg = M.ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=32)
    sd = M.Transformer(cfg).state_dict()
    sd["layers.1.attention.wk.weight"] = torch.zeros(32, 64)
    torch.save({"model": sd, "config": vars(cfg)}, tmp_path / "mm.pt")
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wk\.weight has shape \(32, 64\)"):
        weights.load_model(str(tmp_path / "mm.pt"))
    m = M.Transformer(cfg)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("T", [3, 40])   # 2 x 3 tokens: three matmuls; 2 x 40: one over stacked weights
def test_fused_projections_match_separate_ones(T):
    # Attention runs wq/wk/wv as one matmul over stacked weights and RoPE as a complex multiply; the state dict
    # keeps the separate names, so a checkpoint written before the fusion loads unchanged. Check the fused forward
    # (and its gradients) against the plain per-projection computation, and the names on disk.
    torch.manual_seed(0)
    cfg = M.ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=64)
    att = M.Attention(cfg, 0)
    assert {"wq.weight", "wk.weight", "wv.weight", "wo.weight"} == set(att.state_dict())
    assert {"w1.weight", "w2.weight", "w3.weight"} == set(M.FeedForward(cfg).state_dict())
    x = torch.randn(2, T, 64, dtype=torch.float64, requires_grad=True)
    att = att.double()
    cos, sin = M.rope_cos_sin(cfg)
    cos, sin = cos[:T].double(), sin[:T].double()

    def rope(t):  # pairs (t[2i], t[2i+1]) rotated by pos * inv_freq[i], written out
        t0, t1 = t[..., 0::2], t[..., 1::2]
        return torch.stack((t0 * cos - t1 * sin, t0 * sin + t1 * cos), -1).flatten(-2)

    def heads(t, n):
        return t.view(2, T, n, 16).transpose(1, 2)
    q, k, v = heads(x @ att.wq.weight.T, 4), heads(x @ att.wk.weight.T, 2), heads(x @ att.wv.weight.T, 2)
    y = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=True)
    want = y.transpose(1, 2).reshape(2, T, 64) @ att.wo.weight.T
    got = att(x, cos, sin)
    assert (got - want).abs().max().item() < 1e-12
    g_want = torch.autograd.grad(want.sum(), [x, att.wq.weight, att.wk.weight, att.wv.weight])
    g_got = torch.autograd.grad(got.sum(), [x, att.wq.weight, att.wk.weight, att.wv.weight])
    for a, b in zip(g_got, g_want):
        assert (a - b).abs().max().item() < 1e-12


def test_rmsnorm_fp32_and_bf16_paths():
    # fp32 folds the gain into F.rms_norm; other dtypes normalise in fp32, cast back, then apply the gain (HF order)
    torch.manual_seed(0)
    n = M.RMSNorm(32, 1e-5)
    with torch.no_grad():
        n.weight.add_(torch.randn(32) * 0.1)
    x = torch.randn(3, 5, 32)
    ref = n.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert (n(x) - ref).abs().max().item() < 1e-6
    xb = x.bfloat16()
    xf = xb.float()
    want = n.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    got = n(xb)
    assert got.dtype == want.dtype == torch.float32 and (got - want).abs().max().item() < 1e-6
