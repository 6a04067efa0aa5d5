"""
Training-step speed of our Llama block (model.py) against nanoGPT's GPT-2 block, side by side in one process.

Both models get the same data (random bytes, vocab 256), batch 8 x 256, fp32, no compile (--compile: both are
compiled), dropout 0, and a full step: forward + backward + AdamW. Our SwiGLU hidden size is chosen so that the
non-embedding parameters match nanoGPT's within 0.5%. The two steps alternate, repeat by repeat, so a busy machine
slows both alike; the table reports the median of each and their ratio (ours / nanoGPT; above 1 is faster).

    python experiments/bench_train.py                      # the three shapes, at 1 and 2 threads
    python experiments/bench_train.py --repeats=21 --threads=1,2
    python experiments/bench_train.py --compile            # both models through torch.compile (inductor)
    python experiments/bench_train.py --smollm             # prefill ms and decode tok/s, SmolLM2-135M's shape, random
"""
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

import model as M
from experiment_flags import POSITIVE, Parser, numbers

# -----------------------------------------------------------------------------
# the reference: nanoGPT's GPT (model.py of karpathy/nanoGPT), bias=False, dropout 0, in a few lines


class RefBlock(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)          # q, k, v in one matmul
        self.attn_proj = nn.Linear(dim, dim, bias=False)
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.mlp_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab, dim, n_layers, n_heads, block_size):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block_size, dim)
        self.h = nn.ModuleList(RefBlock(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight                        # tied, as GPT-2
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def non_embedding_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()   # nanoGPT's get_num_params

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# -----------------------------------------------------------------------------
# matched shapes

SHAPES = [  # (name, dim, layers, heads, kv heads)
    ("d256 L4 H4 (MHA)", 256, 4, 4, 4),
    ("d256 L4 H4 KV2 (GQA)", 256, 4, 4, 2),
    ("d384 L6 H6 (MHA)", 384, 6, 6, 6),
]


def matched_models(dim, n_layers, n_heads, n_kv, vocab=256, block_size=256):
    ref = RefGPT(vocab, dim, n_layers, n_heads, block_size)
    head_dim = dim // n_heads
    # per layer nanoGPT has 12 dim^2 (attention 4, MLP 8); ours has the attention's 2 dim^2 + 2 dim kv_width plus
    # SwiGLU's 3 dim hidden, so hidden = (12 dim^2 - attention) / (3 dim), rounded to a multiple of 8
    attn = 2 * dim * dim + 2 * dim * n_kv * head_dim
    hidden = 8 * round((12 * dim * dim - attn) / (3 * dim) / 8)
    cfg = M.ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                        hidden_dim=hidden, max_seq_len=block_size)
    ours = M.Transformer(cfg)
    n_ours, n_ref = ours.num_params(), ref.non_embedding_params()
    assert abs(n_ours / n_ref - 1) < 0.005, (n_ours, n_ref)
    return ours, ref, hidden, n_ours, n_ref


def make_step(model, B, T, vocab, fused_adamw=False):
    # fused=False is nanoGPT's choice off CUDA: a loop of small ops per parameter tensor (ours has 9 per layer,
    # nanoGPT 6); fused=True is one kernel per tensor
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused_adamw)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, T + 1), generator=g)
    idx, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        t0 = time.perf_counter()
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0
    return step


def bench_training(threads, repeats, B=8, T=256, vocab=256, shapes=SHAPES, fused_adamw=False, compile=False):
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for name, dim, n_layers, n_heads, n_kv in shapes:
            torch.manual_seed(0)
            ours, ref, hidden, n_ours, n_ref = matched_models(dim, n_layers, n_heads, n_kv, vocab, T)
            # --compile: torch.compile (inductor, C++ kernels on the CPU) for both, which fuses the elementwise ops
            models = {k: torch.compile(m.train()) if compile else m.train() for k, m in (("ours", ours), ("ref", ref))}
            steps = {k: make_step(m, B, T, vocab, fused_adamw) for k, m in models.items()}
            for s in steps.values():
                s()                                                   # warm-up: allocator, AdamW state (compile)
                if compile:
                    s()
            times = {k: [] for k in steps}
            for r in range(repeats):                                  # alternate, and swap who goes first
                for k in (("ours", "ref") if r % 2 == 0 else ("ref", "ours")):
                    times[k].append(steps[k]())
            tok = {k: B * T / statistics.median(v) for k, v in times.items()}
            rows.append((n_threads, name, hidden, n_ours, n_ref, tok["ours"], tok["ref"], tok["ours"] / tok["ref"]))
            print(f"{n_threads} thr  {name:22s} hidden {hidden:5d}  params {n_ours / 1e6:.3f}M / {n_ref / 1e6:.3f}M  "
                  f"ours {tok['ours']:7,.0f} tok/s  nanoGPT {tok['ref']:7,.0f} tok/s  ratio {tok['ours'] / tok['ref']:.2f}",
                  flush=True)
    print("\n| threads | shape | our hidden | ours tok/s | nanoGPT tok/s | ours / nanoGPT |")
    print("|---|---|---|---|---|---|")
    for n_threads, name, hidden, _, _, a, b, r in rows:
        print(f"| {n_threads} | {name} | {hidden} | {a:,.0f} | {b:,.0f} | {r:.2f} |")
    return rows


# -----------------------------------------------------------------------------
# inference: SmolLM2-135M's shape with random weights, dense cache

SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536, vocab_size=49152,
               norm_eps=1e-5, rope_theta=100000.0, max_seq_len=2048, tie_embeddings=True)


@torch.no_grad()
def bench_inference(model, prompt_len=256, new_tokens=32, repeats=3):
    """(prefill ms, decode tok/s), medians over repeats, batch 1, greedy, the dense fp16 cache."""
    from generate import make_cache
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    pre, dec = [], []
    for _ in range(repeats + 1):
        cache = make_cache("dense", cfg)
        t0 = time.perf_counter()
        logits, _ = model(idx, cache=cache, last_only=True)
        t1 = time.perf_counter()
        tok = logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            logits, _ = model(tok, cache=cache)
            tok = logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        dec.append(new_tokens / (t2 - t1))
    return 1e3 * statistics.median(pre[1:]), statistics.median(dec[1:])


def main(argv=None):
    p = Parser(prog="bench_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=numbers(int, lambda x: x >= 1, "at least 1", "1,2"), default=[1, 2],
                   help="comma-separated torch.set_num_threads values")
    p.add_argument("--repeats", type=POSITIVE, default=11, help="timed steps per model (alternating)")
    p.add_argument("--fused_adamw", action="store_true", help="AdamW(fused=True) for both models")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (needs a C++ compiler on CPU)")
    p.add_argument("--smollm", action="store_true", help="time prefill/decode at SmolLM2-135M's shape instead")
    a = p.parse_args(argv)
    threads = a.threads
    if a.smollm:
        torch.manual_seed(0)
        m = M.Transformer(M.ModelConfig(**SMOLLM2)).eval()
        for n in threads:
            torch.set_num_threads(n)
            ms, tps = bench_inference(m, repeats=a.repeats)
            print(f"{n} thr  SmolLM2-135M shape (random weights)  prefill 256 tokens {ms:.0f} ms  decode {tps:.1f} tok/s")
        return
    bench_training(threads, a.repeats, fused_adamw=a.fused_adamw, compile=a.compile)


if __name__ == "__main__":
    main()
