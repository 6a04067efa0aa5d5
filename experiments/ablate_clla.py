"""
The CLLA ablation: every attention variant trained by train.py on the same corpus, the same tokens,
seed and schedule, with the parameter budget matched to MHA (within ±5%) through the SwiGLU hidden size. Then, per run:
validation loss, the loss of a teacher-forced decode through the real cache (int4 bytes for the quant runs), KV bits
per token and % of MHA, parameters, train and decode tokens/s.

    python experiments/ablate_clla.py                          # everything, 2 runs at a time, CPU (~20 min on 2 cores)
    python experiments/ablate_clla.py --only=mha,clla-quant --steps=40               # a quick subset
    python experiments/ablate_clla.py --report                 # rebuild results/ from finished runs, no training
    python experiments/ablate_clla.py --scaling --targeted     # the scaling study: results/clla_scaling.{md,json,png}

Writes out/ablate_clla/<run>/ (train.py's ckpt.pt and log, result.json) and results/clla_ablation.{md,json,png}.
The scale is a smoke test (a 0.9M-parameter model, ~0.36M training tokens per run): it ranks designs, it does not
reproduce the paper. --scaling asks whether the latent variants' gap to MHA shrinks with training tokens (3 budgets
4x apart, 4 heads x 32 so d_r = 16), and --targeted whether d_r, d_c or the QAT start cause it; runs train one at a
time under out/ablate_clla_scaling/ and a restarted study reuses the finished ones.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

import data as datalib
import latent
import model as M
import train
import weights
from experiment_flags import POSITIVE, Parser, number
from generate import make_cache
from tokenizer import load_tokenizer

OUT, RESULTS = os.path.join("out", "ablate_clla"), "results"
# the CPU smoke shape (LOG.md, 2026-11-23): dim 128, 4 layers, 8 heads x 16 -> MLA d_c 64, d_r 8, nope = v = 16
BASE = dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=8, max_seq_len=256, vocab_size=257)
# one schedule for every run (train.py flags; spelled out so train.py's defaults can change without moving the runs)
TRAIN = dict(batch_size=8, block_size=128, max_iters=350, warmup_iters=35, learning_rate=2e-3, min_lr=2e-4,
             lr_decay_iters=0, weight_decay=0.1, grad_clip=1.0, grad_accum=1, seed=1337, data="", tokenizer="bytes",
             max_corpus_mb=8.0, val_frac=0.1, device="cpu", dtype="float32", compile=False, eval_iters=2,
             log_interval=50)
Q4 = M.ATTN_PRESETS["clla-quant"]
RUNS = [  # (name, the run's number in the ablation (LOG.md, 2026-11-23), ModelConfig overrides, TrainConfig overrides)
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


def config_of(overrides, hidden_dim=None, base=BASE):
    return M.ModelConfig(**{**base, **overrides, **({"hidden_dim": hidden_dim} if hidden_dim else {})})


def n_params(cfg):
    # built on the CPU, not the meta device: meta-device init goes through torch's Python reference ops (~10 ms per
    # tensor, plus a one-time torch._dynamo import of seconds); fork_rng keeps the caller's random stream untouched
    with torch.random.fork_rng():
        return sum(p.numel() for p in M.Transformer(cfg).parameters())


def matched_hidden(overrides, target, base=BASE):
    """The SwiGLU hidden size (a multiple of 8) that brings the total parameter count closest to `target`.
    Parameters are linear in it: 3 * dim * n_layers per unit."""
    per_unit = 3 * base["dim"] * base["n_layers"]
    p0 = n_params(config_of(overrides, 8, base)) - 8 * per_unit
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
            cache = make_cache("dense", model.config)
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
    """Train one run (train.py) and evaluate its checkpoint. job = (name, spec_run, model overrides, train overrides,
    ffn hidden, steps, data meta[, opts]); opts (the scaling study): base shape, out root, eval batches, cache_eval
    (the teacher-forced decode through the real cache), qat_after (int4 QAT switched on after this many steps)."""
    name, spec_run, overrides, toverrides, hidden, steps, meta, *rest = job
    o = {**dict(base=BASE, out=OUT, eval_batches=EVAL_BATCHES, cache_eval=True, qat_after=0),
         **(rest[0] if rest else {})}
    base = o["base"]
    torch.set_num_threads(1)
    out_dir = os.path.join(o["out"], name)
    shutil.rmtree(out_dir, ignore_errors=True)     # this run's own folder only: train.py refuses to overwrite
    os.makedirs(out_dir)
    tconf = {**TRAIN, **toverrides, "max_iters": steps, "eval_interval": steps, "out_dir": out_dir}
    argv = [f"--{k}={v}" for k, v in {**tconf, **base, **overrides, "hidden_dim": hidden}.items()]
    logf = open(os.path.join(out_dir, "train.log"), "w")

    def log(*a, **k):
        print(*a, file=logf, flush=True)

    t0 = time.perf_counter()
    if o["qat_after"]:
        # QAT warm-up: the first qat_after steps train the latent unquantized (kv_ste=False: fake-quant only in eval),
        # then the checkpoint's kv_ste is switched on and the same run resumes (optimizer, data order and LR schedule
        # continue: lr_decay_iters pins the cosine to the full run)
        w = o["qat_after"]
        a1 = [f"--{k}={v}" for k, v in {**tconf, "max_iters": w, "eval_interval": w, "lr_decay_iters": steps,
                                         **base, **overrides, "kv_ste": False, "hidden_dim": hidden}.items()]
        r1 = train.main(a1, log=log)
        path = os.path.join(out_dir, "ckpt.pt")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck["config"]["kv_ste"] = True          # a training-behaviour switch, not a shape change: same state_dict
        weights.atomic_save(ck, path)
        res = train.main(argv + ["--resume=True", f"--lr_decay_iters={steps}"], log=log)
        res["elapsed_s"] += r1["elapsed_s"]
        res["trained_steps"] += r1["trained_steps"]
        res["losses"] = {**r1["losses"], **res["losses"]}
    else:
        res = train.main(argv, log=log)
    train_s = time.perf_counter() - t0
    if res["saved_step"] != res["step"]:   # train.py keeps the best: a last evaluation that was worse is not saved
        print(f"[{name}] note: step {res['step']} evaluated worse than step {res['saved_step']}; ckpt.pt holds step "
              f"{res['saved_step']}, which is what is measured", flush=True)
    model, _ = weights.load_model(os.path.join(out_dir, "ckpt.pt"))      # the checkpoint records the variant
    cfg = model.config
    g = torch.Generator().manual_seed(4242)        # the same val batches for every run
    batches = [datalib.get_batch(meta, "val", TRAIN["batch_size"], TRAIN["block_size"], g, torch.device("cpu"))
               for _ in range(o["eval_batches"])]
    val, _ = loss_on(model, batches)
    nan = float("nan")
    cache_val, dec_tps = loss_on(model, batches[:2], cache_eval=True) if o["cache_eval"] else (nan, nan)
    r = dict(name=name, spec_run=spec_run, overrides=overrides, hidden_dim=cfg.hidden_dim, params=n_params(cfg),
             kv_bits_per_token=latent.kv_bits_per_token(cfg), kv_pct_of_mha=100 * latent.kv_ratio(cfg), val_loss=val,
             cache_eval_loss=cache_val,
             cache_eval_no_cache_loss=loss_on(model, batches[:2])[0] if o["cache_eval"] else nan,
             decode_tok_s=dec_tps, train_tok_s=res["trained_steps"] * res["tokens_per_iter"] / res["elapsed_s"],
             train_wall_s=train_s, steps=steps, checkpoint_step=res["saved_step"],
             tokens=steps * res["tokens_per_iter"],
             last_train_loss=res["losses"][max(res["losses"])], seed=tconf["seed"],
             cache=make_cache("dense", cfg).info(), qat_after=o["qat_after"],
             model_config={k: v for k, v in cfg.__dict__.items() if isinstance(v, (int, float, str, bool))})
    if cfg.attn in M.LATENT and cfg.kv_bits < 16:
        # the same weights with the quantizer switched off: what int4 costs (or, for the PTQ run, what QAT saves)
        m16 = M.Transformer(M.ModelConfig(**{**cfg.__dict__, "kv_bits": 16})).eval()
        m16.load_state_dict(model.state_dict())
        r["val_loss_kv16"] = loss_on(m16, batches)[0]
    r["wall_s"] = time.perf_counter() - t0
    write_atomic(os.path.join(out_dir, "result.json"), json.dumps(r, indent=1))
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
        model, _ = weights.load_model(os.path.join(OUT, r["name"], "ckpt.pt"))
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
        write_atomic(os.path.join(OUT, r["name"], "result.json"), json.dumps(r, indent=1))   # --report --no_bench
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
        cache = make_cache("dense", cfg)
        with torch.no_grad():
            m(torch.randint(0, 257, (1, 64)), cache=cache)
        rows.append((name, latent.kv_bits_per_token(cfg), 100 * latent.kv_ratio(cfg), cache.nbytes()))
    return rows


def report(results, wall_s, cmd):
    os.makedirs(RESULTS, exist_ok=True)
    by = {r["name"]: r for r in results}
    mha = by.get("mha")
    L = ["# CLLA ablation", "",
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
          "(latent.kv_bits_per_token); % of MHA: against fp16 MHA of the same width (8 x 16 per layer). "
          "At this 8-head shape the latent variants cost 2.25/n_h = 28% (MLA); the <2% target needs 16 heads "
          "(next table).", ""]
    L += ["## KV accounting at the default shape (dim 512, 8 layers, 16 heads x 32; d_c 128, d_r 16)", "",
          "Formula (latent.kv_bits_per_token) and the real bytes of each variant's cache after a 64-token prefill "
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
    write_atomic(path, "\n".join(L) + "\n\n" + (tail or MARKER + "\n"))
    write_atomic(os.path.join(RESULTS, "clla_ablation.json"),
                 json.dumps(dict(command=cmd, wall_s=wall_s, base=BASE, train=TRAIN, results=results), indent=1))
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
    write_atomic(os.path.join(RESULTS, "clla_ablation.png"), fig)


# -----------------------------------------------------------------------------
# the scaling study (--scaling): is the latent variants' gap to MHA a small-budget effect?

# head_dim 32 so the decoupled RoPE slice is d_r = 16 (the smoke shape's 8 x 16 heads leave d_r = 8, i.e. 4 rotary
# frequencies); d_c = 4 d_h = 128, nope = v = 32: DeepSeek-V2-Lite's proportions. Same dim and depth as the
# smoke shape, so the cost per token is about the same (~7k train tok/s at 1 thread).
SCALE_BASE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256, vocab_size=257)
# x 8 x 128 tokens = 16k, 65k, 262k: 4x apart. What 7 + 5 runs fit in ~55 min at 1 thread on a shared 2-core CPU
# (1.6-4k tok/s measured); --scaling_steps=64,256,1024 or more on a faster machine
SCALE_STEPS = (16, 64, 256)
SCALE_OUT = os.path.join("out", "ablate_clla_scaling")
SCALE_VARIANTS = [  # (name, ModelConfig overrides)
    ("mha", dict(attn="mha")),
    ("gqa", dict(attn="gqa", n_kv_heads=2)),         # n_kv = n_h / 2 (n_h / 4 would be MQA at 4 heads)
    ("mla", dict(attn="mla")),
    ("clla", dict(M.ATTN_PRESETS["clla"])),
    ("clla-quant", dict(Q4)),
]
SEED2 = 2024                         # the second seed (init and batch order) for the noise band
NOISE_VARIANTS = ("mha", "clla-quant")
FFN_RUNS = ("clla-quant", "mla")     # targeted: trained with MHA's SwiGLU width instead of a matched one
TARGETED = [  # (name, overrides on clla-quant, qat_after as a fraction of the steps, the question it answers), most
    # telling first: a capacity limit of the latent, then RoPE starvation, then the QAT start
    ("clla-quant-dc256", dict(kv_lora_rank=2.0), 0, "latent width d_c x2 (128 -> 256)"),
    ("clla-quant-dr32", dict(qk_rope_dim=2.0), 0, "decoupled RoPE width d_r x2 (16 -> 32)"),
    ("clla-quant-qat20", {}, 0.2, "QAT from step 0 vs switched on after 20% of the steps"),
    ("clla-quant-dr8", dict(qk_rope_dim=0.5), 0, "decoupled RoPE width d_r /2 (16 -> 8)"),
    ("clla-quant-dc64", dict(kv_lora_rank=0.5), 0, "latent width d_c /2 (128 -> 64)"),
]   # widths as factors of the shape's defaults (d_c = 4 d_h, d_r = d_h / 2); the names say the main shape


def scaling_jobs(steps, base, targeted):
    """Every run of the study, in the order they train: each budget smallest first, then the second seeds, then the
    targeted runs (so a study cut short still has a complete scaling table)."""
    jobs = [(f"{n}-s{s}", n, ov, {}, s, 0, "", None) for s in steps for n, ov in SCALE_VARIANTS]
    jobs += [(f"{n}-s{steps[-1]}-seed2", n, dict(SCALE_VARIANTS)[n], dict(seed=SEED2), steps[-1], 0, "", None)
             for n in NOISE_VARIANTS]
    if targeted:
        h = base["dim"] // base["n_heads"]
        default = dict(kv_lora_rank=4 * h, qk_rope_dim=h // 2)
        jobs += [(f"{n}-s{steps[-1]}", n, {**Q4, **{k: int(x * default[k]) for k, x in ov.items()}}, {}, steps[-1],
                  max(1, round(f * steps[-1])) if f else 0, q, None) for n, ov, f, q in TARGETED]
        # the parameter match itself: MLA's attention has more weights than MHA's at this shape (wkv_b), so matching
        # shrinks its SwiGLU; these runs keep MHA's SwiGLU width instead (more parameters, same FFN)
        jobs += [(f"{n}-ffn-of-mha-s{steps[-1]}", n, dict(SCALE_VARIANTS)[n], {}, steps[-1], 0,
                  f"{n} with MHA's SwiGLU width (parameters not matched)", "mha") for n in FFN_RUNS
                 if n in dict(SCALE_VARIANTS)]
    return jobs


def write_atomic(path, text_or_fig):
    """A report, JSON or figure written whole or not at all (weights.atomic_write): a crash leaves the previous file."""
    if isinstance(text_or_fig, str):
        weights.atomic_write(path, text_or_fig)
    else:
        weights.atomic_write(path, lambda f: text_or_fig.savefig(f, format="png", dpi=120))


def gap_pct(loss, ref):
    return 100 * (loss / ref - 1)


def fit_trend(tokens, gaps):
    """Least squares gap% = a + b * log4(tokens): b is the change per 4x data. Returns (a, b)."""
    x = [math.log(t, 4) for t in tokens]
    mx, my = sum(x) / len(x), sum(gaps) / len(gaps)
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, gaps)) / sxx if sxx else 0.0
    return my - b * mx, b


def scaling_summary(results, steps):
    """Per variant and budget: val loss (mean over seeds) and gap to MHA's mean at the same budget; the trend fit;
    the noise band (largest relative seed-to-seed difference at the largest budget)."""
    by = {}
    for r in results:
        if not r.get("targeted"):
            by.setdefault((r["variant"], r["steps"]), []).append(r)
    mean = {k: sum(r["val_loss"] for r in v) / len(v) for k, v in by.items()}
    spreads = {n: abs(gap_pct(*[r["val_loss"] for r in by[(n, steps[-1])]]))
               for n in NOISE_VARIANTS if len(by.get((n, steps[-1]), [])) == 2}
    noise = max(spreads.values()) if spreads else float("nan")
    rows = {}
    for n, _ in SCALE_VARIANTS:
        pts = [(s, mean[(n, s)], gap_pct(mean[(n, s)], mean[("mha", s)])) for s in steps
               if (n, s) in mean and ("mha", s) in mean]
        rows[n] = dict(points=pts)
        if n != "mha" and len(pts) >= 2:
            tok = [s * TRAIN["batch_size"] * TRAIN["block_size"] for s, *_ in pts]
            a, b = fit_trend(tok, [g for *_, g in pts])
            rows[n].update(a=a, b=b)
            last = a + b * math.log(tok[-1], 4)
            if last <= 2:
                rows[n]["cross_2pct_tokens"] = None      # the fit is already at or under 2%
            elif b < 0:
                rows[n]["cross_2pct_tokens"] = 4 ** ((2 - a) / b)
            else:
                rows[n]["cross_2pct_tokens"] = float("inf")
    return rows, noise, spreads, mean


def scaling_report(results, steps, wall_s, cmd, results_dir, targeted_done):
    rows, noise, spreads, mean = scaling_summary(results, steps)
    tpi = TRAIN["batch_size"] * TRAIN["block_size"]
    b = results[0]["base"]
    cfg = results[0]["model_config"]
    fmt_tok = lambda t: f"{t / 1e6:.2f}M" if t < 1e9 else f"{t / 1e9:.2f}B"  # noqa: E731
    L = ["# CLLA scaling study: the gap to MHA vs training tokens", "",
         f"Command: `{cmd}` — {wall_s / 60:.1f} min of run time (sum over runs, training and evaluation), one run at "
         f"a time, 1 torch thread, on a 2-core CPU shared with other jobs.", "",
         f"Shape: dim {b['dim']}, {b['n_layers']} layers, {b['n_heads']} heads x {b['dim'] // b['n_heads']}; MLA/CLLA "
         f"d_c {cfg.get('kv_lora_rank', 4 * b['dim'] // b['n_heads'])}, d_r {b['dim'] // b['n_heads'] // 2}, nope = v "
         f"= {b['dim'] // b['n_heads']}; GQA n_kv {dict(SCALE_VARIANTS).get('gqa', {}).get('n_kv_heads', '-')}. "
         f"Byte tokenizer, the "
         f"Python standard library as corpus (first {TRAIN['max_corpus_mb']:g} MB), batch {TRAIN['batch_size']} x "
         f"{TRAIN['block_size']}; budgets {', '.join(f'{s} steps ({fmt_tok(s * tpi)} tokens)' for s in steps)}, each "
         f"a full schedule (AdamW lr {TRAIN['learning_rate']}, 10% warm-up, cosine to {TRAIN['min_lr']}), seed "
         f"{TRAIN['seed']}; parameters matched to MHA by the SwiGLU hidden size. Val loss: nats/byte on "
         f"{results[0]['eval_batches']} x {TRAIN['batch_size']} x {TRAIN['block_size']} held-out tokens, the same "
         f"for every run (quant runs fake-quantize as the int4 cache does).", "",
         f"Noise band: the relative val-loss difference between two seeds ({TRAIN['seed']}, {SEED2}) at the largest "
         f"budget: " + (", ".join(f"{n} {v:.2f}%" for n, v in spreads.items()) or "not measured") +
         f"; a gap is read as ±{noise:.2f} pp. Smaller budgets have one seed each.", "",
         "## Gap to MHA (val loss, % above MHA at the same budget)", "",
         "| variant | KV % of MHA | " + " | ".join(f"{fmt_tok(s * tpi)} ({s} steps)" for s in steps) +
         " | change per 4x tokens (fit) | fit crosses 2% at |",
         "|---|---|" + "---|" * len(steps) + "---|---|"]
    kv = {r["variant"]: r["kv_pct_of_mha"] for r in results}
    for n, _ in SCALE_VARIANTS:
        pts = {s: (v, g) for s, v, g in rows[n]["points"]}
        cells = []
        for s in steps:
            if s not in pts:
                cells.append("")
                continue
            v, g = pts[s]
            seeds = " (2 seeds)" if len([r for r in results if r["variant"] == n and r["steps"] == s
                                           and not r.get("targeted")]) == 2 else ""
            band = f" ±{noise:.2f}" if s == steps[-1] and noise == noise else ""     # nan: no second seed
            cells.append(f"{v:.4f}" + seeds if n == "mha" else f"{g:+.2f}%{band} ({v:.4f})")
        slope = f"{rows[n]['b']:+.2f} pp" if "b" in rows[n] else ""
        c = rows[n].get("cross_2pct_tokens", "")
        cross = ("" if c == "" else "fit already ≤ 2% here" if c is None
                 else "never: the fitted gap grows" if c == float("inf")
                 else f"~{fmt_tok(c)} tokens (~{c / tpi:,.0f} steps)")
        L.append(f"| {n} | {kv.get(n, float('nan')):.2f}% | " + " | ".join(cells) + f" | {slope} | {cross} |")
    L += ["", "MHA's row is its val loss. Each cell: gap (val loss). Fit: least squares of gap% on log4(tokens) over "
          f"the {len(steps)} budgets, i.e. {len(steps)} points per line: a weak trend, and the crossing is an "
          "extrapolation of it.", ""]
    tg = [r for r in results if r.get("targeted")]
    if tg:
        mha = mean.get(("mha", steps[-1]))
        L += [f"## Targeted ablation at the largest budget ({fmt_tok(steps[-1] * tpi)} tokens), each run vs its "
              f"variant's run at that budget (clla-quant: mean of 2 seeds, "
              f"{mean.get(('clla-quant', steps[-1]), float('nan')):.4f})", "",
              "| run | question | ffn | params | KV % of MHA | val loss | vs its variant | gap to MHA "
              "| val loss kv16 |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in tg:
            ref = mean.get((r["variant"], steps[-1]), mean.get(("clla-quant", steps[-1])))   # d_r/d_c/QAT: clla-quant
            L.append(f"| {r['name']} | {r['question']} | {r['hidden_dim']} | {r['params']:,} | "
                     f"{r['kv_pct_of_mha']:.2f}% | {r['val_loss']:.4f} | "
                     f"{gap_pct(r['val_loss'], ref):+.2f}% | {gap_pct(r['val_loss'], mha):+.2f}% | "
                     f"{r.get('val_loss_kv16', float('nan')):.4f} |")
        L += ["", f"A difference is real only beyond the noise band (±{noise:.2f} pp)."
              + ("" if targeted_done else " Not every targeted run finished."), ""]
    L += ["## Every run", "", "| run | steps | seed | ffn | params | val loss | val loss kv16 | train tok/s | wall s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        L.append(f"| {r['name']} | {r['steps']} | {r['seed']} | {r['hidden_dim']} | {r['params']:,} | "
                 f"{r['val_loss']:.4f} | {r.get('val_loss_kv16', float('nan')):.4f} | {r['train_tok_s']:,.0f} | "
                 f"{r['wall_s']:.0f} |")
    md = "\n".join(L) + "\n"
    path = os.path.join(results_dir, "clla_scaling.md")
    tail = ""
    if os.path.exists(path):  # keep the hand-written reading below the marker
        old = open(path).read()
        tail = old[old.index(MARKER):] if MARKER in old else ""
    os.makedirs(results_dir, exist_ok=True)
    write_atomic(path, md + "\n" + (tail or MARKER + "\n"))
    summary = {n: {k: v for k, v in d.items() if k != "points"} | {"points": [dict(steps=s, val_loss=v, gap_pct=g)
                                                                              for s, v, g in d["points"]]}
               for n, d in rows.items()}
    write_atomic(os.path.join(results_dir, "clla_scaling.json"),
                 json.dumps(dict(command=cmd, wall_s=wall_s, steps=steps, base=b, train=TRAIN, noise_band_pp=noise,
                                 seed_spreads_pct=spreads, summary=summary, results=results), indent=1, default=str))
    scaling_plot(results, rows, steps, noise, results_dir)
    print(md, flush=True)


def scaling_plot(results, rows, steps, noise, results_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping results/clla_scaling.png (pip install matplotlib)")
        return
    tpi = TRAIN["batch_size"] * TRAIN["block_size"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = dict(mha="black", gqa="tab:gray", mla="tab:green", clla="tab:blue")
    colors["clla-quant"] = "tab:red"
    for n, _ in SCALE_VARIANTS:
        pts = rows[n]["points"]
        if not pts:
            continue
        t = [s * tpi for s, *_ in pts]
        a1.plot(t, [v for _, v, _ in pts], "o-", color=colors[n], label=n)
        for r in results:          # every seed as a dot: the spread at the largest budget is the noise band
            if r["variant"] == n and not r.get("targeted"):
                a1.plot(r["steps"] * tpi, r["val_loss"], ".", color=colors[n], alpha=0.5)
        if n != "mha":
            a2.plot(t, [g for *_, g in pts], "o", color=colors[n], label=n)
            if "b" in rows[n]:
                xs = [t[0], t[-1]]
                a2.plot(xs, [rows[n]["a"] + rows[n]["b"] * math.log(x, 4) for x in xs], "-", color=colors[n],
                        alpha=0.6)
    a2.axhline(2, color="k", ls="--", lw=0.8, label="2% target")
    a2.axhspan(-noise, noise, color="gray", alpha=0.15, label="noise band (2 seeds)") if noise == noise else None
    for a, yl in ((a1, "validation loss (nats/byte)"), (a2, "gap to MHA (%)")):
        a.set_xscale("log")
        a.set_xlabel("training tokens (log scale)")
        a.set_ylabel(yl)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    a1.set_title("val loss vs tokens")
    a2.set_title("gap to MHA, with log-linear fit")
    fig.tight_layout()
    write_atomic(os.path.join(results_dir, "clla_scaling.png"), fig)
    plt.close(fig)


def run_scaling(args, cmd):
    """Sequential runs (one at a time, 1 thread); a run whose result.json matches its job is reused (resume), so a
    restarted study picks up where it stopped. results/ is written only once the scaling table is complete, then
    again after each targeted run (atomic renames), so a partial study never replaces a finished one."""
    global TRAIN
    steps = tuple(int(s) for s in args.scaling_steps.split(","))
    if any(b < 4 * a for a, b in zip(steps, steps[1:])) or len(steps) < 2:
        raise ValueError(f"--scaling_steps={args.scaling_steps}: give >= 2 budgets, each >= 4x the previous")
    dim, layers, heads = (int(x) for x in args.shape.split("x"))
    base = {**SCALE_BASE, "dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": heads}
    TRAIN = {**TRAIN, "device": args.device, "max_corpus_mb": args.max_corpus_mb, **({"data": args.data} if args.data
                                                                                    else {})}
    meta = datalib.prepare(TRAIN["data"], load_tokenizer(TRAIN["tokenizer"]), train.TrainConfig.data_dir,
                           TRAIN["max_corpus_mb"], TRAIN["val_frac"])
    target = n_params(config_of(dict(attn="mha"), base=base))
    jobs = scaling_jobs(steps, base, args.targeted)
    n_scaling = len(scaling_jobs(steps, base, False))
    print(f"{len(jobs)} runs, one at a time; parameter target {target:,} (MHA); out {args.out_dir}", flush=True)
    results = []
    for i, (name, variant, ov, tov, s, qat_after, question, ffn) in enumerate(jobs):
        tov = {"warmup_iters": max(1, s // 10), **tov}     # 10% warm-up at every budget, as the smoke run's 35/350
        hidden = matched_hidden(ov if ffn is None else dict(attn="mha"), target, base)
        d = n_params(config_of(ov, hidden, base)) / target - 1
        assert ffn or abs(d) <= 0.05, f"{name}: parameter budget off by {100 * d:.1f}%"
        key = dict(base=base, overrides=ov, train_overrides=tov, hidden=hidden, steps=s, qat_after=qat_after,
                   eval_batches=args.eval_batches, data=TRAIN["data"], device=TRAIN["device"],
                   **({"max_corpus_mb": args.max_corpus_mb} if args.max_corpus_mb != 8.0 else {}),
                   **({"ffn": ffn} if ffn else {}))
        path = os.path.join(args.out_dir, name, "result.json")
        r = None
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            if r.get("job") != json.loads(json.dumps(key)):
                r = None
            else:
                print(f"[{name}] reused {path}", flush=True)
        if r is None:
            r = run_one((name, variant, ov, tov, hidden, s, meta,
                         dict(base=base, out=args.out_dir, eval_batches=args.eval_batches, cache_eval=False,
                              qat_after=qat_after)))
            r.update(job=key, variant=variant, base=base, eval_batches=args.eval_batches,
                     targeted=bool(question), question=question)
            write_atomic(path, json.dumps(r, indent=1))
        results.append(r)
        if i + 1 >= n_scaling:    # the scaling table is complete: (re)write results/
            scaling_report(results, steps, sum(x["wall_s"] for x in results), cmd, args.results_dir,
                           targeted_done=i + 1 == len(jobs))
        else:
            print(f"({i + 1}/{n_scaling} scaling runs done; results/ is written once all are)", flush=True)
    return results


def main(argv=None):
    global TRAIN, SCALE_VARIANTS, NOISE_VARIANTS
    p = Parser(prog="ablate_clla.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--steps", type=POSITIVE, default=TRAIN["max_iters"])
    p.add_argument("--jobs", type=POSITIVE, default=2, help="runs in parallel, 1 thread each")
    p.add_argument("--report", action="store_true", help="only rebuild results/ from out/ablate_clla/*/result.json")
    p.add_argument("--no_bench", action="store_true", help="skip the sequential throughput pass (ablate_clla.bench)")
    g = p.add_argument_group("scaling study (--scaling)")
    g.add_argument("--scaling", action="store_true", help="MHA/GQA/MLA/CLLA/CLLA-quant at 3 budgets, one at a time")
    g.add_argument("--targeted", action="store_true", help="with --scaling: the d_r / d_c / QAT-warm-up runs too")
    g.add_argument("--scaling_steps", default=",".join(map(str, SCALE_STEPS)), help="budgets in steps, >= 4x apart")
    g.add_argument("--shape", default="{dim}x{n_layers}x{n_heads}".format(**SCALE_BASE), help="dim x layers x heads")
    g.add_argument("--device", default="cpu")
    g.add_argument("--data", default="", help="corpus (default: the Python standard library)")
    g.add_argument("--max_corpus_mb", type=number(float, lambda x: 0 <= x < float("inf"), "a finite number >= 0"),
                   default=TRAIN["max_corpus_mb"],
                   help="corpus cap; budgets past ~7M tokens repeat the default 8 MB (raise it, or give --data)")
    g.add_argument("--eval_batches", type=POSITIVE, default=EVAL_BATCHES)
    g.add_argument("--variants", default="", help="a subset of the variants (mha is the reference, always in)")
    g.add_argument("--no_seed2", action="store_true", help="skip the second-seed runs (no noise band)")
    g.add_argument("--out_dir", default=SCALE_OUT)
    g.add_argument("--results_dir", default=RESULTS)
    args = p.parse_args(argv)
    if args.scaling:
        saved = TRAIN, SCALE_VARIANTS, NOISE_VARIANTS
        names = {"mha", *filter(None, args.variants.split(","))} if args.variants else set(dict(SCALE_VARIANTS))
        if names - set(dict(SCALE_VARIANTS)):
            raise ValueError(f"unknown variant(s) {sorted(names - set(dict(SCALE_VARIANTS)))}; variants: "
                             f"{', '.join(dict(SCALE_VARIANTS))}")
        SCALE_VARIANTS = [v for v in SCALE_VARIANTS if v[0] in names]
        NOISE_VARIANTS = () if args.no_seed2 else tuple(n for n in NOISE_VARIANTS if n in names)
        try:
            return run_scaling(args, "python experiments/ablate_clla.py "
                               + " ".join(sys.argv[1:] if argv is None else argv))
        finally:
            TRAIN, SCALE_VARIANTS, NOISE_VARIANTS = saved
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
