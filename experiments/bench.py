"""
Decode-attention benchmark on one GPU (README): one query token per sequence against a long cache.

    python experiments/bench.py                 # the full table on a CUDA GPU (H100: a few minutes)
    python experiments/bench.py --quick         # fewer sizes
    python experiments/bench.py --interpret     # CPU smoke test under TRITON_INTERPRET=1: tiny sizes, all of it runs

Paths, on the same number of tokens (a Llama-3-8B layer by default: 32 query heads, 8 KV heads, head_dim 128):
    sdpa       F.scaled_dot_product_attention on an fp16 cache (the query group as G rows per KV head)
    dense      our kernel on decode_kernel.dense_view(k, v): flash-decoding with the same structure, fp16 cache
    deq+sdpa   dequantize the ZipCache layout to fp16, then sdpa (what the official ZipCache code does every step)
    fused      decode_kernel.zip_decode_attention on the ZipCache layout (60% of tokens at 4 bits, 40% at 2 bits)
Timing: CUDA-graph replay (triton.testing.do_bench_cudagraph), median; every measurement cycles through enough
cache instances (>= 3, > 200 MB in all) that the 50 MB L2 never serves a repeat. GB/s = bytes the path must read
or write (codes, parameters, tables, buffer, q, out, split partials) / time, also as a fraction of a measured
device-to-device copy. Caches hold random codes and realistic parameter ranges: speed does not depend on values.
"""
import math
import os
import subprocess
import sys
import time

if __name__ == "__main__" and "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import (kernels are decorated at import)

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

import decode_kernel
from experiment_flags import FRACTION, NONNEGATIVE, POSITIVE, Parser, number, numbers

args = None   # the parsed command line (main); the cache helpers below are importable without it (tests use them)
DEV = "cuda"


def parse_args(argv=None):
    p = Parser(prog="bench.py", description="fused ZipCache decode kernel vs SDPA (see the module docstring)")
    sizes = lambda example, count=None: numbers(int, lambda x: x >= 1, "at least 1", example, count)  # noqa: E731
    pow2 = number(int, lambda x: x >= 1 and x & (x - 1) == 0, "a power of 2")
    p.add_argument("--contexts", type=sizes("4096,32768"), default=[4096, 16384, 32768, 131072],
                   help="cached tokens per sequence")
    p.add_argument("--batches", type=sizes("1,8"), default=[1, 8, 32])
    p.add_argument("--heads", type=sizes("32,8", count=2), default=[32, 8], help="query heads, KV heads")
    p.add_argument("--head_dim", type=number(int, lambda x: x >= 16 and x & (x - 1) == 0, "a power of 2, >= 16"),
                   default=128)
    p.add_argument("--salient", type=FRACTION, default=0.6, help="fraction of tokens at 4 bits")
    p.add_argument("--n_buf", type=NONNEGATIVE, default=0, help="tokens in the fp16 decode buffer (added to the "
                   "context)")
    p.add_argument("--block_n", type=pow2, default=None, help="tile rows (default: the launcher's choice)")
    p.add_argument("--num_warps", type=pow2, default=4)
    p.add_argument("--rep_ms", type=POSITIVE, default=50, help="do_bench_cudagraph repetition time per measurement")
    p.add_argument("--mem_frac", type=number(float, lambda x: 0 < x <= 1, "a fraction in (0, 1]"), default=0.4,
                   help="skip sizes whose caches need more GPU memory")
    p.add_argument("--quick", action="store_true", help="contexts 4k/32k, batches 1/8, no extra sections")
    p.add_argument("--interpret", action="store_true", help="CPU smoke test with the Triton interpreter")
    a = p.parse_args(argv)
    if a.heads[0] % a.heads[1]:
        p.error(f"--heads {a.heads[0]},{a.heads[1]}: query heads must be a multiple of KV heads")
    return a


# -----------------------------------------------------------------------------
# synthetic caches

def synthetic_view(B, Hkv, D, ctx, salient=0.6, n_buf=0, prompt=None, block=100, row_scope=False, device=None,
                   seed=0):
    """A ZipLayerView of ctx quantized tokens (+ n_buf fp16 ones) per sequence, laid out as cache.py stores it.
    prompt=None: one block (a prompt); else a `prompt`-token block followed by `block`-token decode blocks.
    Each block puts round(salient·n) tokens at 4 bits and the rest at 2 bits; rows are equal across sequences."""
    device = device or DEV
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = [ctx] if prompt is None or prompt >= ctx else [prompt] + [block] * ((ctx - prompt) // block)
    sizes[-1] += ctx - sum(sizes)
    nb = len(sizes)
    n_hi = [round(salient * n) for n in sizes]
    n_lo = [n - h for n, h in zip(sizes, n_hi)]
    Hv = 1 if row_scope else Hkv

    def u(shape, lo, hi):
        return (torch.rand(shape, generator=g, device=device) * (hi - lo) + lo).half()

    def segment(bits, counts):
        cap = max(1, sum(counts))
        W = D * bits // 8
        rows = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32).expand(B, -1).contiguous()
        return decode_kernel.ZipSegment(
            bits,
            torch.randint(0, 256, (B, Hkv, cap, W), generator=g, device=device, dtype=torch.uint8),
            torch.randint(0, 256, (B, Hkv, cap, W), generator=g, device=device, dtype=torch.uint8),
            u((B, Hv, cap), 0.02, 0.2), u((B, Hv, cap), -1.0, -0.2),        # value scale, min (of V / c)
            u((B, nb, Hkv, D), 0.05, 0.5) * (2 ** (4 - bits)),              # key scale: coarser at 2 bits
            u((B, nb, Hkv, D), -2.0, 0.0), rows)

    return decode_kernel.ZipLayerView(
        hi=segment(4, n_hi), lo=segment(2, n_lo), v_chan=u((B, nb, Hkv, D), 0.5, 2.0),
        k_buf=torch.randn(B, Hkv, max(n_buf, 1), D, generator=g, device=device).half(),
        v_buf=torch.randn(B, Hkv, max(n_buf, 1), D, generator=g, device=device).half(),
        n_buf=n_buf, n_blocks=nb)


def dequant_plan(view):
    """The block of every row, per segment (computed once, outside the timed region: no syncs under a graph)."""
    return [decode_kernel.row_blocks(seg.rows[0], view.n_blocks) for seg in view.segments]


def dequantize_view(view, plan):
    """The ZipCache layout -> fp16 K, V [B, H_kv, L, D] (hi | lo | buffer) with decode_kernel.dequantize_segment, in fp16,
    vectorised over everything (the 'dequantize, then SDPA' baseline)."""
    parts = [decode_kernel.dequantize_segment(seg, view.v_chan, blk, torch.float16)
             for seg, blk in zip(view.segments, plan) if len(blk)]
    parts.append((view.k_buf[:, :, :view.n_buf], view.v_buf[:, :, :view.n_buf]))
    return torch.cat([k for k, _ in parts], 2), torch.cat([v for _, v in parts], 2)


def sdpa_decode(q, k, v):
    """q [B, H_q, D], k/v [B, H_kv, L, D] -> [B, H_q, D]. The G query heads of a KV head become G query rows of one
    non-causal attention, which every SDPA backend (flash included) runs without repeating K/V."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(B, Hkv, Hq // Hkv, D), k, v).view(B, Hq, D)


# -----------------------------------------------------------------------------
# bytes each path must move

def bytes_fused(view, Hq, S):
    B, Hkv, _, D = view.k_buf.shape
    total = 2 * B * Hq * D * 2                                                   # q in, out
    for seg in view.segments:
        n = int(seg.rows[0, view.n_blocks])
        Hv = seg.v_scale.shape[1]
        total += B * Hkv * n * 2 * seg.k_codes.shape[-1] + B * Hv * n * 2 * 2   # K/V codes, value (σ, ν)
        total += seg.k_scale.shape[0] * view.n_blocks * Hkv * D * 2 * 2         # key (a, μ) per block
        total += seg.rows.numel() * 4
    total += view.v_chan.shape[0] * view.n_blocks * Hkv * D * 2                 # CST normalizer per block
    total += B * Hkv * view.n_buf * D * 2 * 2                                   # fp16 buffer
    total += B * 2 * S * 4 * 4                                                   # split table
    if S > 1:
        total += B * Hq * S * (D + 1) * 4 * 2                                    # fp32 partials, written + read
    return total


def bytes_dense(B, Hq, Hkv, L, D, S=1):
    return B * Hkv * L * D * 2 * 2 + 2 * B * Hq * D * 2 + (B * Hq * S * (D + 1) * 8 if S > 1 else 0)


# -----------------------------------------------------------------------------
# timing

def timeit(fns):
    """Median µs per call of fns[i]() cycling through all instances (distinct caches, so L2 cannot serve repeats)."""
    def run_all():
        for f in fns:
            f()
    if args.interpret:
        t0 = time.perf_counter()
        run_all()
        return (time.perf_counter() - t0) / len(fns) * 1e6
    import triton.testing
    run_all()
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench_cudagraph(run_all, rep=args.rep_ms, return_mode="median")
    except Exception as e:  # graph capture failed (old torch/triton?): plain events, said loudly
        print(f"  (CUDA graph timing failed: {type(e).__name__}: {e}; using do_bench)")
        ms = triton.testing.do_bench(run_all, rep=args.rep_ms, return_mode="median")
    return ms * 1e3 / len(fns)


def n_instances(nbytes):
    return 1 if args.interpret else int(min(64, max(3, math.ceil(200e6 / max(nbytes, 1)))))


def copy_bandwidth():
    if args.interpret:
        return float("nan")
    import triton.testing
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device=DEV), torch.empty(n, dtype=torch.uint8, device=DEV)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    return 2 * n / (ms * 1e-3)  # read + write, bytes/s


def fits(nbytes):
    """Leave room: skip a path whose caches (all rotating instances) need more than --mem_frac of the GPU."""
    if args.interpret:
        return True
    return nbytes <= args.mem_frac * torch.cuda.get_device_properties(0).total_memory


def num_splits_for(B, Hkv, view_or_L):
    n_sm = decode_kernel._n_sm(torch.device(DEV))
    if isinstance(view_or_L, int):
        return decode_kernel.pick_num_splits(B, Hkv, view_or_L, n_sm)
    v = view_or_L
    return decode_kernel.pick_num_splits(B, Hkv, v.hi.k_codes.shape[2] + v.lo.k_codes.shape[2] + v.n_buf, n_sm)


# -----------------------------------------------------------------------------
# one row of the table

def measure(B, Hq, Hkv, D, ctx, salient, n_buf=0, prompt=None, paths=("sdpa", "dense", "deq", "fused"),
            block_n=None, num_warps=None, block=100):
    block_n, num_warps = block_n or args.block_n, num_warps or args.num_warps  # block_n None = launcher's default
    L = ctx + n_buf
    r = dict(B=B, ctx=ctx, Hq=Hq, Hkv=Hkv, salient=salient)
    kw = dict(block_n=block_n, num_warps=num_warps)
    q = torch.randn(B, Hq, D, device=DEV).half()
    fp16_bytes = bytes_dense(B, Hq, Hkv, L, D)
    R = n_instances(fp16_bytes)
    if {"sdpa", "dense"} & set(paths) and fits(R * fp16_bytes):      # each path is skipped alone if too big
        caches = [(torch.randn(B, Hkv, L, D, device=DEV).half(), torch.randn(B, Hkv, L, D, device=DEV).half())
                  for _ in range(R)]
        if "sdpa" in paths:
            r["sdpa"] = timeit([lambda k=k, v=v: sdpa_decode(q, k, v) for k, v in caches])
            r["sdpa_bytes"] = fp16_bytes
        if "dense" in paths:
            S = num_splits_for(B, Hkv, L)
            views = [decode_kernel.dense_view(k, v) for k, v in caches]
            r["dense"] = timeit([lambda v=v: decode_kernel.zip_decode_attention(q, v, num_splits=S, **kw) for v in views])
            r["dense_bytes"] = bytes_dense(B, Hq, Hkv, L, D, S)
        del caches
    view0 = synthetic_view(B, Hkv, D, ctx, salient, n_buf, prompt, block)
    S = num_splits_for(B, Hkv, view0)
    mixed = bytes_fused(view0, Hq, S)
    r.update(S=S, fused_bytes=mixed, byte_ratio=fp16_bytes / mixed, n_blocks=view0.n_blocks)
    R = n_instances(mixed)
    if fits(R * mixed):
        views = [view0] + [synthetic_view(B, Hkv, D, ctx, salient, n_buf, prompt, block, seed=i)
                           for i in range(1, R)]
        if "fused" in paths:
            r["fused"] = timeit([lambda v=v: decode_kernel.zip_decode_attention(q, v, num_splits=S, **kw) for v in views])
        if "deq" in paths and fits(R * mixed + 4 * fp16_bytes):       # + the fp16 copy and its temporaries
            plans = [dequant_plan(v) for v in views]
            r["deq"] = timeit([lambda v=v, pl=pl: sdpa_decode(q, *dequantize_view(v, pl))
                               for v, pl in zip(views, plans)])
        del views
    if not any(k in r for k in paths):
        r["skip"] = "memory"
    if not args.interpret:
        torch.cuda.empty_cache()
    return r


def fmt_row(r, copy_bw):
    head = f"{r['ctx']:>7} {r['B']:>3} {r.get('S', '-'):>3}"
    if "skip" in r:
        return head + f"  skipped ({r['skip']})"
    cells = []
    for k in ("sdpa", "dense", "deq", "fused"):
        cells.append(f"{r[k]:9.1f}" if k in r else f"{'-':>9}")
    gbs = r["fused_bytes"] / (r["fused"] * 1e-6) / 1e9 if "fused" in r else float("nan")
    if "fused" not in r:
        return head + " " + " ".join(cells) + f" {'(fused skipped: memory)':>30}"
    sd_gbs = r["sdpa_bytes"] / (r["sdpa"] * 1e-6) / 1e9 if "sdpa" in r else float("nan")
    frac = gbs * 1e9 / copy_bw if copy_bw == copy_bw else float("nan")
    x = {k: r[k] / r["fused"] if k in r and "fused" in r else float("nan") for k in ("sdpa", "dense", "deq")}
    return (head + " " + " ".join(cells) + f" {sd_gbs:8.0f} {gbs:8.0f} {100 * frac:5.0f}%"
            f" {x['sdpa']:6.2f} {x['dense']:6.2f} {x['deq']:6.2f} {r['byte_ratio']:5.2f}"
            f" {x['sdpa'] / r['byte_ratio']:5.2f}")


HEADER = (f"{'ctx':>7} {'B':>3} {'S':>3} {'sdpa_us':>9} {'dense_us':>9} {'deq+sdpa':>9} {'fused_us':>9}"
          f" {'sdpaGB/s':>8} {'fusedGB/s':>8} {'%copy':>6} {'x_sdpa':>6} {'x_dens':>6} {'x_deq':>6} {'bytes':>5}"
          f" {'x/byt':>5}")


def check_correctness(Hq, Hkv, D):
    """The numbers mean nothing if the kernel is wrong: compare with the fp32 reference once, on this device."""
    B, ctx = (2, 300) if args.interpret else (4, 8192)
    view = synthetic_view(B, Hkv, D, ctx, args.salient, n_buf=17, prompt=ctx // 2)
    q = torch.randn(B, Hq, D, device=DEV).half()
    ref, ref_lse = decode_kernel.zip_decode_attention_ref(q.float(), view, return_lse=True)
    out, lse = decode_kernel.zip_decode_attention(q, view, num_splits=3, return_lse=True, block_n=args.block_n,
                                            num_warps=args.num_warps)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    dl = (lse - ref_lse).abs().max().item()
    print(f"correctness vs fp32 reference ({B}x{ctx} tokens, 3 splits): rel err {rel:.2e}, max |dlse| {dl:.2e}"
          f" -> {'ok' if rel <= 2e-3 and dl <= 1e-3 else 'FAILED'}")


def compile_stats():
    """Registers / spills of the stage-1 kernel as compiled on this device (triton-internal, best effort)."""
    try:
        caches = decode_kernel._zip_decode_stage1.device_caches
        out = []
        for dev_cache in caches.values():
            for k in dev_cache[0].values():
                k._init_handles()
                out.append(f"{k.n_regs} regs, {k.n_spills} spills, {k.metadata.shared} B shared "
                           f"(num_warps={k.metadata.num_warps}, num_stages={k.metadata.num_stages})")
        return sorted(set(out))
    except Exception as e:  # pragma: no cover - internal API
        return [f"n/a ({type(e).__name__})"]


def main(argv=None):
    global args, DEV
    args = parse_args(argv)
    if not args.interpret and not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (none found); run `python experiments/bench.py --interpret` for a CPU "
                 "smoke test")
    if not decode_kernel.HAS_TRITON:
        sys.exit("bench.py needs triton: pip install triton")
    DEV = "cpu" if args.interpret else "cuda"
    Hq, Hkv = args.heads
    D = args.head_dim
    contexts, batches = args.contexts, args.batches
    if args.quick:
        contexts, batches = [4096, 32768], [1, 8]
    if args.interpret:
        Hq, Hkv, D, contexts, batches = 8, 2, 64, [256], [1, 2]
    import triton
    if DEV == "cuda":
        prop = torch.cuda.get_device_properties(0)
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            drv = "?"
        print(f"device {prop.name} ({prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB), "
              f"driver {drv}, CUDA {torch.version.cuda}, torch {torch.__version__}, triton {triton.__version__}")
    else:
        print(f"CPU smoke test under TRITON_INTERPRET=1 (times are meaningless), triton {triton.__version__}")
    check_correctness(Hq, Hkv, D)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    print(f"\nlayer: H_q={Hq}, H_kv={Hkv}, D={D}; {100 * args.salient:.0f}% of tokens at 4 bits, one prompt block, "
          f"n_buf={args.n_buf}; block_n={args.block_n or 'auto'}, num_warps={args.num_warps}; times in µs per call")
    print("x_* = speedup of fused over that path; bytes = fp16 bytes / fused bytes; x/byt = x_sdpa / bytes\n")
    print(HEADER)
    rows = []
    for ctx in contexts:
        for B in batches:
            r = measure(B, Hq, Hkv, D, ctx, args.salient, args.n_buf)
            rows.append(r)
            print(fmt_row(r, bw), flush=True)
    print("\nstage-1 kernel as compiled:", "; ".join(compile_stats()))

    if not args.quick:
        ctx, B = (256, 2) if args.interpret else (32768, 8)
        print(f"\nat ctx={ctx}, B={B}:")
        print("block structure: 4k prompt + 100-token decode blocks, 99 tokens in the fp16 buffer")
        print(HEADER)
        prompt = 128 if args.interpret else 4096
        print(fmt_row(measure(B, Hq, Hkv, D, ctx, args.salient, n_buf=99, prompt=prompt), bw), flush=True)
        print("salient fraction 0 / 0.2 / 1.0 (fused and deq+sdpa only)")
        for s in (0.0, 0.2, 1.0):
            print(fmt_row(measure(B, Hq, Hkv, D, ctx, s, paths=("fused", "deq")), bw) + f"   salient={s}",
                  flush=True)
        print(f"MHA shape (H_q = H_kv = {Hq})")
        print(fmt_row(measure(B, Hq, Hq, D, ctx, args.salient), bw), flush=True)
        print("fused-kernel configs (block_n, num_warps):")
        for bn, nw in ((32, 4), (64, 4), (64, 8), (128, 8)):
            r = measure(B, Hq, Hkv, D, ctx, args.salient, paths=("fused",), block_n=bn, num_warps=nw)
            print(f"  block_n={bn:>3} num_warps={nw}: {r['fused']:8.1f} µs", flush=True)
        # the cache's default key groups: each run of 16 rows of a precision group is a block for the kernel (its
        # own key scale and min), so at 50% salient a block holds 32 tokens and a 64-row tile is mostly masked
        print("key groups of 16 rows (the cache's default; 50% salient = 32-token blocks), by block_n:")
        for bn in (16, 32, 64):
            r = measure(B, Hq, Hkv, D, ctx, 0.5, prompt=32, block=32, paths=("fused", "deq"), block_n=bn)
            print(f"  block_n={bn:>3}: fused {r['fused']:8.1f} µs, deq+sdpa {r.get('deq', float('nan')):8.1f} µs, "
                  f"{r['n_blocks']} blocks, bytes {r['byte_ratio']:.2f}x", flush=True)

    # the kernel's targets (README "The decode kernel"), judged on this run
    if DEV == "cuda":
        print("\ntargets:")
        at = [r for r in rows if r["ctx"] == 32768 and r["B"] == 8 and "fused" in r]
        for r in at:
            gbs = r["fused_bytes"] / (r["fused"] * 1e-6)
            print(f"  32k, B=8: {gbs / 1e9:.0f} GB/s = {100 * gbs / bw:.0f}% of copy (target >= 60%): "
                  f"{'PASS' if gbs >= 0.6 * bw else 'FAIL'}")
            x = r["sdpa"] / r["fused"] if "sdpa" in r else float("nan")
            print(f"  32k, B=8: {x:.2f}x over sdpa (target >= 2.5x): {'PASS' if x >= 2.5 else 'FAIL'}")
        both = [r for r in rows if "fused" in r and "deq" in r]
        slower = [f"{r['ctx']}x{r['B']}" for r in both if r["fused"] >= r["deq"]]
        print(f"  faster than deq+sdpa at every size: {'PASS' if not slower else 'FAIL at ' + ', '.join(slower)}")


if __name__ == "__main__":
    main()
