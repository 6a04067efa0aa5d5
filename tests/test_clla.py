"""CLA, MLA and CLLA (model.py) and their caches (latent.CLACache, latent.LatentCache), README "CLLA"

References are independent of the code under test: a per-head loop of the MLA equations, the accounting
formulas of README "CLLA" written out again, and the worked percentages of the CLLA paper. Tolerances: float32
paths that differ only in summation order agree to ~1e-6 on these tiny models; 1e-5 leaves margin. float64 ≤ 1e-10.
"""
import math

import pytest
import torch

import cache as C
import latent
import model as M
import quant
import train
import weights
from generate import make_cache

V = 61  # vocabulary of the toy models

VARIANTS = {  # name -> ModelConfig overrides on a 4-layer, 8-head x 16 toy (the CPU smoke shape)
    "mha": dict(attn="mha"),
    "gqa": dict(attn="gqa", n_kv_heads=2),
    "mqa": dict(attn="mqa", n_kv_heads=1),
    "cla": dict(attn="cla", n_kv_heads=2),
    "cla-s3": dict(attn="cla", n_kv_heads=2, share_factor=3),           # the last group is shorter
    "mla": dict(attn="mla"),
    "clla": dict(attn="clla"),
    "clla-quant": dict(M.ATTN_PRESETS["clla-quant"]),
    "clla-quant-g32-s3": dict(attn="clla", kv_bits=4, kv_quant_group=32, share_factor=3),
    "clla-int8-rope16": dict(attn="clla", kv_bits=8, kv_quant_rope=False, share_mode="latent_only"),
}
LATENT_SETTINGS = [dict(attn="mla")] + [dict(attn="clla", share_mode=m, share_kv_proj=p)
                                        for m in M.SHARE_MODES for p in (False, True)]


def make(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = M.ModelConfig(**{**dict(dim=64, n_layers=4, n_heads=8, vocab_size=V, max_seq_len=64), **kw})
    m = M.Transformer(cfg).to(dtype).eval()
    with torch.no_grad():  # norms start at 1; randomise them so a norm applied to the wrong tensor would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def dense_cache(m, dtype=torch.float32):
    cfg = m.config
    if cfg.attn in ("mha", "gqa", "mqa"):
        return C.DenseCache(cfg, dtype=dtype)
    return make_cache("dense", cfg, dtype=dtype)   # routes to CLACache / LatentCache from cfg.attn


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -----------------------------------------------------------------------------
# the MLA equations against an independent per-head reference

def reference_mla(att, x, cos, sin):
    """One MLA layer from the equations, head by head, explicit causal softmax with (d_nope + d_r)^-0.5."""
    B, T, _ = x.shape
    dn, dr, dv, dc, H = att.d_nope, att.d_r, att.d_v, att.d_c, att.n_heads
    kv = x @ att.wkv_a.weight.T
    c = att.kv_norm(kv[..., :dc])                                                  # [B, T, d_c]
    kr = M.apply_rope(kv[..., dc:][:, None], cos, sin)[:, 0]                        # [B, T, d_r]
    q = (x @ att.wq.weight.T).view(B, T, H, dn + dr)
    w = att.wkv_b.weight.view(H, dn + dv, dc)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    outs = []
    for h in range(H):
        q_h = torch.cat([q[:, :, h, :dn], M.apply_rope(q[:, None, :, h, dn:], cos, sin)[:, 0]], -1)  # [B, T, dn+dr]
        k_h = torch.cat([c @ w[h, :dn].T, kr], -1)                                  # [B, T, dn+dr]
        v_h = c @ w[h, dn:].T                                                       # [B, T, dv]
        s = (q_h @ k_h.transpose(1, 2)) / math.sqrt(dn + dr)
        outs.append(s.masked_fill(~causal, float("-inf")).softmax(-1) @ v_h)
    return torch.cat(outs, -1) @ att.wo.weight.T


def test_mla_layer_matches_per_head_reference():
    m = make(attn="mla", dim=64, n_heads=4, head_dim=16, qk_rope_dim=8, kv_lora_rank=24, v_head_dim=12).double()
    att = m.layers[0].attention
    assert att.scale == (16 + 8) ** -0.5
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    cos, sin = m.rope_cos[:11].double(), m.rope_sin[:11].double()
    with torch.no_grad():
        got = att(x, cos, sin, None, M.GroupShare())
        want = reference_mla(att, x, cos, sin)
    assert rel_err(got, want) <= 1e-10   # float64, same math in another order
    assert m.rope_cos.shape[1] == 8 // 2  # RoPE tables are d_r wide, not head_dim wide


def test_rope_slice_is_relative():
    # on the d_r slice q(m).k(n) depends only on m - n
    m = make(attn="mla", dim=64, n_heads=4)                      # head_dim 16 -> d_r 8
    cos, sin = m.rope_cos.double(), m.rope_sin.double()
    assert cos.shape[1] * 2 == m.config.qk_rope_dim == 8
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def dot(a, b):
        return (M.apply_rope(q, cos[a:a + 1], sin[a:a + 1]) * M.apply_rope(k, cos[b:b + 1], sin[b:b + 1])).sum()

    # the cos/sin tables are float32 (model.py), so equal offsets agree to ~1e-8, not float64 precision
    assert abs(dot(7, 3) - dot(30, 26)) < 1e-6 and abs(dot(7, 3) - dot(3, 7)) > 1e-3


# -----------------------------------------------------------------------------
# absorbed decode == materialized path

@pytest.mark.parametrize("kw", LATENT_SETTINGS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_absorbed_equals_materialized(kw, dtype, tol):
    """One full forward (materialized K/V, SDPA) vs a 1-token prefill then one 15-token chunk that every layer runs
    absorbed (W_UK into q, W_UV after, causal mask over the cached latent). Layers of a group have different wq and
    wkv_b and read one shared latent and k_R."""
    m = make(**kw).to(dtype)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        full, _ = m(idx)
        cache = dense_cache(m, dtype)
        first, _ = m(idx[:, :1], cache=cache)
        rest, _ = m(idx[:, 1:], cache=cache)
    assert isinstance(cache, latent.LatentCache) and cache.pos == 16
    assert rel_err(torch.cat([first, rest], 1), full) <= tol


# -----------------------------------------------------------------------------
# the folded decode over the stored codes == the dequantize-everything reference (LatentCache.attend_codes)

@pytest.mark.parametrize("mode", M.SHARE_MODES)
@pytest.mark.parametrize("bits,group,rope", [(4, "token", True), (4, 32, True), (8, "token", True), (8, 16, False),
                                             (16, "token", True)])
def test_decode_over_codes_equals_dequantized_reference(mode, bits, group, rope):
    """Every layer of a 3-layer CLLA stack (s = 2: a full group and a short one), a 24-token prefill, then 5 decode
    steps of fresh random latents, rope keys and queries (with an offset, so the min term matters): attend_latent at
    T = 1 (scales folded, codes never dequantized) vs attend_reference (dequantize everything, SDPA), fp32."""
    cfg = M.ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=V, max_seq_len=64, attn="clla", share_factor=2,
                        share_mode=mode, kv_bits=bits, kv_quant_group=group, kv_quant_rope=rope)
    cache = latent.LatentCache(cfg, dtype=torch.float32)
    d_c, d_r, H = cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.n_heads
    g = torch.Generator().manual_seed(bits)

    def write_all(T):
        for i, (kc, kr) in enumerate(cache.slot_of):
            c = torch.randn(2, T, d_c, generator=g) + 0.5 if kc[1] == i else None    # owners only
            r = torch.randn(2, T, d_r, generator=g) * 2 if kr[1] == i else None
            cache.write(i, c, r)

    write_all(24)
    for step in range(5):
        write_all(1)
        for i in range(cfg.n_layers):
            q_lat = torch.randn(2, H, 1, d_c, generator=g) + 0.3
            q_r = torch.randn(2, H, 1, d_r, generator=g)
            got = cache.attend_latent(i, q_lat, q_r, 0.2)
            want = cache.attend_reference(i, q_lat, q_r, 0.2)
            assert got.shape == want.shape == (2, H, 1, d_c)
            assert rel_err(got, want) <= 1e-5, (step, i)
        assert not cache.scratch          # the shared unpacking is dropped by each slot's last reader
    assert cache.pos == 29


# -----------------------------------------------------------------------------
# token-by-token decode == one full forward

@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_equals_full_forward(name):
    m = make(**VARIANTS[name])
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full, _ = m(idx)
        cache = dense_cache(m)
        pre, _ = m(idx[:, :7], cache=cache)
        steps = [m(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 20)]
    got = torch.cat([pre] + steps, 1)
    assert cache.pos == len(cache) == 20
    # float32, only summation order differs; quantized variants read back the very codes fake-quant produced
    assert (got - full).abs().max().item() <= 1e-5
    want_cls = {"cla": latent.CLACache, "mla": latent.LatentCache, "clla": latent.LatentCache}.get(m.config.attn, C.DenseCache)
    assert type(cache) is want_cls


def test_quantized_cache_equals_training_mode():
    """clla-quant: logits through the packed int4 cache == training-mode logits (fake-quant with STE), and the
    quantization really happens (they differ from the same weights at kv_bits=16)."""
    m = make(**VARIANTS["clla-quant"])
    idx = torch.randint(0, V, (2, 18))
    with torch.no_grad():
        train_logits = m.train()(idx)[0]
        m.eval()
        cache = dense_cache(m)
        got = torch.cat([m(idx[:, :5], cache=cache)[0]] + [m(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 18)], 1)
        m16 = make(**{**VARIANTS["clla-quant"], "kv_bits": 16})
        unquant = m16(idx)[0]
    assert (got - train_logits).abs().max().item() <= 1e-5
    assert (unquant - train_logits).abs().max().item() > 1e-3
    slot = cache.slots[("c", 0)]
    assert set(slot.full) == {"codes", "scale", "mn"} and slot["codes"].dtype == torch.uint8
    assert slot["codes"].shape[-1] == m.config.kv_lora_rank // 2 and slot["scale"].dtype == torch.float16


def test_fake_quant_is_dequant_of_quant_bit_for_bit():
    cfg = M.ModelConfig(dim=64, n_heads=8, attn="clla", kv_bits=4, kv_quant_group=16)
    x = torch.randn(3, 9, cfg.kv_lora_rank) * 3
    codes, scale, mn = quant.quantize(x.unflatten(-1, (-1, 16)), 4, dim=-1)
    assert torch.equal(M.latent_fake_quant(x, cfg), quant.dequantize(codes, scale, mn).flatten(-2))


def test_kv_ste_false_quantizes_only_in_eval():
    m = make(**VARIANTS["clla-quant"], kv_ste=False)
    q = make(**VARIANTS["clla-quant"])
    u = make(**{**VARIANTS["clla-quant"], "kv_bits": 16})
    idx = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        assert torch.equal(m.train()(idx)[0], u.train()(idx)[0])     # trained unquantized (PTQ run 11)
        assert torch.equal(m.eval()(idx)[0], q.eval()(idx)[0])       # quantized at evaluation / inference


def test_kv_bits_16_never_quantizes(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("quantizer called with kv_bits=16")
    monkeypatch.setattr(M, "fake_quant", boom)
    monkeypatch.setattr(quant, "quantize", boom)
    m = make(attn="clla")
    idx = torch.randint(0, V, (2, 10))
    m.train()(idx, idx)[1].backward()
    with torch.no_grad():
        cache = dense_cache(m.eval(), torch.float16)
        m(idx[:, :6], cache=cache)
        m(idx[:, 6:7], cache=cache)
    assert all(set(s.full) == {"x"} and s["x"].dtype == torch.float16 for s in cache.slots.values())


# -----------------------------------------------------------------------------
# equivalences

def test_clla_share_factor_1_is_mla():
    for bits in (16, 4):
        mla = make(attn="mla", kv_bits=bits)
        clla = make(attn="clla", share_factor=1, kv_bits=bits, seed=1)
        clla.load_state_dict(mla.state_dict())        # same modules, same names
        idx = torch.randint(0, V, (2, 12))
        with torch.no_grad():
            assert torch.equal(clla(idx)[0], mla(idx)[0])
            c1, c2 = dense_cache(mla), dense_cache(clla)
            mla(idx[:, :8], cache=c1), clla(idx[:, :8], cache=c2)
            assert torch.equal(mla(idx[:, 8:9], cache=c1)[0], clla(idx[:, 8:9], cache=c2)[0])
        assert c1.nbytes() == c2.nbytes()


def test_cla_share_factor_1_is_its_base_and_gqa_switches():
    base = make(attn="gqa", n_kv_heads=2)
    cla = make(attn="cla", n_kv_heads=2, share_factor=1, seed=1)
    cla.load_state_dict(base.state_dict())
    mha, gqa_full = make(attn="mha"), make(attn="gqa", n_kv_heads=8, seed=1)
    gqa_full.load_state_dict(mha.state_dict())
    idx = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        assert torch.equal(cla(idx)[0], base(idx)[0])
        assert torch.equal(gqa_full(idx)[0], mha(idx)[0])


def test_module_sets_and_share_kv_proj():
    for mode, own in [("latent+rope", set()), ("latent_only", {"wkr"}), ("rope_only", {"wkv_a", "kv_norm"})]:
        for p in (False, True):
            m = make(attn="clla", share_mode=mode, share_kv_proj=p, share_factor=2)
            prod, cons = m.layers[0].attention, m.layers[1].attention
            assert {"wkv_a", "kv_norm", "wkv_b"} <= set(prod._modules)
            got = set(cons._modules) & {"wkv_a", "kv_norm", "wkr", "wkv_b"}
            assert got == own | (set() if p else {"wkv_b"}), (mode, p, got)
            if mode == "rope_only":
                assert cons.wkv_a.out_features == m.config.kv_lora_rank   # latent only; k_R comes from the producer
    cla = make(attn="cla", n_kv_heads=2)
    assert not hasattr(cla.layers[1].attention, "wk") and hasattr(cla.layers[2].attention, "wk")
    # share_kv_proj in latent+rope: the consumer sees exactly the producer's K/V, i.e. behaves like a layer that
    # owns a copy of the producer's wkv_b
    a = make(attn="clla", share_kv_proj=True)
    b = make(attn="clla", share_kv_proj=False, seed=1)
    sd = dict(a.state_dict())
    for i in (1, 3):
        sd[f"layers.{i}.attention.wkv_b.weight"] = sd[f"layers.{i - 1}.attention.wkv_b.weight"]
    b.load_state_dict(sd)
    idx = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        assert torch.equal(a(idx)[0], b(idx)[0])


# -----------------------------------------------------------------------------
# gradients: every consumer reaches the producer's down-projection (also through the STE)

@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("mode", M.SHARE_MODES)
def test_gradients_reach_producer_from_every_consumer(mode, bits):
    m = make(attn="clla", share_mode=mode, share_factor=3, kv_bits=bits).train()
    cfg, layers = m.config, [b.attention for b in m.layers]
    cos, sin = m.rope_cos[:9], m.rope_sin[:9]
    rows = {"latent+rope": slice(None), "latent_only": slice(0, cfg.kv_lora_rank),
            "rope_only": slice(cfg.kv_lora_rank, None)}[mode]   # the part of wkv_a the consumers read
    for consumer in (1, 2):
        m.zero_grad()
        shared = M.GroupShare()
        for i in range(consumer + 1):       # producer, then consumers; only the chosen consumer's output is the loss
            y = layers[i](torch.randn(2, 9, cfg.dim), cos, sin, None, shared)
        y.square().sum().backward()
        g = layers[0].wkv_a.weight.grad
        assert g is not None and g[rows].abs().sum() > 0, (mode, bits, consumer)
    assert "wkv_a" not in layers[1]._modules or mode == "rope_only"


def test_cla_gradients_reach_producer():
    m = make(attn="cla", n_kv_heads=2, share_factor=2).train()
    shared, cos, sin = M.GroupShare(), m.rope_cos[:5], m.rope_sin[:5]
    att = [b.attention for b in m.layers]
    att[0](torch.randn(1, 5, 64), cos, sin, None, shared)
    att[1](torch.randn(1, 5, 64), cos, sin, None, shared).sum().backward()
    assert att[0].wk.weight.grad.abs().sum() > 0 and att[0].wv.weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# accounting: formulas of README "CLLA" written out again, the worked examples of the CLLA paper, real cache bytes

def formula_bits(cfg):
    """README "CLLA"'s table of bits per token, over all layers (layers divisible by s here)."""
    l, nh, dh = cfg.n_layers, cfg.n_heads, cfg.head_dim
    if cfg.attn in ("mha", "gqa", "mqa"):
        return 2 * cfg.n_kv_heads * dh * l * 16
    if cfg.attn == "cla":
        return 2 * cfg.n_kv_heads * dh * l // cfg.share_factor * 16
    dc, dr, b = cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.kv_bits
    s = cfg.share_factor if cfg.attn == "clla" else 1
    mode = cfg.share_mode if cfg.attn == "clla" else "latent+rope"
    nc, nr = {"latent+rope": (1, 1), "latent_only": (1, s), "rope_only": (s, 1)}[mode]   # entries per group
    if b == 16:
        per_group = 16 * (nc * dc + nr * dr)
    else:
        n_grp = (lambda d: 1) if cfg.kv_quant_group == "token" else (lambda d: d // min(cfg.kv_quant_group, d))
        lat = dc * b + 32 * n_grp(dc)
        rope = dr * b + 32 * n_grp(dr) if cfg.kv_quant_rope else 16 * dr
        per_group = nc * lat + nr * rope
    return per_group * l // s


SHAPES = {"v2lite": dict(dim=2048, n_heads=16, head_dim=128, kv_lora_rank=512, qk_rope_dim=64),
          "default": dict(dim=512, n_heads=16, head_dim=32, kv_lora_rank=128, qk_rope_dim=16)}
WORKED = [  # README "CLLA": (settings, V2-Lite %, default %)
    (dict(attn="mha"), 100, 100),
    (dict(attn="gqa", n_kv_heads=4), 25, 25),
    (dict(attn="mqa", n_kv_heads=1), 6.25, 6.25),
    (dict(attn="cla", n_kv_heads=4), 12.5, 12.5),
    (dict(attn="cla", n_kv_heads=1), 3.125, 3.125),
    (dict(attn="mla"), 14.06, 14.06),
    (dict(attn="clla"), 7.03, 7.03),
    (dict(attn="clla", share_mode="latent_only"), 7.81, 7.81),
    (dict(attn="clla", share_mode="rope_only"), 13.28, 13.28),
    (dict(attn="clla", kv_bits=8), 3.56, 3.71),
    (dict(attn="clla", kv_bits=4, kv_quant_rope=False), 2.37, 2.44),
    (dict(M.ATTN_PRESETS["clla-quant"]), 1.81, 1.95),
    (dict(attn="clla", kv_bits=4, kv_quant_group=64), 1.98, 2.05),
    (dict(attn="clla", kv_bits=4, kv_quant_group=32), 2.20, 2.25),
    (dict(attn="clla", kv_bits=4, share_mode="latent_only"), 2.03, 2.25),
]


@pytest.mark.parametrize("kw,v2lite,default", WORKED)
def test_accounting_worked_examples(kw, v2lite, default):
    for shape, pct in (("v2lite", v2lite), ("default", default)):
        s = dict(SHAPES[shape])
        if kw["attn"] not in ("mla", "clla"):
            s = {k: v for k, v in s.items() if k in ("dim", "n_heads", "head_dim")}
        cfg = M.ModelConfig(n_layers=8, **s, **kw)
        assert latent.kv_bits_per_token(cfg) == formula_bits(cfg)
        assert round(100 * latent.kv_ratio(cfg), 2) == pytest.approx(pct, abs=0.006), (shape, kw)


def test_clla_quant_preset_default_shape_within_2_percent():
    cfg = M.ModelConfig(**{k: v for k, v in train.PRESETS["small"].items() if k != "block_size"},
                        **train.PRESETS["clla-quant"])
    assert cfg.n_heads * cfg.head_dim == 512 and cfg.kv_lora_rank == 128 and cfg.qk_rope_dim == 16
    assert latent.kv_ratio(cfg) <= 0.02   # 1.95%


@pytest.mark.parametrize("name", ["mha", "gqa", "cla", "mla", "clla", "clla-quant", "clla-quant-g32-s3",
                                  "clla-int8-rope16"] + [f"clla-{m}" for m in M.SHARE_MODES])
def test_cache_bytes_equal_formula(name):
    """Layers in a group share one cache entry: real bytes == B * T * formula / 8 + 8 B per counter."""
    kw = VARIANTS.get(name) or dict(attn="clla", share_mode=name[5:])
    m = make(**kw).half() if kw.get("kv_bits", 16) == 16 else make(**kw)   # unquantized rows are fp16
    cfg, B, T = m.config, 3, 13
    if "s3" in name:  # groups of 3 over 4 layers: 2 groups; the formula assumes s | l, so count directly
        want_bits = 2 * formula_bits(M.ModelConfig(**{**cfg.__dict__, "n_layers": 3}))
    else:
        want_bits = formula_bits(cfg)
    assert latent.kv_bits_per_token(cfg) == want_bits
    idx = torch.randint(0, V, (B, T))
    with torch.no_grad():
        cache = dense_cache(m, torch.float16)
        m(idx[:, :9], cache=cache)
        for t in range(9, T):
            m(idx[:, t:t + 1], cache=cache)
    if isinstance(cache, latent.LatentCache):
        counters = 8 * len(cache.slots)
        if cfg.attn == "clla" and cfg.share_mode == "latent+rope":
            assert cache.slot_of[1] == cache.slot_of[0] and len(cache.slots) == 2 * math.ceil(4 / cfg.share_factor)
    else:  # DenseCache / CLACache: one kv store counter + one `seen` counter per layer state
        counters = 8 * sum(2 if i % (cfg.share_factor or 1) == 0 else 1 for i in range(cfg.n_layers)) \
            if cfg.attn == "cla" else 16 * cfg.n_layers
    assert cache.nbytes() == B * T * want_bits // 8 + counters


# -----------------------------------------------------------------------------
# errors: one clear line each

@pytest.mark.parametrize("kw,match", [
    (dict(attn="mla", qk_rope_dim=7), "qk_rope_dim=7 must be even"),
    (dict(attn="clla", share_factor=0), "share_factor=0 must be at least 1"),
    (dict(attn="clla", share_mode="both"), "share_mode='both' is unknown"),
    (dict(attn="mla", share_factor=2), "share_factor=2 applies to attn in"),
    (dict(attn="gqa", share_kv_proj=True), "share_kv_proj=True applies to attn in"),
    (dict(attn="cla", share_mode="latent_only"), "share_mode='latent_only' applies"),
    (dict(attn="gqa", kv_bits=4), "kv_bits=4 applies to attn in"),
    (dict(attn="mha", kv_lora_rank=64), "kv_lora_rank=64 applies to attn in"),
    (dict(attn="clla", kv_bits=3), "kv_bits=3 is not supported"),
    (dict(attn="clla", kv_bits=4, kv_quant_group=48), "kv_quant_group=48 does not divide kv_lora_rank=64"),
    (dict(attn="clla", kv_bits=4, kv_quant_group=6, kv_lora_rank=48), "does not divide qk_rope_dim=8"),
    (dict(attn="clla", kv_bits=4, kv_quant_group="channel"), "must be 'token' or a positive int"),
    (dict(attn="clla", kv_bits=4, kv_lora_rank=63), "kv_lora_rank=63 cannot be packed into 4-bit codes"),
    (dict(attn="clla", n_heads=8, n_kv_heads=3), "n_heads=8 must be a multiple of n_kv_heads=3"),
])
def test_bad_configs_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        M.ModelConfig(**{**dict(dim=64, n_heads=4), **kw})
    assert "\n" not in str(e.value)


def test_cache_routing_and_checkpoint_round_trip(tmp_path):
    m = make(**VARIANTS["clla-quant"])
    with pytest.raises(ValueError, match="use --cache dense") as e:
        make_cache("zipcache", m.config)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="latent cache is for attn"):
        make_cache("latent", M.ModelConfig(dim=64, n_heads=4))
    assert isinstance(make_cache("latent", m.config), latent.LatentCache)
    with pytest.raises(ValueError, match="caches a latent, but got a DenseCache"):
        m(torch.zeros(1, 3, dtype=torch.long), cache=C.DenseCache(m.config))
    # the checkpoint records the toggle: load_model rebuilds the same variant with the same logits
    from dataclasses import asdict
    torch.save({"model": m.state_dict(), "config": asdict(m.config)}, tmp_path / "ckpt.pt")
    m2, _ = weights.load_model(str(tmp_path / "ckpt.pt"))
    idx = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert m2.config == m.config and torch.equal(m2(idx)[0], m(idx)[0])
    # a config whose share settings differ from the weights names the mismatch in one line
    bad = asdict(m.config) | {"share_mode": "latent_only"}
    torch.save({"model": m.state_dict(), "config": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        weights.load_model(str(tmp_path / "bad.pt"))


def test_scaling_mode_end_to_end_and_resumes(tmp_path, monkeypatch, capsys):
    """ablate_clla.py --scaling at a seconds-long budget: every variant at 3 budgets plus the 2-seed runs, the three
    result files with the expected rows, and a restart reuses every finished run instead of training again."""
    import json

    import ablate_clla as A
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(3000)))
    monkeypatch.chdir(tmp_path)                   # train.py's data_cache/ lands in tmp_path
    monkeypatch.setitem(A.TRAIN, "batch_size", 2)
    monkeypatch.setitem(A.TRAIN, "block_size", 32)
    monkeypatch.setitem(A.TRAIN, "eval_iters", 1)
    argv = ["--scaling", "--scaling_steps=1,4,16", "--shape=32x1x2", "--eval_batches=1", f"--data={corpus}",
            "--out_dir=out", "--results_dir=res"]
    A.main(argv)
    md = (tmp_path / "res" / "clla_scaling.md").read_text()
    for name, _ in A.SCALE_VARIANTS:
        assert f"| {name} |" in md
    assert "(2 seeds)" in md and "change per 4x tokens" in md and A.MARKER in md
    js = json.loads((tmp_path / "res" / "clla_scaling.json").read_text())
    assert len(js["results"]) == 3 * len(A.SCALE_VARIANTS) + len(A.NOISE_VARIANTS)
    assert js["steps"] == [1, 4, 16] and set(js["summary"]) == {n for n, _ in A.SCALE_VARIANTS}
    assert all("b" in js["summary"][n] for n, _ in A.SCALE_VARIANTS if n != "mha")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "res" / "clla_scaling.png").stat().st_size > 0
    capsys.readouterr()
    A.main(argv)                                   # restart: nothing trains again
    assert capsys.readouterr().out.count("reused") == len(js["results"])
    with pytest.raises(ValueError, match="4x the previous"):
        A.main(["--scaling", "--scaling_steps=4,8"])
