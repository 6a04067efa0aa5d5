"""diagnose.py: the per-part error split is consistent on a tiny random model (finite, ordered by bit width, the
parts bounded by the whole), and its attention-mass shares are fractions."""
import torch

import diagnose as D
from model import ModelConfig, Transformer


def test_error_split_on_a_tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=512)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 97, (300,)).tolist()
    rows = D.run(model, ids, {"paper": D.parse_config("paper"), "8bit": D.parse_config("paper+high_bits=8+low_bits=8"),
                              "default": D.parse_config("default")}, log=lambda *a: None)
    for name, r in rows.items():
        m = r["mean"]
        assert all(torch.isfinite(torch.tensor(v)) and v >= 0 for v in m.values()), (name, m)
        assert 0 <= m["mass_first4"] <= 1 and 0 <= m["mass_salient"] <= 1
        # a part quantized alone never errs more than ~both together (errors add roughly in quadrature)
        assert max(m["k_only"], m["v_only"], m["lo_only"], m["hi_only"]) <= 1.5 * m["both"] + 1e-9, (name, m)
    assert rows["8bit"]["mean"]["both"] < 0.1 * rows["paper"]["mean"]["both"]
    assert rows["paper"]["ratio"] > rows["8bit"]["ratio"]


def test_passkey_mode_on_the_real_model(smollm2):
    model, tok, _ = smollm2
    names = ("default", "all_4bit", "default+n_recent=8", "kivi+bits=4", "mix:default/default")
    out = D.passkey(model, tok, 2, 256, {n: D.parse_config(n) for n in names}, log=lambda *a: None)
    assert set(out) == {"dense", *names}
    assert out["dense"] == (2, out["dense"][1]) and abs(out["dense"][1] - 1) < 1e-3   # the dense model finds the key
    assert all(0 <= h <= 2 for h, _ in out.values()) and out["default"][1] > out["all_4bit"][1] > 1
    assert out["mix:default/default"][0] == out["default"][0]          # the fake-quantized cache answers alike


def test_parse_config():
    assert D.parse_config("default+k_group=32+salient_ratio=0.4+v_token_scope=head") == \
        ("zipcache", dict(k_group=32, salient_ratio=0.4, v_token_scope="head"))
    assert D.parse_config("default+keep_saliency_mask=true+n_sink=0") == \
        ("zipcache", dict(keep_saliency_mask=True, n_sink=0))
    assert D.parse_config("paper+n_sink=4") == ("zipcache", dict(paper=True, n_sink=4))
    assert D.parse_config("kivi+bits=2+residual=32") == ("kivi", dict(bits=2, residual=32))
    for bad in ("nope", "default+k_group"):
        try:
            D.parse_config(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_perplexity_mode_on_the_real_model(smollm2):
    model, tok, _ = smollm2
    out = D.perplexity(model, tok, 1, {"default": D.parse_config("default")}, prefill=96, decode=9, log=lambda *a: None)
    (dense, one), (zc, ratio) = out["dense"], out["default"]
    assert abs(one - 1) < 1e-2 and 1 < dense < 1e3 and 1 < zc < 1e3 and ratio > 2   # dense: ~1 (a DenseCache stores fp16)


def test_lines_mode_on_the_shipped_retrieval_model():
    import os
    import weights
    path = os.path.join(os.path.dirname(os.path.dirname(D.__file__)), "ckpt", "retrieval", "ckpt.pt")
    model, tok = weights.load_model_and_tokenizer(path, None, "cpu", torch.float32)
    out = D.lines(model, tok, [20], 5, {"paper": D.parse_config("paper")}, log=lambda *a: None)
    assert out["dense"] == {20: 100.0} and 0 <= out["paper"][20] <= 100


def test_mixed_cache_holds_each_half_where_it_belongs():
    # MixedCache: the prompt's keys as a ZipCache decodes them, at their positions; its values exact; output exact
    import pytest
    from types import SimpleNamespace
    cfg = SimpleNamespace(n_layers=1, max_seq_len=512, head_dim=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 90, 16, generator=g) for n in (4, 2, 2))
    spec = "default+keep_saliency_mask=true+k_group=8"
    m = D.MixedCache(cfg, k=spec, v="exact")
    out = m.attend(0, q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    z = m.zips[spec]
    Kz, _ = z.kv(0)                                                    # storage order: hi | lo | fp16 sinks
    mask, S = z.salient_mask(0)[0], z.cfg.n_sink                       # sinks count as salient
    K, V = m.layers[0].kv["k"][0], m.layers[0].kv["v"][0]
    for h in range(2):
        pos = torch.cat([S + mask[h, S:].nonzero()[:, 0], (~mask[h]).nonzero()[:, 0], torch.arange(S)])
        assert torch.equal(K[h, pos], Kz[0, h].half())
    assert torch.equal(V, v[0].half()) and not torch.equal(K, k[0].half())
    with pytest.raises(ValueError, match="mix:KEYS/VALUES"):
        D.parse_config("mix:default")
