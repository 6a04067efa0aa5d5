"""
The CLLA ablation (spec/clla.md §8): every attention variant trained by train.py on the same corpus, the same tokens,
seed and schedule, with the parameter budget matched to MHA (within ±5%) through the SwiGLU hidden size. Then, per run:
validation loss, the loss of a teacher-forced decode through the real cache (int4 bytes for the quant runs), KV bits
per token and % of MHA, parameters, train and decode tokens/s.

    python ablate_clla.py                               # everything, 2 runs at a time, CPU (~20 min on 2 cores)
    python ablate_clla.py --only=mha,clla-quant --steps=40   # a quick subset
    python ablate_clla.py --report                      # rebuild results/ from finished runs, no training

Writes out/ablate_clla/<run>/ (train.py's ckpt.pt and log, result.json) and results/clla_ablation.{md,json,png}.
The scale is a smoke test (a 0.9M-parameter model, ~0.36M training tokens per run): it ranks designs, it does not
reproduce the paper.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time

import torch

import cache as C
import data as datalib
import model as M
import train
from tokenizer import load_tokenizer

OUT, RESULTS = os.path.join("out", "ablate_clla"), "results"
# the CPU smoke shape of spec §2: dim 128, 4 layers, 8 heads x 16 -> MLA d_c 64, d_r 8, nope = v = 16
BASE = dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=8, max_seq_len=256, vocab_size=257)
# one schedule for every run (train.py flags; spelled out so train.py's defaults can change without moving the runs)
TRAIN = dict(batch_size=8, block_size=128, max_iters=350, warmup_iters=35, learning_rate=2e-3, min_lr=2e-4,
             lr_decay_iters=0, weight_decay=0.1, grad_clip=1.0, grad_accum=1, seed=1337, data="", tokenizer="bytes",
             max_corpus_mb=8.0, val_frac=0.1, device="cpu", dtype="float32", compile=False, eval_iters=2,
             log_interval=50)
Q4 = M.ATTN_PRESETS["clla-quant"]
RUNS = [  # (name, spec §8 run, ModelConfig overrides, TrainConfig overrides)
    ("mha", "1", dict(attn="mha"), {}),
    ("gqa", "2", dict(attn="gqa", n_kv_heads=2), {}),                       # n_kv = n_h / 4
    ("mqa", "3", dict(attn="mqa", n_kv_heads=1), {}),
    ("mla", "4", dict(attn="mla"), {}),
    ("cla-gqa", "5", dict(attn="cla", n_kv_heads=2), {}),                   # CLA2 on GQA-4
    ("cla-mqa", "5", dict(attn="cla", n_kv_heads=1), {}),                   # CLA2 on MQA
    ("clla", "6", dict(attn="clla", share_mode="latent+rope"), {}),
    ("clla-latent_only", "7", dict(attn="clla", share_mode="latent_only"), {}),
    ("clla-rope_only", "7b", dict(attn="clla", share_mode="rope_only"), {}),
    ("clla-kvproj", "8", dict(attn="clla", share_mode="latent+rope", share_kv_proj=True), {}),
    ("clla-quant", "9", dict(Q4), {}),                                      # int4 per token, k_R int4 (preset)
    ("clla-quant-g32", "10", dict(Q4, kv_quant_group=32), {}),
    ("clla-quant-ptq", "11", dict(Q4, kv_ste=False), {}),                   # quantized only at inference
    ("mha-seed2", "noise", dict(attn="mha"), dict(seed=2024)),              # same recipe, another seed: the noise
]
MARKER = "<!-- hand-written reading below; ablate_clla.py keeps it when it rewrites the tables above -->"
EVAL_BATCHES, DECODE_B, DECODE_PROMPT = 40, 8, 16   # my val set: 40 x 8 x 128 tokens; decode: batch 8, 16-token prompt


def config_of(overrides, hidden_dim=None):
    return M.ModelConfig(**{**BASE, **overrides, **({"hidden_dim": hidden_dim} if hidden_dim else {})})


def n_params(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in M.Transformer(cfg).parameters())


def matched_hidden(overrides, target):
    """The SwiGLU hidden size (a multiple of 8) that brings the total parameter count closest to `target`.
    Parameters are linear in it: 3 * dim * n_layers per unit."""
    per_unit = 3 * BASE["dim"] * BASE["n_layers"]
    p0 = n_params(config_of(overrides, 8)) - 8 * per_unit
    return max(8, 8 * round((target - p0) / per_unit / 8))


# -----------------------------------------------------------------------------
# one run: train (train.py), then evaluate the checkpoint

@torch.no_grad()
def loss_on(model, batches, cache_eval=False):
    """Mean loss over (x, y) batches; cache_eval: prefill DECODE_PROMPT tokens, then teacher-forced decode one token
    at a time through make_cache('dense', ...) (the real cache of the variant). Returns (loss, decode tok/s)."""
    total, n, t_dec, n_dec = 0.0, 0, 0.0, 0
    for x, y in batches:
        if not cache_eval:
            logits = model(x)[0]
        else:
            cache = C.make_cache("dense", model.config)
            parts = [model(x[:, :DECODE_PROMPT], cache=cache)[0]]
            t0 = time.perf_counter()
            for t in range(DECODE_PROMPT, x.shape[1]):
                parts.append(model(x[:, t:t + 1], cache=cache)[0])
            t_dec += time.perf_counter() - t0
            n_dec += x.shape[0] * (x.shape[1] - DECODE_PROMPT)
            logits = torch.cat(parts, 1)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        n += y.numel()
    return total / n, (n_dec / t_dec if t_dec else float("nan"))


def run_one(job):
    name, spec_run, overrides, toverrides, hidden, steps, meta = job
    torch.set_num_threads(1)
    out_dir = os.path.join(OUT, name)
    shutil.rmtree(out_dir, ignore_errors=True)     # this run's own folder only: train.py refuses to overwrite
    os.makedirs(out_dir)
    tconf = {**TRAIN, **toverrides, "max_iters": steps, "eval_interval": steps, "out_dir": out_dir}
    argv = [f"--{k}={v}" for k, v in {**tconf, **BASE, **overrides, "hidden_dim": hidden}.items()]
    logf = open(os.path.join(out_dir, "train.log"), "w")

    def log(*a, **k):
        print(*a, file=logf, flush=True)

    t0 = time.perf_counter()
    res = train.main(argv, log=log)
    train_s = time.perf_counter() - t0
    model, _ = M.load_model(os.path.join(out_dir, "ckpt.pt"))      # the checkpoint records the variant
    cfg = model.config
    g = torch.Generator().manual_seed(4242)        # the same val batches for every run
    batches = [datalib.get_batch(meta, "val", TRAIN["batch_size"], TRAIN["block_size"], g, torch.device("cpu"))
               for _ in range(EVAL_BATCHES)]
    val, _ = loss_on(model, batches)
    cache_val, dec_tps = loss_on(model, batches[:2], cache_eval=True)   # 2 x 8 sequences, 112 decode steps each
    r = dict(name=name, spec_run=spec_run, overrides=overrides, hidden_dim=cfg.hidden_dim, params=n_params(cfg),
             kv_bits_per_token=M.kv_bits_per_token(cfg), kv_pct_of_mha=100 * M.kv_ratio(cfg), val_loss=val,
             cache_eval_loss=cache_val, cache_eval_no_cache_loss=loss_on(model, batches[:2])[0],
             decode_tok_s=dec_tps, train_tok_s=res["trained_steps"] * res["tokens_per_iter"] / res["elapsed_s"],
             train_wall_s=train_s, steps=steps, tokens=steps * res["tokens_per_iter"],
             last_train_loss=res["losses"][max(res["losses"])], seed=tconf["seed"],
             cache=C.make_cache("dense", cfg).info())
    if cfg.attn in M.LATENT and cfg.kv_bits < 16:
        # the same weights with the quantizer switched off: what int4 costs (or, for the PTQ run, what QAT saves)
        m16 = M.Transformer(M.ModelConfig(**{**cfg.__dict__, "kv_bits": 16})).eval()
        m16.load_state_dict(model.state_dict())
        r["val_loss_kv16"] = loss_on(m16, batches)[0]
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(r, f, indent=1)
    print(f"[{name}] val {val:.4f}  cache-eval {cache_val:.4f}  KV {r['kv_pct_of_mha']:.2f}% of MHA  "
          f"params {r['params']:,}  train {train_s:.0f}s  decode {dec_tps:.0f} tok/s", flush=True)
    return r


def bench(results, repeats=3):
    """Train and decode tokens/s of every finished checkpoint, one after another in this process (1 thread), so the
    numbers share one set of conditions; the timings taken inside the parallel runs depend on what ran beside them.
    Train: 8 timed AdamW steps (batch 8 x 128) after 2 warm-up steps. Decode: batch 8, 16-token prompt, 112
    teacher-forced steps through the variant's cache. Best of `repeats`."""
    torch.set_num_threads(1)
    x = torch.randint(0, BASE["vocab_size"], (TRAIN["batch_size"], TRAIN["block_size"] + 1),
                      generator=torch.Generator().manual_seed(0))
    xs, ys = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    for r in results:
        model, _ = M.load_model(os.path.join(OUT, r["name"], "ckpt.pt"))
        dec = max(loss_on(model, [(xs, ys)], cache_eval=True)[1] for _ in range(repeats))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        best = float("inf")
        for _ in range(repeats):
            for i in range(10):
                if i == 2:
                    t0 = time.perf_counter()
                model(xs, ys)[1].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            best = min(best, time.perf_counter() - t0)
        r["decode_tok_s"], r["train_tok_s"] = dec, 8 * xs.numel() / best
        r["timing"] = "sequential bench"
        with open(os.path.join(OUT, r["name"], "result.json"), "w") as f:   # so --report --no_bench keeps them
            json.dump(r, f, indent=1)
        print(f"[{r['name']}] train {r['train_tok_s']:,.0f} tok/s, decode {dec:,.0f} tok/s", flush=True)
    return results


# -----------------------------------------------------------------------------
# the report

def default_shape_rows():
    """KV accounting at the project's default shape (train.py `small`: dim 512, 8 layers, 16 x 32; d_c 128, d_r 16),
    formula and real cache bytes of an untrained model (B=1, T=64), no training."""
    small = {k: v for k, v in train.PRESETS["small"].items() if k != "block_size"}
    rows = []
    for name, _, ov, _ in RUNS:
        if name.endswith("seed2"):
            continue
        ov = dict(ov)
        if "n_kv_heads" in ov:       # keep the same ratios: n_kv = n_h / 4 for GQA, 1 for MQA
            ov["n_kv_heads"] = {2: 4, 1: 1}[ov["n_kv_heads"]]
        cfg = M.ModelConfig(**{**small, "n_kv_heads": 16, **ov, "vocab_size": 257})
        torch.manual_seed(0)
        m = M.Transformer(cfg).eval()
        cache = C.make_cache("dense", cfg)
        with torch.no_grad():
            m(torch.randint(0, 257, (1, 64)), cache=cache)
        rows.append((name, M.kv_bits_per_token(cfg), 100 * M.kv_ratio(cfg), cache.nbytes()))
    return rows


def report(results, wall_s, cmd):
    os.makedirs(RESULTS, exist_ok=True)
    by = {r["name"]: r for r in results}
    mha = by.get("mha")
    L = ["# CLLA ablation (spec/clla.md §8)", "",
         f"Command: `{cmd}`" + (f" — wall time {wall_s / 60:.1f} min on this 2-core CPU (2 runs at a time, 1 thread "
                               f"each, machine shared with other jobs)." if wall_s else ""), "",
         f"Scale: a smoke test. Model dim {BASE['dim']}, {BASE['n_layers']} layers, {BASE['n_heads']} heads x "
         f"{BASE['dim'] // BASE['n_heads']} (MLA/CLLA: d_c {4 * BASE['dim'] // BASE['n_heads']}, d_r "
         f"{BASE['dim'] // BASE['n_heads'] // 2}), byte tokenizer, the Python standard library as corpus (train.py's "
         f"default, first {TRAIN['max_corpus_mb']:g} MB), {results[0]['steps']} steps x {TRAIN['batch_size']} x "
         f"{TRAIN['block_size']} tokens = {results[0]['tokens'] / 1e6:.2f}M training tokens per run, AdamW "
         f"lr {TRAIN['learning_rate']} (warmup {TRAIN['warmup_iters']}, cosine to {TRAIN['min_lr']}), seed "
         f"{TRAIN['seed']}, float32. Every run sees the same batches in the same order. Parameters are matched to MHA "
         f"by the SwiGLU hidden size (column `ffn`).", "",
         f"Val loss: mean cross-entropy (nats/byte) on {EVAL_BATCHES} x {TRAIN['batch_size']} x {TRAIN['block_size']} "
         f"= {EVAL_BATCHES * TRAIN['batch_size'] * TRAIN['block_size']:,} held-out tokens, the same for every run, "
         f"model in eval mode (the quant runs fake-quantize as the cache does). Cache eval: the first 2 of those "
         f"batches, {DECODE_PROMPT}-token prefill then teacher-forced decode one token at a time through the "
         f"variant's real cache (`make_cache('dense', cfg)`: DenseCache fp16, CLACache, LatentCache with packed "
         f"int4 codes for the quant runs); `no-cache` is the full forward on the same 2 batches. Decode tok/s: that "
         f"loop. Train and decode tok/s: " + ("measured afterwards for every checkpoint one after another in one process "
         f"(ablate_clla.bench: 1 thread, batch {DECODE_B}; decode = 112 teacher-forced steps after a {DECODE_PROMPT}-"
         f"token prompt, best of 3), through the dequantize-everything reference path (no fused latent kernel); the "
         f"CPU is shared with other jobs, so read them as rough ratios." if all(r.get("timing") for r in results)
         else "taken inside the parallel runs (2 at a time on a shared CPU): not comparable across rows."), "",
         "| run | variant | ffn | params | Δparams | KV bits/token | % of MHA | val loss | Δ vs MHA | cache eval (no-cache) "
         "| val loss kv16 | train tok/s | decode tok/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        dp = f"{100 * (r['params'] / mha['params'] - 1):+.1f}%" if mha else ""
        dl = f"{100 * (r['val_loss'] / mha['val_loss'] - 1):+.2f}%" if mha else ""
        kv16 = f"{r['val_loss_kv16']:.4f}" if "val_loss_kv16" in r else ""
        L.append(f"| {r['spec_run']} | {r['name']} | {r['hidden_dim']} | {r['params'] / 1e6:.3f}M | {dp} | "
                 f"{r['kv_bits_per_token']:,} | {r['kv_pct_of_mha']:.2f}% | {r['val_loss']:.4f} | {dl} | "
                 f"{r['cache_eval_loss']:.4f} ({r['cache_eval_no_cache_loss']:.4f}) | {kv16} | "
                 f"{r['train_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} |")
    L += ["", "KV bits/token: all layers, scales and mins included, 16 bits per unquantized element "
          "(model.kv_bits_per_token, spec §6.1); % of MHA: against fp16 MHA of the same width (8 x 16 per layer). "
          "At this 8-head shape the latent variants cost 2.25/n_h = 28% (MLA); the <2% target needs 16 heads "
          "(next table).", ""]
    L += ["## KV accounting at the default shape (dim 512, 8 layers, 16 heads x 32; d_c 128, d_r 16)", "",
          "Formula (model.kv_bits_per_token) and the real bytes of each variant's cache after a 64-token prefill "
          "of an untrained model (batch 1; counters included, 8 B each).", "",
          "| variant | KV bits/token | % of MHA | real cache bytes, 64 tokens |", "|---|---|---|---|"]
    for name, bits, pct, nb in default_shape_rows():
        L.append(f"| {name} | {bits:,} | {pct:.2f}% | {nb:,} |")
    path = os.path.join(RESULTS, "clla_ablation.md")
    tail = ""
    if os.path.exists(path):  # keep the hand-written reading below the marker
        with open(path) as f:
            old = f.read()
        if MARKER in old:
            tail = old[old.index(MARKER):]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n\n" + (tail or MARKER + "\n"))
    with open(os.path.join(RESULTS, "clla_ablation.json"), "w") as f:
        json.dump(dict(command=cmd, wall_s=wall_s, base=BASE, train=TRAIN, results=results), f, indent=1)
    plot(results)
    print("\n".join(L))


def plot(results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping results/clla_ablation.png (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in results:
        quant = "quant" in r["name"]
        ax.scatter(r["kv_pct_of_mha"], r["val_loss"], c="tab:red" if quant else "tab:blue" if "clla" in r["name"]
                   else "tab:gray", marker="s" if quant else "o")
        ax.annotate(r["name"], (r["kv_pct_of_mha"], r["val_loss"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    by = {r["name"]: r["val_loss"] for r in results}
    if "mha" in by and "mha-seed2" in by:
        ax.axhspan(min(by["mha"], by["mha-seed2"]), max(by["mha"], by["mha-seed2"]), color="gray", alpha=0.12,
                   label="MHA, two seeds")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache per token, % of fp16 MHA (log scale)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"CLLA ablation, dim {BASE['dim']}, {BASE['n_layers']} layers, {results[0]['steps']} steps (CPU)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "clla_ablation.png"), dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--steps", type=int, default=TRAIN["max_iters"])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, 1 thread each")
    p.add_argument("--report", action="store_true", help="only rebuild results/ from out/ablate_clla/*/result.json")
    p.add_argument("--no_bench", action="store_true", help="skip the sequential throughput pass (ablate_clla.bench)")
    args = p.parse_args()
    runs = RUNS if not args.only else [r for r in RUNS if r[0] in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {r[0] for r in RUNS}
    if unknown:
        raise ValueError(f"unknown run(s) {sorted(unknown)}; runs: {', '.join(r[0] for r in RUNS)}")
    cmd = "python " + " ".join(sys.argv)
    if args.report:
        results = []
        for name, *_ in runs:
            path = os.path.join(OUT, name, "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
        if not results:
            raise ValueError(f"no finished runs under {OUT}; run without --report first")
        prev = os.path.join(RESULTS, "clla_ablation.json")
        wall, cmd = (json.load(open(prev))["wall_s"], json.load(open(prev))["command"]) if os.path.exists(prev) \
            else (0, cmd)
        return report(results if args.no_bench else bench(results), wall, cmd)
    t0 = time.perf_counter()
    meta = datalib.prepare(TRAIN["data"], load_tokenizer(TRAIN["tokenizer"]), train.TrainConfig.data_dir,
                           TRAIN["max_corpus_mb"], TRAIN["val_frac"])        # once, before the workers start
    target = n_params(config_of(dict(attn="mha")))
    jobs = [(name, spec, ov, tov, matched_hidden(ov, target), args.steps, meta) for name, spec, ov, tov in runs]
    for name, _, ov, _, h, *_ in jobs:
        d = n_params(config_of(ov, h)) / target - 1
        assert abs(d) <= 0.05, f"{name}: parameter budget off by {100 * d:.1f}%"
    print(f"{len(jobs)} runs, {args.jobs} at a time; parameter target {target:,} (MHA)", flush=True)
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        results = pool.map(run_one, jobs, chunksize=1)
    if not args.no_bench:
        results = bench(results)
    report(results, time.perf_counter() - t0, cmd)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
