"""
The caches side by side on one attention layer (the targets of README "ZipCache in five steps"): real bytes, prefill time and one
decode step at a long context, every ratio measured against the dense cache in the same run.

    python experiments/bench_cache.py                     # 4k tokens, 8 query / 2 KV heads, head_dim 64 and 128, CPU
    python experiments/bench_cache.py --tokens 1024 --reps 1   # a quick look
    python experiments/bench_cache.py --latent --tokens 1024   # MHA vs MLA/CLLA decode through the whole model (below)

Protocol. Fresh random q, k, v (one outlier key channel, as real keys have) are handed to each cache's `attend` as a
prefill, then `--steps` single-token decode steps follow. Repetitions are interleaved across caches (rep 1 of every
cache, then rep 2, ...) so that drift of a shared machine hits all of them alike; times are medians, and a ratio x
is the median over repetitions of (this cache's time / the dense cache's time in the same repetition). Prefill = the
whole `attend` call (dense: SDPA + storing fp16; ZipCache: SDPA + probe attention + split + quantize + pack; MiKV:
the full attention matrix); a line after the table times ZipCache's probe attention alone. Decode = one `attend` of
a single token (ZipCache: the PyTorch path on CPU, the Triton kernel on CUDA). Ratios: real = dense fp16 bytes / nbytes() with everything counted; paper = the paper's formula.

--latent: the whole model at the project's default CLLA shape (train.py `small`: dim 512, 8 layers, 16 heads x 32;
d_c 128, d_r 16), untrained weights, batch 1: MHA with a DenseCache against MLA, CLLA and CLLA-quant (int4 per
token, README "CLLA") with their LatentCache, and CLLA-quant once more with the dequantize-everything reference
decode. Each is prefilled with the same --tokens random ids; then the variants take turns, --steps decode steps
each, --reps times. tok/s = 1 / median step time; x = latent tok/s over MHA tok/s (>= 1: the latent is faster).
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

import saliency
from cache import ZipCacheConfig
from experiment_flags import POSITIVE, Parser, numbers
from generate import make_cache, sync
from model import ATTN_PRESETS, ModelConfig, Transformer
from train import PRESETS

CACHES = ["dense", "zipcache", "kivi", "h2o", "mikv"]


def run(D, args, device):
    H, Hkv, T = args.heads, args.kv_heads, args.tokens
    cfg = ModelConfig(dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv, head_dim=D, vocab_size=64,
                      max_seq_len=T + args.steps)
    g = torch.Generator().manual_seed(0)
    dt = torch.float32 if device.type == "cpu" else torch.float16
    q, k, v = (torch.randn(1, h, T, D, generator=g).to(device, dt) for h in (H, Hkv, Hkv))   # [1, h, T, D]
    k[..., 3] += 4.0
    steps = [tuple(torch.randn(1, h, 1, D, generator=g).to(device, dt) for h in (H, Hkv, Hkv))
             for _ in range(args.steps)]
    pre, dec, ratios = {n: [] for n in CACHES}, {n: [] for n in CACHES}, {}
    zc = ZipCacheConfig()       # the default's probe rows, to time the probe attention on its own (probe_ms)
    rows = saliency.probe_positions(T, zc.probe_strategy, zc.probe_recent, zc.probe_random,
                                    torch.Generator().manual_seed(zc.seed))
    probe = []
    for _ in range(args.reps):
        sync(device)
        t0 = time.perf_counter()
        saliency.probe_scores(q, k, rows, zc.score, zc.norm)
        sync(device)
        probe.append(time.perf_counter() - t0)
        for name in CACHES:
            c = make_cache(name, cfg)
            sync(device)
            t0 = time.perf_counter()
            c.attend(0, q, k, v)
            sync(device)
            pre[name].append(time.perf_counter() - t0)
            ratios[name] = c.ratios()                 # after the prefill: T tokens, no decode buffer yet
            for s in steps:
                t0 = time.perf_counter()
                c.attend(0, *s)
                sync(device)
                dec[name].append(time.perf_counter() - t0)
    def x(t, n):  # median of the per-repetition ratios: dense ran just before, so drift between reps cancels
        return statistics.median(a / b for a, b in zip(t[n], t["dense"]))

    out = []
    for n in CACHES:
        out.append(dict(cache=n, D=D, real=ratios[n]["real"], paper=ratios[n]["paper"],
                        prefill_ms=statistics.median(pre[n]) * 1e3, prefill_x=x(pre, n),
                        decode_ms=statistics.median(dec[n]) * 1e3, decode_x=x(dec, n)))
    # of ZipCache's prefill, the probe attention alone (LOG.md, 2026-12-02, one layer at 4k), as a share of dense's
    out[CACHES.index("zipcache")].update(probe_ms=statistics.median(probe) * 1e3,
                                         probe_x=statistics.median(a / b for a, b in zip(probe, pre["dense"])))
    return out


LATENT_VARIANTS = [("mha", dict(attn="mha"), False), ("mla", dict(attn="mla"), False),
                   ("clla", dict(ATTN_PRESETS["clla"]), False), ("clla-quant", dict(ATTN_PRESETS["clla-quant"]), False),
                   ("clla-quant reference", dict(ATTN_PRESETS["clla-quant"]), True)]


def run_latent(args, device):
    """Decode tok/s of the whole model, MHA vs the latent variants, interleaved step blocks (see the docstring)."""
    shape = {k: v for k, v in PRESETS["small"].items() if k != "block_size"}
    T = args.tokens
    ids = torch.randint(0, 256, (1, T + args.steps * args.reps + 1), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, ov, reference in LATENT_VARIANTS:
        torch.manual_seed(0)
        cfg = ModelConfig(**{**shape, **ov, "vocab_size": 256, "max_seq_len": ids.shape[1]})
        model = Transformer(cfg).to(device).eval()
        cache = make_cache("dense", cfg)          # DenseCache for mha, LatentCache for mla/clla
        if reference:                             # every decode step dequantizes the whole history
            cache.attend_latent = cache.attend_reference
        model(ids[:, :T].to(device), cache=cache, last_only=True)                           # prefill
        runs[name] = [model, cache, T, []]
    for _ in range(args.reps):
        for name, run_ in runs.items():
            model, cache, t, times = run_
            for _ in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                model(ids[:, t:t + 1].to(device), cache=cache)                              # one decode step
                sync(device)
                times.append(time.perf_counter() - t0)
                t += 1
            run_[2] = t
    tps = {n: 1 / statistics.median(r[3]) for n, r in runs.items()}
    return [dict(model=n, tok_s=tps[n], x=tps[n] / tps["mha"], kv_pct=100 / r[1].ratios()["real"])
            for n, r in runs.items()]


# comma-separated head sizes, each divisible by 4 (the 2/4-bit planar packing)
head_dims = numbers(int, lambda d: d >= 4 and d % 4 == 0, "divisible by 4 (2/4-bit packing)", "64,128")


def main(argv=None):
    p = Parser(prog="bench_cache.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--tokens", type=POSITIVE, default=4096, help="prompt length (cached tokens)")
    p.add_argument("--heads", type=POSITIVE, default=8, help="query heads")
    p.add_argument("--kv_heads", type=POSITIVE, default=2)
    p.add_argument("--head_dims", type=head_dims, default="64,128")
    p.add_argument("--steps", type=POSITIVE, default=8, help="decode steps timed per repetition")
    p.add_argument("--reps", type=POSITIVE, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=POSITIVE, default=2)
    p.add_argument("--latent", action="store_true", help="whole-model decode, MHA vs MLA/CLLA (docstring)")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv_heads {args.kv_heads}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:1")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} but no CUDA GPU is visible; use --device cpu")
    torch.set_num_threads(args.threads)
    if args.latent:
        print(f"whole model, default CLLA shape (dim 512, 8 layers, 16 x 32; d_c 128, d_r 16), {args.tokens}-token "
              f"context, batch 1, {device} ({torch.get_num_threads()} threads), median of {args.reps} x {args.steps} "
              f"interleaved decode steps; x = tok/s / MHA tok/s")
        print("| model | decode tok/s | x MHA | KV % of MHA |")
        print("|---|---|---|---|")
        with torch.no_grad():
            rows = run_latent(args, device)
        for r in rows:
            print(f"| {r['model']} | {r['tok_s']:.1f} | {r['x']:.2f} | {r['kv_pct']:.2f} |", flush=True)
        return rows
    print(f"one layer, {args.heads} query / {args.kv_heads} KV heads, {args.tokens} tokens, batch 1, {device} "
          f"({torch.get_num_threads()} threads), medians of {args.reps} prefills and {args.reps * args.steps} "
          f"decode steps; x = time / dense time")
    print(f"| cache | head_dim | real × | paper × | prefill ms | prefill x | decode ms | decode x |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with torch.no_grad():
        for D in args.head_dims:
            for r in run(D, args, device):
                rows.append(r)
                print(f"| {r['cache']} | {D} | {r['real']:.2f} | {r['paper']:.2f} | {r['prefill_ms']:.1f} | "
                      f"{r['prefill_x']:.2f} | {r['decode_ms']:.2f} | {r['decode_x']:.2f} |", flush=True)
    for r in rows:
        if "probe_ms" in r:
            print(f"head_dim {r['D']}: of ZipCache's prefill, the probe attention alone (saliency.probe_scores, the "
                  f"default's 5% recent + 5% random rows) takes {r['probe_ms']:.1f} ms = {r['probe_x']:.2f} x the "
                  f"dense prefill")
    return rows


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a cache's own check (e.g. a shape it does not support): one line
        sys.exit(f"bench_cache.py: error: {e}")
