"""
Line retrieval and perplexity under every KV cache: the ZipCache paper's Fig. 1 / Fig. 5 comparison and its
Table 1 (granularity), Table 2 (probes) and Table A (saliency metric) ablations, on the models trained here or on
any Llama checkpoint.

    python eval.py --quick                       # the README's table: a few minutes on a laptop CPU
    python eval.py                               # more examples, line counts and sweep points
    python eval.py --checkpoint ~/Meta-Llama-3-8B-Instruct --chat --device cuda --lines 100,200 --n 100

Protocol. Each prompt (retrieval.py: N lines, then a question) is prefilled once and every cache receives the same
q, k, v: the prefill output is exact SDPA for every cache (the cache contract), so one forward serves them all
(FanOut below) and each cache then compresses what it was handed. Then each cache greedily decodes the answer on
its own; with --hold_back K the last K prompt tokens are fed as decode steps too, so that every answer token is
predicted through the compressed cache (with K = 0 the first answer token comes from the exact prefill).
Perplexity: windows of held-out text, the first part prefilled, the rest fed one token at a time (teacher forcing)
through each cache, so quantization error reaches every scored prediction.

Everything printed comes from this run; results/eval.md puts the paper's numbers beside ours where it has them.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import data as datalib
import model as M
import quant
import retrieval
import saliency
import weights
from cache import DenseCache, make_cache
from generate import pick_device, sync
from tokenizer import load_tokenizer, special_probe_ids

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "ckpt", "retrieval", "ckpt.pt")
DEFAULT_PPL_CKPT = os.path.join(HERE, "ckpt", "stdlib-byte", "ckpt.pt")

# the paper's numbers (README), LLaMA3-8B GSM8k unless said otherwise
PAPER = {
    "probe": {"random": 47.46, "special": 46.78, "recent": 51.10, "recent+random": 52.08},   # Table 2, 10% probes
    "granularity": {"tokenwise / tokenwise": 49.81, "channelwise / CST": 54.74},            # Table 1, 4-bit
    "zip_minus_mikv_200": 42.0,                                                            # line retrieval, 200 lines
}


# -----------------------------------------------------------------------------
# simulated quantization at a chosen granularity (the Table 1 ablation)

GRANULARITIES = ("groupwise", "tokenwise", "channelwise", "cst")


def fake_quantize(x, bits, gran, group=32):
    """x [B, H, T, D] -> dequantize(quantize(x)) at one granularity (quant.py), and the number of fp16 parameters."""
    B, H, T, D = x.shape
    if gran == "groupwise":       # 32 consecutive channels of one token
        c, s, m = quant.quantize_groupwise(x, bits, group=group, dim=-1)
        return quant.dequantize_groupwise(c, s, m, group=group, dim=-1), 2 * B * H * T * (D // group)
    if gran == "tokenwise":       # one pair per token over its D channels
        c, s, m = quant.quantize_tokenwise(x, bits)
        return quant.dequantize(c, s, m), 2 * B * H * T
    if gran == "channelwise":     # one pair per channel over the tokens
        c, s, m = quant.quantize_channelwise(x, bits)
        return quant.dequantize(c, s, m), 2 * B * H * D
    if gran == "cst":             # channel normalizer, then one pair per token (ZipCache values)
        c, s, m, chan = quant.quantize_cst(x, bits)
        return quant.dequantize_cst(c, s, m, chan), B * H * D + 2 * B * H * T
    raise ValueError(f"granularity {gran!r} is unknown; use one of {GRANULARITIES}")


class SimQuantCache(DenseCache):
    """*Simulated* quantization for the granularity ablation (paper Table 1): the prompt's K and V are quantized at
    `bits` with the given granularities and kept dequantized in fp16; decode tokens stay fp16. It isolates the
    quantizer's error from storage, so its ratio is the paper formula over the parameter count (no real bytes)."""
    name = "simquant"

    def __init__(self, config, bits=4, k_gran="channelwise", v_gran="cst", **kw):
        for g in (k_gran, v_gran):
            if g not in GRANULARITIES:
                raise ValueError(f"granularity {g!r} is unknown; use one of {GRANULARITIES}")
        self.bits, self.k_gran, self.v_gran = bits, k_gran, v_gran
        super().__init__(config, **kw)

    def _prefill(self, layer, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        kh, pk = fake_quantize(k, self.bits, self.k_gran)
        vh, pv = fake_quantize(v, self.bits, self.v_gran)
        st, _ = super()._prefill(layer, q, kh.to(k.dtype), vh.to(v.dtype))
        st.n_el, st.n_par = 2 * k.numel(), pk + pv
        return st, out

    def ratios(self):
        st = [s for s in self.layers if s is not None]
        el, par = sum(s.n_el for s in st), sum(s.n_par for s in st)
        return dict(real=float("nan"), paper=16 * el / (self.bits * el + 16 * par))


def build_cache(spec, config):
    if spec["cache"] == "simquant":
        return SimQuantCache(config, **spec["opts"])
    return make_cache(spec["cache"], config, **spec["opts"])


# -----------------------------------------------------------------------------
# the configurations: (group, label, cache name, options)

def configurations(quick):
    C = []

    def add(group, label, cache, **opts):
        C.append(dict(group=group, label=label, cache=cache, opts=opts))

    # the comparison (Fig. 1 / Fig. 5 analogue); H2O keeps ~20% (about ZipCache's ~5x byte budget)
    add("main", "dense fp16", "dense")
    add("main", "ZipCache 4/2 (60% salient)", "zipcache", salient_ratio=0.6)
    add("main", "KIVI-2", "kivi", bits=2)
    add("main", "KIVI-4", "kivi", bits=4)
    add("main", "H2O (20% kept)", "h2o", keep_ratio=0.2)
    add("main", "MiKV 4/2 (60% salient)", "mikv", salient_ratio=0.6)
    # sweeps for the accuracy-vs-ratio plot; ZipCache's is also the salient-ratio sweep
    zr = (0.0, 0.2, 0.4, 0.8, 1.0) if not quick else (0.0, 0.2, 0.4, 1.0)
    for r in zr:
        add("sweep", f"ZipCache {r:.0%} salient", "zipcache", salient_ratio=r)
    for r in ((0.0, 0.2, 0.4, 0.8) if not quick else (0.2, 0.4)):
        add("sweep", f"MiKV {r:.0%} salient", "mikv", salient_ratio=r)
    for kr in ((0.1, 0.3, 0.5) if not quick else (0.1, 0.4)):
        add("sweep", f"H2O ({kr:.0%} kept)", "h2o", keep_ratio=kr)
    # Table 2: probe strategy at 10% probes and 40% salient
    for mode in ("random", "special", "recent", "recent+random"):
        add("probe", mode, "zipcache", salient_ratio=0.4, probe_strategy=mode, probe_ratio=0.1)
    # Table A: saliency metric, from the exact attention matrix (every row a probe) at 40% salient
    for score in ("locality", "accumulated", "normalized"):
        add("score", score, "zipcache", salient_ratio=0.4, probe_strategy="all", score=score)
    # Table 1: granularity at 4 bits (the paper's setting) and at 2 bits (where a small model shows differences)
    for bits in (4, 2):
        for kg, vg in (("groupwise", "groupwise"), ("tokenwise", "tokenwise"), ("channelwise", "tokenwise"),
                       ("channelwise", "cst")):
            add("granularity", f"{kg} / {'CST' if vg == 'cst' else vg} ({bits}-bit)", "simquant", bits=bits,
                k_gran=kg, v_gran=vg)
    return C


# -----------------------------------------------------------------------------
# one prefill for many caches

class FanOut:
    """Looks like a cache to the model during a prefill: hands every layer's q, k, v to each cache and returns the
    first cache's output (all are exact SDPA by contract). Records the time each cache spends in attend()."""

    def __init__(self, caches, device):
        self.caches, self.device = caches, device
        self.attend_s = [0.0] * len(caches)

    @property
    def pos(self):
        return self.caches[0].pos

    def attend(self, layer, q, k, v):
        outs = []
        for i, c in enumerate(self.caches):
            sync(self.device)
            t = time.perf_counter()
            outs.append(c.attend(layer, q, k, v))
            sync(self.device)
            self.attend_s[i] += time.perf_counter() - t
        return outs[0]


@torch.no_grad()
def prefill_all(model, idx, specs, special):
    """Prefill idx [B, L] once into a fresh cache per spec -> (caches, last logits [B, V], prefill seconds per cache)."""
    device = idx.device
    caches = [build_cache(s, model.config) for s in specs]
    pos = saliency.special_positions(idx, special)
    for c, s in zip(caches, specs):
        if s["opts"].get("probe_strategy") == "special":
            c.set_special_positions(pos)
    fan = FanOut(caches, device)
    sync(device)
    t = time.perf_counter()
    logits, _ = model(idx, cache=fan, last_only=True)
    sync(device)
    total = time.perf_counter() - t
    shared = total - sum(fan.attend_s)       # embeddings, projections, MLPs: the same work for every cache
    return caches, logits[:, -1], [shared + a for a in fan.attend_s]


@torch.no_grad()
def decode(model, cache, first, steps, feed=None):
    """Greedy decode through one cache. first [B] = next token from the prefill, or None when `feed` [B, K] holds
    prompt tokens still to be fed. Returns (generated ids [B, steps], decode seconds, tokens decoded per row)."""
    device = next(model.parameters()).device
    out, n = [], 0
    sync(device)
    t = time.perf_counter()
    if feed is not None:
        for j in range(feed.shape[1]):
            logits, _ = model(feed[:, j:j + 1], cache=cache)
            n += 1
        first = logits[:, -1].argmax(-1)
    nxt = first
    out.append(nxt)
    for _ in range(steps - 1):
        logits, _ = model(nxt[:, None], cache=cache)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        n += 1
    sync(device)
    return torch.stack(out, 1), time.perf_counter() - t, n


# -----------------------------------------------------------------------------
# line retrieval

def encode_prompt(tok, text, chat):
    if chat:  # Llama-3 instruct: the question as a user turn, the answer prefix as the start of the reply
        body, _, prefix = text.partition("\nAnswer: ")
        text = (f"<|start_header_id|>user<|end_header_id|>\n\n{body.strip()}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{prefix}")
    bos = tok.bos_id != tok.eos_id                 # Llama: <|begin_of_text|>; our models: none (records open with \n)
    return tok.encode(text, bos=bos, allowed_special="all" if chat else frozenset())


@torch.no_grad()
def run_retrieval(model, tok, specs, args, log, hold_back=0):
    style = "compact" if tok.spec.get("kind") == "words" else "longeval"
    steps = 3 if style == "compact" else 6
    device = next(model.parameters()).device
    special = special_probe_ids(tok)
    res = {i: {"acc": {}, "real": [], "paper": [], "prefill_ms": [], "decode_tok_s": []} for i in range(len(specs))}
    for n_lines in args.lines:
        exs = retrieval.examples(n_lines, args.n, args.split, args.seed, style)
        enc = [encode_prompt(tok, e["prompt"], args.chat) for e in exs]
        if max(map(len, enc)) + steps > model.config.max_seq_len:
            log(f"  {n_lines} lines: {max(map(len, enc))} prompt tokens exceed max_seq_len="
                f"{model.config.max_seq_len}; skipped")
            continue
        # caches need equal-length prompts in a batch: group by length, then chunk
        by_len = {}
        for i, ids in enumerate(enc):
            by_len.setdefault(len(ids), []).append(i)
        correct = [0] * len(specs)
        t0 = time.perf_counter()
        for L, members in sorted(by_len.items()):
            for b in range(0, len(members), args.batch_size):
                rows = members[b:b + args.batch_size]
                idx = torch.tensor([enc[i] for i in rows], device=device)
                hb = hold_back
                caches, last, pre_s = prefill_all(model, idx[:, :L - hb] if hb else idx, specs, special)
                first = None if hb else last.argmax(-1)
                for s, c in enumerate(caches):
                    gen, dt, n = decode(model, c, first, steps, idx[:, L - hb:] if hb else None)
                    for r, g in zip(rows, gen.tolist()):
                        correct[s] += retrieval.score(tok.decode(g), exs[r]["answer"])
                    ratios = c.ratios()
                    res[s]["real"].append(ratios["real"])
                    res[s]["paper"].append(ratios["paper"])
                    res[s]["prefill_ms"].append(1e3 * pre_s[s])
                    if n:
                        res[s]["decode_tok_s"].append(n * len(rows) / dt)
        for s in range(len(specs)):
            res[s]["acc"][n_lines] = 100.0 * correct[s] / len(exs)
        log(f"  {n_lines} lines (prompt {min(by_len)}-{max(by_len)} tokens, {len(exs)} examples): "
            f"{time.perf_counter() - t0:.1f}s; dense {res[0]['acc'][n_lines]:.1f}%")
    out = []
    for s, spec in enumerate(specs):
        r = res[s]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        out.append(dict(spec, acc=r["acc"], real=mean(r["real"]), paper=mean(r["paper"]),
                        prefill_ms=mean(r["prefill_ms"]), decode_tok_s=mean(r["decode_tok_s"])))
    return out, style


# -----------------------------------------------------------------------------
# perplexity under each cache (teacher-forced decode)

def heldout_tokens(ckpt_path, tok, ppl_text, log):
    """Held-out token ids: --ppl_text, else the stdlib files that come after the training corpus's size cap in
    data.py's fixed file order (never read by train.py, neither train nor val split)."""
    if ppl_text:
        with open(ppl_text, encoding="utf-8", errors="replace") as f:
            return tok.encode(f.read()), f"{ppl_text}"
    cap_mb = 8.0
    if os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        tc = ck.get("train_config") or {}
        if tc.get("data"):
            raise ValueError(f"{ckpt_path} was trained on --data={tc['data']!r}, not the stdlib; pass --ppl_text FILE "
                             f"with text it has not seen")
        cap_mb = tc.get("max_corpus_mb", cap_mb)
    root, rel = datalib.corpus_files("")
    total, cap, rest = 0, int(cap_mb * 2**20), []
    for p in rel:
        size = os.path.getsize(os.path.join(root, p))
        if cap and total < cap:
            total += size            # read (partly or wholly) by train.py
            continue
        rest.append(p)
    if not rest:
        raise ValueError("no held-out stdlib files after the training cap; pass --ppl_text FILE")
    docs, _ = datalib.read_corpus(root, rest, 2**20)   # 1 MB of held-out text is plenty
    return tok.encode("\n".join(docs)), f"{len(rest)} stdlib files after the {cap_mb:g} MB training cap ({root})"


@torch.no_grad()
def run_ppl(model, tok, ids, specs, args, log):
    device = next(model.parameters()).device
    P, Q = args.ppl_prefill, args.ppl_decode
    W = P + Q
    if W > model.config.max_seq_len:
        raise ValueError(f"--ppl_prefill + --ppl_decode = {W} exceed the model's max_seq_len="
                         f"{model.config.max_seq_len}; lower them")
    if len(ids) < W * args.ppl_windows:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than {args.ppl_windows} windows of {W}")
    stride = len(ids) // args.ppl_windows
    x = torch.tensor([ids[i * stride:i * stride + W] for i in range(args.ppl_windows)], device=device)  # [B, W]
    caches, _, pre_s = prefill_all(model, x[:, :P], specs, special_probe_ids(tok))
    ref, _ = model(x)                                                    # no cache at all: the fp32 reference
    ref_nll = F.cross_entropy(ref[:, P:W - 1].flatten(0, 1), x[:, P + 1:].flatten())
    out = []
    for s, c in enumerate(caches):
        nll, t = 0.0, time.perf_counter()
        for j in range(P, W - 1):           # feed token j, score the prediction of token j + 1
            logits, _ = model(x[:, j:j + 1], cache=c)
            nll += F.cross_entropy(logits[:, -1], x[:, j + 1], reduction="sum").item()
        sync(device)
        dt = time.perf_counter() - t
        out.append(dict(ppl=math.exp(nll / ((W - 1 - P) * x.shape[0])), ppl_real=c.ratios()["real"],
                        ppl_decode_tok_s=(W - 1 - P) * x.shape[0] / dt))
    log(f"  perplexity: {x.shape[0]} windows x ({P} prefilled + {Q - 1} teacher-forced decode tokens); no-cache "
        f"reference {math.exp(ref_nll.item()):.3f}")
    return out, math.exp(ref_nll.item())


# -----------------------------------------------------------------------------
# report

def fmt(x, spec="{:.2f}", na="–"):
    return na if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def ranking(d):
    return " > ".join(k for k, _ in sorted(d.items(), key=lambda kv: -kv[1]))


def agreement(ours, paper):
    """One honest sentence: the paper's order of these settings, ours, and whether they agree."""
    keys = [k for k in paper if k in ours]
    po = ranking({k: paper[k] for k in keys})
    oo = ranking({k: ours[k] for k in keys})
    same = po == oo
    best = max(keys, key=lambda k: paper[k])
    ours_best = [k for k in keys if ours[k] == max(ours[k2] for k2 in keys)]
    return (f"Paper order: {po}. Ours: {oo}. " + ("The orders agree." if same else
            f"The orders differ; the paper's best setting ({best}) is {'among ' if len(ours_best) > 1 else ''}"
            f"{'our best' if best in ours_best else 'not our best'}") + ("." if not same else ""))


def report(rows, args, meta, log_lines):
    L = args.lines
    main_line = max(L)
    by = lambda g: [r for r in rows if r["group"] == g]  # noqa: E731
    md = [f"# Line retrieval and perplexity under KV-cache compression\n",
          f"Produced by `{meta['command']}` in {meta['wall_s']:.0f} s on {meta['device']}. Retrieval model: "
          f"`{meta['checkpoint']}`; {args.n} {args.split}-split examples per line count, style {meta['style']}, "
          f"hold_back={args.hold_back}. Accuracy = exact match of the retrieved number (%). Real ratio = dense fp16 "
          f"bytes / the cache's `nbytes()` (everything stored); paper ratio = the paper's formula over the "
          f"quantized tokens. Prefill ms: one batch of up to {args.batch_size} prompts at {main_line} "
          f"lines (shared model work + this cache's attend); decode tok/s: rows x steps / s during answer decoding."]
    if meta.get("ppl_source"):
        md.append(f"\nPerplexity: `{meta['ppl_checkpoint']}` on held-out text ({meta['ppl_source']}): "
                  f"{args.ppl_windows} windows, {args.ppl_prefill} tokens prefilled, {args.ppl_decode - 1} predictions "
                  f"scored through the cache by teacher-forced decode (no-cache reference "
                  f"{meta['ppl_ref']:.3f}).\n")
    acc_cols = " | ".join(f"acc@{n}" for n in L)

    def table(rs, extra_head="", extra=lambda r: ""):
        head = f"| method | real × | paper × | {acc_cols} | ppl | prefill ms | decode tok/s |{extra_head}"
        sep = "|" + "---|" * (head.count("|") - 1)
        out = [head, sep]
        for r in rs:
            accs = " | ".join(fmt(r["acc"].get(n), "{:.1f}") for n in L)
            out.append(f"| {r['label']} | {fmt(r['real'])} | {fmt(r['paper'])} | {accs} | {fmt(r.get('ppl'), '{:.3f}')} "
                       f"| {fmt(r['prefill_ms'], '{:.0f}')} | {fmt(r['decode_tok_s'], '{:.0f}')} |{extra(r)}")
        return out

    def acc(r):
        return r["acc"].get(main_line, float("nan"))

    main = by("main")
    md += ["\n## Comparison (paper Fig. 1 / Fig. 5)\n"] + table(main)
    zip_ = next(r for r in main if r["cache"] == "zipcache")
    mikv = next(r for r in main if r["cache"] == "mikv")
    dense = next(r for r in main if r["cache"] == "dense")
    # matched ratio: the sweep point of each method closest to ZipCache's real ratio
    pool = main + by("sweep")
    matched = []
    for name in ("mikv", "kivi", "h2o"):
        cands = [r for r in pool if r["cache"] == name and not math.isnan(r["real"])]
        if cands:
            matched.append(min(cands, key=lambda r: abs(r["real"] - zip_["real"])))
    md.append(f"\nAt {main_line} lines: ZipCache {acc(zip_):.1f}% at {zip_['real']:.2f}× real vs dense "
              f"{acc(dense):.1f}% ({acc(zip_) - acc(dense):+.1f} points); ZipCache − MiKV = "
              f"{acc(zip_) - acc(mikv):+.1f} points (paper, 200 lines: +{PAPER['zip_minus_mikv_200']:.0f}). "
              "Closest to ZipCache's real ratio: " + "; ".join(
                  f"{r['label']} {acc(r):.1f}% at {r['real']:.2f}×" for r in matched) + ".")
    hb = by("holdback")
    if hb:
        md += [f"\n## Every answer token through the cache (hold_back={args.hold_back + 1})\n",
               "The prompt minus its last token is prefilled (so the probes and scores never see the question's final "
               "key token), then that token is fed as a decode step: the first answer token is also predicted through "
               "the compressed cache.\n"] + table(hb)
    md += ["\n## Sweeps (accuracy vs compression, `eval_fig1.png`; ZipCache rows = the salient-ratio sweep)\n"]
    md += table(sorted([r for r in pool if r["cache"] != "dense"], key=lambda r: (r["cache"], -r["real"])))
    probe = by("probe")
    if probe:
        md += ["\n## Probe strategy (paper Table 2: 10% probes, 40% salient)\n"]
        md += table(probe, " paper (GSM8k) |", lambda r: f" {fmt(PAPER['probe'].get(r['label']))} |")
        md.append("\n" + agreement({r["label"]: acc(r) for r in probe}, PAPER["probe"]) +
                  f" (ours: accuracy at {main_line} lines; 'special' = newline, colon, question mark and period "
                  f"tokens, our choice: the paper does not list its special tokens)")
    score = by("score")
    if score:
        md += ["\n## Saliency metric (paper Table A; exact attention, 40% salient)\n"] + table(score)
        md.append("\nThe paper gives no numbers for this ablation we could check [GAP]; our order: " +
                  ranking({r["label"]: acc(r) for r in score}) + ".")
    gran = by("granularity")
    if gran:
        md += ["\n## Quantization granularity (paper Table 1; simulated quantization of the prompt, K / V)\n"]
        pg = {"tokenwise / tokenwise (4-bit)": PAPER["granularity"]["tokenwise / tokenwise"],
              "channelwise / CST (4-bit)": PAPER["granularity"]["channelwise / CST"]}
        md += table(gran, " paper (GSM8k) |", lambda r: f" {fmt(pg.get(r['label']))} |")
        for bits in (4, 2):
            d = {r["label"].rsplit(" (", 1)[0]: acc(r) for r in gran if r["label"].endswith(f"({bits}-bit)")}
            if d:
                md.append(f"\n{bits}-bit order: {ranking(d)}." + (
                    f" Paper (4-bit): CST {PAPER['granularity']['channelwise / CST']} > tokenwise "
                    f"{PAPER['granularity']['tokenwise / tokenwise']}; ours: channelwise / CST "
                    f"{d.get('channelwise / CST', float('nan')):.1f} vs tokenwise "
                    f"{d.get('tokenwise / tokenwise', float('nan')):.1f}." if bits == 4 else ""))
    md += ["\n## Log\n", "```"] + log_lines + ["```", ""]
    return "\n".join(md)


def plot(rows, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); skipped the plot"
    n = max(args.lines)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = {"zipcache": ("ZipCache", "o-"), "mikv": ("MiKV", "s-"), "h2o": ("H2O", "^-"), "kivi": ("KIVI", "D-")}
    for name, (label, style) in series.items():
        pts = sorted((r["real"], r["acc"].get(n)) for r in rows
                     if r["cache"] == name and r["group"] in ("main", "sweep") and r["acc"].get(n) is not None)
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    dense = next(r for r in rows if r["cache"] == "dense")
    ax.axhline(dense["acc"].get(n, float("nan")), color="gray", ls="--", label="dense fp16")
    ax.set_xlabel("real compression ratio (dense fp16 bytes / cache bytes)")
    ax.set_ylabel(f"line retrieval accuracy at {n} lines (%)")
    ax.set_title("Accuracy vs compression (cf. ZipCache Fig. 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# -----------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", default=DEFAULT_CKPT, help="retrieval model: a ckpt.pt, an HF Llama dir or a Meta dir")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--quick", action="store_true", help="the README's table: fewer examples, line counts, sweep points")
    p.add_argument("--lines", default=None, help="comma-separated line counts (default 50,100,150,200; quick 100,200)")
    p.add_argument("--n", type=int, default=None, help="examples per line count (default 100; quick 40)")
    p.add_argument("--split", default="test", choices=list(retrieval.SPLITS))
    p.add_argument("--batch_size", type=int, default=20)
    p.add_argument("--hold_back", type=int, default=0, help="feed the last K prompt tokens as decode steps")
    p.add_argument("--chat", action="store_true", help="Llama-3 instruct chat template around the question")
    p.add_argument("--groups", default="main,sweep,probe,score,granularity,holdback",
                   help="configuration groups: main, sweep, probe, score, granularity, holdback (= main again with "
                        "the prompt's last token fed through the cache)")
    p.add_argument("--ppl_checkpoint", default="auto",
                   help="model for perplexity: auto = ckpt/stdlib-byte for our retrieval model, else --checkpoint; "
                        "'none' skips perplexity")
    p.add_argument("--ppl_text", default=None, help="held-out text file (default: stdlib files past the training cap)")
    p.add_argument("--ppl_windows", type=int, default=None, help="default 16; quick 8")
    p.add_argument("--ppl_prefill", type=int, default=128)
    p.add_argument("--ppl_decode", type=int, default=121, help="tokens per window after the prefill: > 100 so "
                   "ZipCache compresses one decode block; prefill + decode must stay within the length the model "
                   "was trained on (256 for ckpt/stdlib-byte)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out_dir", default=None,
                   help="default results/, and results/quick/ for --quick (so it never replaces the full run's files)")
    p.add_argument("--name", default="eval", help="output files: OUT_DIR/NAME.md, .json, _fig1.png")
    a = p.parse_args(argv)
    a.out_dir = a.out_dir or os.path.join(HERE, "results", *(["quick"] if a.quick else []))
    try:
        a.lines = [int(x) for x in (a.lines or ("100,200" if a.quick else "50,100,150,200")).split(",")]
    except ValueError:
        raise ValueError(f"--lines={a.lines!r}: give comma-separated whole numbers, e.g. --lines 100,200") from None
    # "is None", not "or": an explicit 0 is an error below, not the default
    a.n = (40 if a.quick else 100) if a.n is None else a.n
    a.ppl_windows = (8 if a.quick else 16) if a.ppl_windows is None else a.ppl_windows
    a.groups = a.groups.split(",")
    bad = set(a.groups) - {"main", "sweep", "probe", "score", "granularity", "holdback"}
    if bad or "main" not in a.groups:
        raise ValueError(f"--groups={','.join(a.groups)}: choose from main, sweep, probe, score, granularity, "
                         f"holdback (main is always needed)")
    if min(a.lines) < 1 or a.n < 1 or a.batch_size < 1 or a.hold_back < 0:
        raise ValueError("--lines, --n and --batch_size must be positive, --hold_back >= 0")
    if a.ppl_windows < 1 or a.ppl_prefill < 1 or a.ppl_decode < 2:
        raise ValueError(f"--ppl_windows={a.ppl_windows}, --ppl_prefill={a.ppl_prefill}, --ppl_decode={a.ppl_decode}: "
                         f"windows and prefill must be at least 1, decode at least 2")
    pick_device(a.device)          # a bad or unavailable --device is one line now, before any work
    return a


def load(path, tokenizer, device, dtype):
    return weights.load_model_and_tokenizer(path, tokenizer, device, dtype)


def main(argv=None):
    args = get_args(argv)
    t_start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    specs = [s for s in configurations(args.quick) if s["group"] in args.groups]
    model, tok = load(args.checkpoint, args.tokenizer, device, dtype)
    log(f"retrieval: {args.checkpoint} ({model.config.n_layers} layers, {model.config.n_heads} heads / "
        f"{model.config.n_kv_heads} kv x {model.config.head_dim}), {len(specs)} cache configurations, lines {args.lines}")
    rows, style = run_retrieval(model, tok, specs, args, log, args.hold_back)
    if "holdback" in args.groups:
        log(f"again, the main caches with hold_back={args.hold_back + 1}:")
        again = [dict(s, group="holdback") for s in specs if s["group"] == "main"]
        rows_hb, _ = run_retrieval(model, tok, again, args, log, args.hold_back + 1)
    else:
        rows_hb = []

    meta = dict(checkpoint=os.path.relpath(args.checkpoint, HERE) if os.path.isfile(args.checkpoint) else
                args.checkpoint, style=style, device=f"{device.type} ({torch.get_num_threads()} threads)"
                if device.type == "cpu" else torch.cuda.get_device_name(device),
                command=" ".join(["python eval.py", *(sys.argv[1:] if argv is None else argv)]))
    ppl_ck = args.ppl_checkpoint
    if ppl_ck == "auto":
        ppl_ck = DEFAULT_PPL_CKPT if tok.spec.get("kind") == "words" else args.checkpoint
    if ppl_ck != "none":
        if not os.path.exists(ppl_ck):
            log(f"perplexity skipped: {ppl_ck} not found (train it, or pass --ppl_checkpoint / 'none')")
        else:
            pm, ptok = load(ppl_ck, None if ppl_ck != args.checkpoint else args.tokenizer, device, dtype)
            ids, source = heldout_tokens(ppl_ck, ptok, args.ppl_text, log)
            ppl_rows, ref = run_ppl(pm, ptok, ids, specs, args, log)
            for r, p in zip(rows, ppl_rows):
                r.update(p)
            meta.update(ppl_checkpoint=os.path.relpath(ppl_ck, HERE) if os.path.isfile(ppl_ck) else ppl_ck,
                        ppl_source=source, ppl_ref=ref)
    rows += rows_hb
    meta["wall_s"] = time.perf_counter() - t_start
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, args.name)
    log(plot(rows, args, base + "_fig1.png"))
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, args=vars(args), rows=rows), f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(report(rows, args, meta, log_lines))
    print(f"wrote {base}.md, {base}.json ({meta['wall_s']:.0f} s)")
    return rows, meta


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")
