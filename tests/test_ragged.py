"""Ragged batches: left-padded prompts with cache.set_padding. Each sequence of the batch must get what it gets run
alone: the same logits through the model and DenseCache (prefill and decode), and with ZipCache the same split,
the same bytes and the same decode logits; the caches without a padding mask refuse the batch in one line."""
import pytest
import torch

import cache as C
import generate as G
from model import ModelConfig, Transformer

LENGTHS = [13, 7, 20]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=128, **kw)
    return Transformer(cfg).eval()


def prompts(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]


def left_pad(batch):
    T = max(map(len, batch))
    pad = [T - len(p) for p in batch]
    return torch.tensor([[0] * n + p for n, p in zip(pad, batch)]), pad


def run(model, cache, idx, pad=None, steps=4, nxt=None):
    """Prefill idx [B, T], then `steps` decode steps feeding nxt [B, steps]: logits [B, 1 + steps, V] (the last
    prompt token's, then each step's)."""
    cache.reset()
    if pad is not None:
        cache.set_padding(pad)
    out = [model(idx, cache=cache)[0][:, -1]]
    for i in range(steps):
        out.append(model(nxt[:, i:i + 1], cache=cache)[0][:, -1])
    return torch.stack(out, 1)


@torch.no_grad()
def test_dense_ragged_matches_alone():
    model = tiny()
    batch = prompts()
    idx, pad = left_pad(batch)
    nxt = torch.randint(1, 64, (len(batch), 4), generator=torch.Generator().manual_seed(2))
    cache = C.DenseCache(model.config, dtype=torch.float32)
    got = run(model, cache, idx, pad, nxt=nxt)                                            # [B, 5, V]
    for b, p in enumerate(batch):
        alone = run(model, C.DenseCache(model.config, dtype=torch.float32), torch.tensor([p]), nxt=nxt[b:b + 1])
        torch.testing.assert_close(got[b], alone[0], atol=1e-5, rtol=0)
        # the whole prompt too, not only its last token
        cache.reset()
        cache.set_padding(pad)
        full = model(idx, cache=cache)[0][b, pad[b]:]
        torch.testing.assert_close(full, model(torch.tensor([p]), cache=C.DenseCache(model.config, dtype=torch.float32))[0][0],
                                   atol=1e-5, rtol=0)
    # bytes: the padded rows are not counted; the dense reference counts real tokens only
    alone_bytes = 0
    for p in batch:
        c1 = C.DenseCache(model.config, dtype=torch.float32)
        model(torch.tensor([p]), cache=c1)
        alone_bytes += c1.dense_nbytes()
    cache.reset()
    cache.set_padding(pad)
    model(idx, cache=cache)
    assert cache.dense_nbytes() == alone_bytes


@torch.no_grad()
def test_zero_padding_is_no_padding():
    model = tiny()
    idx = torch.tensor(prompts([9, 9]))
    c0, c1 = G.make_cache("dense", model.config), G.make_cache("dense", model.config)
    c1.set_padding([0, 0])
    assert c1.pad is None
    torch.testing.assert_close(model(idx, cache=c0)[0], model(idx, cache=c1)[0], atol=0, rtol=0)


ZIP = dict(recompress_every=3, n_sink=2, n_recent=2, k_group=4, keep_saliency_mask=True, kernel="torch")


@torch.no_grad()
def test_zipcache_ragged_matches_alone():
    model = tiny(seed=3)
    batch = prompts(seed=4)
    idx, pad = left_pad(batch)
    steps = 7                                  # crosses two flushes of recompress_every 3
    nxt = torch.randint(1, 64, (len(batch), steps), generator=torch.Generator().manual_seed(5))
    cache = G.make_cache("zipcache", model.config, **ZIP)
    got = run(model, cache, idx, pad, steps=steps, nxt=nxt)
    total = 0
    for b, p in enumerate(batch):
        one = G.make_cache("zipcache", model.config, **ZIP)
        alone = run(model, one, torch.tensor([p]), steps=steps, nxt=nxt[b:b + 1])
        torch.testing.assert_close(got[b], alone[0], atol=1e-5, rtol=0)   # fp32 rounding (measured ~1e-6)
        sub = cache.subs[b]
        assert sub.nbytes() == one.nbytes()
        total += one.nbytes()
        for layer in range(model.config.n_layers):
            assert torch.equal(sub.salient_mask(layer), one.salient_mask(layer))
            for p_ in ("hi", "lo"):   # the same stored codes
                a, o = getattr(sub.layers[layer], p_), getattr(one.layers[layer], p_)
                assert torch.equal(a.codes["k_codes"], o.codes["k_codes"])
                assert torch.equal(a.codes["v_codes"], o.codes["v_codes"])
    assert cache.nbytes() == total
    assert cache.ratios()["real"] > 0.5    # 3-row blocks: nested key bases (16 B per channel) outweigh the codes
    with pytest.raises(ValueError, match="per sequence"):
        cache.kv(0)


@pytest.mark.parametrize("name", ["kivi", "h2o", "mikv"])
def test_other_caches_refuse_ragged(name):
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=128)
    c = G.make_cache(name, cfg, **({"group": 8, "residual": 16} if name == "kivi" else {}))
    with pytest.raises(ValueError, match="ragged batches"):
        c.set_padding([0, 3])
    with pytest.raises(ValueError, match="prompts of unequal lengths"):
        C.check_prompt_lengths([3, 5], c)


def test_latent_and_cla_refuse_ragged():
    for attn in ("cla", "mla"):
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2 if attn == "cla" else None, vocab_size=64,
                          max_seq_len=128, attn=attn)
        with pytest.raises(ValueError, match="prompts of unequal lengths"):
            C.check_prompt_lengths([3, 5], G.make_cache("dense", cfg))


@torch.no_grad()
@pytest.mark.parametrize("name", ["dense", "zipcache"])
def test_generate_ragged_list(name):
    model = tiny()
    batch = prompts([5, 11])
    opts = dict(recompress_every=3) if name == "zipcache" else {}
    ids, _ = G.generate(model, batch, G.make_cache(name, model.config, **opts), 6)
    for b, p in enumerate(batch):
        alone, _ = G.generate(model, p, G.make_cache(name, model.config, **opts), 6)
        assert ids[b] == alone[0]


@torch.no_grad()
def test_dense_ragged_chunk_after_prefill_and_bad_padding():
    model = tiny()
    batch = prompts([6, 10])
    idx, pad = left_pad(batch)
    chunk = torch.randint(1, 64, (2, 3), generator=torch.Generator().manual_seed(7))
    cache = C.DenseCache(model.config, dtype=torch.float32)
    cache.set_padding(pad)
    model(idx, cache=cache)
    got = model(chunk, cache=cache)[0]                                                 # a 3-token chunk, causal
    for b, p in enumerate(batch):
        one = C.DenseCache(model.config, dtype=torch.float32)
        model(torch.tensor([p]), cache=one)
        torch.testing.assert_close(got[b], model(chunk[b:b + 1], cache=one)[0][0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="after the prefill"):
        cache.set_padding(pad)
    cache.reset()
    with pytest.raises(ValueError, match="negative padding"):
        cache.set_padding([0, -1])
    cache.set_padding([0, 10])
    with pytest.raises(ValueError, match="every sequence needs one real token"):
        model(idx, cache=cache)
