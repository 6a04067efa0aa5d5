"""
Train a small llama-like model (model.py) on a small corpus, nanoGPT style.

    python train.py                                   # the shipped config on the default corpus (stdlib sources)
    python train.py --max_iters=200 --n_layers=2      # override any TrainConfig *or* ModelConfig field: --key=value
    python train.py tiny --data=notes.txt             # a named preset (PRESETS below), then overrides
    python train.py --resume --out_dir=out            # continue from out/ckpt.pt, bit for bit
    torchrun --standalone --nproc_per_node=2 train.py # DDP: gloo on CPU, nccl on GPU

Checkpoints (out_dir/ckpt.pt) hold the model, its ModelConfig, the tokenizer spec, the optimizer, the step and the
sampler's RNG, so --resume draws the very batches the uninterrupted run would have drawn. --export_to=PATH also writes
a slim fp16 copy without optimizer state. The shipped ckpt/stdlib-byte/ckpt.pt came from (16 min on 2 busy cores)

    OMP_NUM_THREADS=1 python train.py --dtype=bfloat16 --max_iters=600 --eval_interval=150 \
        --out_dir=out-stdlib-byte --export_to=ckpt/stdlib-byte/ckpt.pt
"""
import json
import math
import os
import sys
import tempfile
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as datalib
import weights
from model import ATTN_PRESETS, ModelConfig, Transformer
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    resume: bool = False            # continue out_dir/ckpt.pt (a fresh run refuses to overwrite one)
    export_to: str = ""             # at the end also write a slim fp16 checkpoint here (no optimizer state)
    eval_interval: int = 150        # evaluate and checkpoint every this many steps
    eval_iters: int = 10            # batches per split per evaluation
    log_interval: int = 10
    # data (data.py)
    data: str = ""                  # a text file or a directory of them; "" = the Python stdlib's .py sources
    data_dir: str = "data_cache"    # tokenized corpora live here, one folder per fingerprint
    tokenizer: str = "bytes"        # bytes | gpt2 (if cached) | path to a Llama-3 tokenizer.model
    max_corpus_mb: float = 8.0      # read at most this much text (0 = all); the default corpus is ~12 MB
    val_frac: float = 0.1           # the last 10% of the token stream is the validation split
    # batch: tokens per step = batch_size * block_size * grad_accum * world_size
    batch_size: int = 16
    block_size: int = 256
    grad_accum: int = 1
    # AdamW with linear warmup then cosine decay to min_lr
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 100
    max_iters: int = 600
    lr_decay_iters: int = 0         # 0 -> max_iters; set it to keep the schedule when you stop early and resume later
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # 0 = off
    # system
    device: str = "auto"            # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"             # auto: bf16 autocast on GPUs that have it, else fp16 (+ grad scaling); fp32 on CPU
                                    # (bfloat16 on a CPU with avx512_bf16/AMX is ~1.5-2x faster)
    compile: bool = False
    seed: int = 1337
    # ModelConfig fields (model.py), set on the command line by their own names: --dim=512 --attn=clla ...
    model: dict = field(default_factory=lambda: dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256))


# Named starting points, applied before --key=value overrides. Keys may be TrainConfig or ModelConfig fields.
PRESETS = {
    # a seconds-long smoke test (the tests use it)
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, block_size=32, batch_size=8,
                 max_iters=50, eval_interval=25, eval_iters=4, log_interval=5, warmup_iters=5, learning_rate=3e-3),
    # GPT-2 small's shape (124M with a GPT-2 vocabulary), for throughput measurements
    "gpt2-small": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, max_seq_len=1024, block_size=256,
                       batch_size=8, learning_rate=6e-4, min_lr=6e-5),
    # the CLLA ablation's base shape: 16 heads x 32
    "small": dict(dim=512, n_layers=8, n_heads=16, n_kv_heads=16, max_seq_len=512, block_size=256),
    # attention variants: `python train.py small clla-quant`
    **ATTN_PRESETS,
}

# peak dense bf16/fp16 tensor-core FLOP/s, for MFU (by substring of the device name)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


# -----------------------------------------------------------------------------
# command line: --key=value checked against the field's type

def parse_value(key, text, tp):
    """'--key=text' -> a value of type tp: int, float, bool, str, dict, or a union of them (None as 'none')."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = typing.get_args(tp) if union else (tp,)
    if type(None) in args and text.lower() in ("none", "null"):
        return None
    for t in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):  # str last: '4' is an int
        t = typing.get_origin(t) or t
        if t is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
        elif t in (int, float):
            try:
                return t(text)
            except ValueError:
                pass
        elif t is str:
            return text
        elif t in (dict, list):
            try:
                v = json.loads(text)
                if isinstance(v, t):
                    return v
            except ValueError:
                pass
    names = " or ".join("none" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
    raise ValueError(f"--{key}={text!r} is not a valid {names}" + (" (JSON, e.g. --rope_scaling='{\"factor\": 8}')"
                                                                      if dict in args else ""))


def apply_overrides(cfg, argv):
    """Presets (bare names) and --key=value flags onto a TrainConfig, in order. Model fields go into cfg.model."""
    tfields = typing.get_type_hints(TrainConfig)
    mfields = typing.get_type_hints(ModelConfig)
    assert not (set(tfields) - {"model"}) & set(mfields), "TrainConfig and ModelConfig field names must not collide"

    def put(key, value):
        if key in tfields:
            setattr(cfg, key, value)
        else:
            cfg.model[key] = value

    for arg in argv:
        if not arg.startswith("--"):
            if arg not in PRESETS:
                raise ValueError(f"unknown preset {arg!r}; presets: {', '.join(PRESETS)} (flags look like --key=value)")
            for k, v in PRESETS[arg].items():
                put(k, v)
            continue
        key, eq, text = arg[2:].partition("=")
        tp = tfields.get(key) or mfields.get(key)
        if tp is None:
            import difflib
            close = difflib.get_close_matches(key, list(tfields) + list(mfields), n=1)
            raise ValueError(f"unknown flag --{key}" + (f"; did you mean --{close[0]}?" if close else
                                                         "; see TrainConfig in train.py and ModelConfig in model.py"))
        if not eq:
            if tp is not bool:
                raise ValueError(f"--{key} needs a value: --{key}=VALUE")
            text = "true"
        put(key, parse_value(key, text, tp))
    return cfg


# -----------------------------------------------------------------------------
# helpers

def get_lr(it, cfg):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device):
    # decay matrices (linear and embedding weights), not gains/biases: 1-D tensors are scales, shrinking them hurts
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def flops_per_token(model, T):
    # nanoGPT's estimate (PaLM appendix B): 6 FLOPs per weight per token for forward+backward, plus attention scores
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layers * c.n_heads * c.head_dim * T


# -----------------------------------------------------------------------------

def check_writable(path, flag, is_file=False):
    """The folder `path` (or a file's folder), or the nearest existing one above it (where it would be made), must be
    a directory this process can create files in: found now, not after the data preparation and the model build.
    Probed with a temp file that vanishes, so nothing is left behind; a read-only disk or a missing permission is
    one line."""
    p = os.path.dirname(os.path.abspath(path)) if is_file else os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"--{flag}={path}: {p} is a file, not a directory; choose another --{flag}")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ValueError(f"--{flag}={path}: cannot write in {p} ({e.strerror or e}); choose another --{flag}") from None


def validate(cfg):
    """Every cheap check of the settings, before any data preparation or model building."""
    for key in ("batch_size", "block_size", "grad_accum", "eval_interval", "log_interval"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key}={getattr(cfg, key)} must be at least 1")
    for key in ("max_iters", "eval_iters", "warmup_iters", "lr_decay_iters"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"--{key}={getattr(cfg, key)} must be >= 0")
    if not 0.0 < cfg.val_frac < 1.0:
        raise ValueError(f"--val_frac={cfg.val_frac} must be a fraction strictly between 0 and 1 (e.g. 0.1)")
    for key in ("learning_rate", "min_lr", "grad_clip", "weight_decay", "max_corpus_mb"):
        v = getattr(cfg, key)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"--{key}={v} must be a finite number >= 0")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out_dir={cfg.out_dir} is a file, not a directory; choose another --out_dir")
    for flag in ("out_dir", "data_dir", "export_to"):
        if getattr(cfg, flag):
            check_writable(getattr(cfg, flag), flag, is_file=flag == "export_to")
    if cfg.device != "auto":
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise ValueError(f"--device={cfg.device!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device={cfg.device} but no CUDA GPU is visible; use --device=cpu (or auto)")


def main(argv=None, log=print):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = apply_overrides(TrainConfig(), argv)
    validate(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}; start a fresh run without --resume, or point "
                             f"--out_dir at the run to continue")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            assert {"model", "config", "optimizer", "step", "train_config", "rng"} <= set(ckpt)
        except Exception:
            raise ValueError(f"--resume: {ckpt_path} is not a full train.py checkpoint (corrupt, or an exported one "
                             f"without optimizer state)") from None
        # the run's own settings, then this command line on top (e.g. a larger --max_iters); the model's shape is
        # the checkpoint's, so a model flag may only repeat it
        known = {f.name for f in fields(TrainConfig)}
        cfg = apply_overrides(TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known}), argv)
        cfg.resume = True
        validate(cfg)
        for k, v in apply_overrides(TrainConfig(model={}), argv).model.items():
            if ckpt["config"].get(k) != v:
                raise ValueError(f"--{k}={v} differs from the checkpoint's {k}={ckpt['config'].get(k)}; the model's "
                                 f"shape comes from the checkpoint when resuming")
    elif os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} already exists; pass --resume to continue it, or choose another --out_dir")

    # distributed set-up: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if not master:
        log = lambda *a, **k: None  # noqa: E731  (one voice in the logs)
    holder = [ckpt]  # handed over so _train can free it once loaded
    del ckpt
    try:
        return _train(cfg, holder, ckpt_path, device, ddp, rank, world, master, log)
    finally:
        if ddp:
            dist.destroy_process_group()


def _model_config(cfg, ckpt, tok):
    """The model's config: the checkpoint's when resuming, else the flags' (vocab_size from the tokenizer)."""
    if ckpt is not None:
        mconf = ModelConfig.from_dict(ckpt["config"])
    else:
        margs = dict(cfg.model)
        margs.setdefault("vocab_size", tok.n_vocab)
        if margs["vocab_size"] < tok.n_vocab:
            raise ValueError(f"--vocab_size={margs['vocab_size']} is smaller than the tokenizer's {tok.n_vocab}")
        mconf = ModelConfig.from_dict(margs)
    if cfg.block_size > mconf.max_seq_len:
        raise ValueError(f"--block_size={cfg.block_size} exceeds max_seq_len={mconf.max_seq_len}; lower it or raise "
                         f"--max_seq_len")
    return mconf


def _dtype(cfg, device):
    """(dtype name, torch dtype) for --dtype; "auto" is the best this device runs."""
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.type == "cuda" else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if ptdtype is None:
        raise ValueError(f"--dtype={cfg.dtype!r}: choose auto, float32, bfloat16 or float16")
    return dtype, ptdtype


def _data(cfg, tok, ddp, master, log):
    """The corpus as token memmaps (data.py), prepared by rank 0; its error reaches every rank."""
    err, meta = [None], None
    if master:
        try:
            meta = datalib.prepare(cfg.data, tok, cfg.data_dir, cfg.max_corpus_mb, cfg.val_frac, log)
        except Exception as e:  # tell the other ranks instead of leaving them waiting
            err = [str(e)]
    if ddp:
        dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise ValueError(err[0])
    if not master:
        meta = datalib.prepare(cfg.data, tok, cfg.data_dir, cfg.max_corpus_mb, cfg.val_frac, log)
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] <= cfg.block_size:
            raise ValueError(f"the {split} split has {meta[f'{split}_tokens']} tokens, fewer than block_size+1="
                             f"{cfg.block_size + 1}; add text, lower --block_size, or change --val_frac")
    return meta


def _resume(ckpt, raw, opt, scaler, gen, cfg, rank, world, log):
    """Weights, optimizer, loss scaler and both RNG streams from a checkpoint -> (step, val loss of these weights)."""
    raw.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    step = ckpt["step"]
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    if len(rng["sampler"]) == world:
        gen.set_state(rng["sampler"][rank])
    else:  # a different number of processes cannot replay the same batches; carry on with fresh streams
        log(f"note: checkpoint has {len(rng['sampler'])} sampler states for {world} processes; reseeding")
        gen.manual_seed(cfg.seed + rank + 1_000_003 * step)
    # the bar a later save must clear is the loss of the weights on disk (older checkpoints kept the run's best in
    # best_val_loss even when the file held later, worse weights)
    return step, ckpt.get("val_loss", ckpt.get("best_val_loss", float("inf")))


def train_step(model, raw, opt, scaler, ctx, meta, cfg, gen, device, ddp, lr):
    """One optimizer step over grad_accum micro-batches -> the summed (scaled) loss, on the device (no sync)."""
    for g in opt.param_groups:
        g["lr"] = lr
    total = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        x, y = datalib.get_batch(meta, "train", cfg.batch_size, cfg.block_size, gen, device)
        if ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with ctx:
            _, loss = model(x, y)
            loss = loss / cfg.grad_accum
        scaler.scale(loss).backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return total


def _train(cfg, holder, ckpt_path, device, ddp, rank, world, master, log):
    """Set up (tokenizer, config, data, model, optimizer, resume), then the loop: step, log, evaluate, checkpoint."""
    ckpt = holder.pop()
    tok = load_tokenizer(cfg.tokenizer)
    if ckpt is not None and ckpt.get("tokenizer") != tok.spec:
        raise ValueError(f"--tokenizer gives {tok.spec} but the checkpoint was trained with {ckpt.get('tokenizer')}")
    mconf = _model_config(cfg, ckpt, tok)
    dtype, ptdtype = _dtype(cfg, device)  # resolved here, not in cfg: a resumed run on other hardware decides afresh
    meta = _data(cfg, tok, ddp, master, log)  # after every cheap check, so a typo never waits for tokenizing

    # ---- model and optimizer
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    raw = Transformer(mconf).to(device)
    opt = make_optimizer(raw, cfg, device)
    # weights and optimizer stay fp32; autocast runs matmuls in the low precision; fp16 needs loss scaling
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16 and device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # the training-batch sampler (CPU; its state is saved)
    step, best_val = 0, float("inf")
    saved = None  # (step, val loss) of what ckpt_path holds, so every message can say exactly that
    if ckpt is not None:
        step, best_val = _resume(ckpt, raw, opt, scaler, gen, cfg, rank, world, log)
        saved = (step, best_val)
        log(f"resuming {ckpt_path} at step {step}")
    del ckpt
    log(f"model: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {asdict(mconf)}")
    model = torch.compile(raw) if cfg.compile else raw
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    @torch.no_grad()
    def evaluate():
        """Mean loss over eval_iters batches per split. Its own fixed-seed RNG: the same batches every time, and the
        training sampler's stream is untouched (so evaluating never changes the run)."""
        raw.eval()
        out = {}
        for split in ("train", "val"):
            g = torch.Generator().manual_seed(cfg.seed + 7919 * (rank + 1))
            losses = torch.zeros(cfg.eval_iters, device=device)
            for k in range(cfg.eval_iters):
                x, y = datalib.get_batch(meta, split, cfg.batch_size, cfg.block_size, g, device)
                with ctx:
                    losses[k] = raw(x, y)[1]
            mean = losses.mean()
            if ddp:
                dist.all_reduce(mean)
                mean /= world
            out[split] = mean.item()
        raw.train()
        return out

    def on_disk():
        if saved is None:
            return f"no checkpoint was written to {ckpt_path}"
        return f"{ckpt_path} holds step {saved[0]} (val loss {saved[1]:.4f})"

    def diverged(what, lr):
        return ValueError(f"{what} at step {step} (lr {lr:.2e}): the run diverged and stopped; {on_disk()}. Lower "
                          f"--learning_rate or raise --warmup_iters")

    def checkpoint(losses):
        states = [gen.get_state()]
        if ddp:  # every rank's sampler, so a resumed DDP run replays each rank's batches
            states = [None] * world
            dist.all_gather_object(states, gen.get_state())
        if not master:
            return
        weights.save_checkpoint(ckpt_path, raw, tok, step, optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                                train_config=asdict(cfg), best_val_loss=best_val, train_loss=losses["train"],
                                val_loss=losses["val"], data={k: v for k, v in meta.items() if k != "dir"},
                                rng={"sampler": states, "torch": torch.get_rng_state()})

    # ---- the loop
    os.makedirs(cfg.out_dir, exist_ok=True)
    logf = open(os.path.join(cfg.out_dir, "log.jsonl"), "a" if cfg.resume else "w") if master else None
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    fpt = flops_per_token(raw, cfg.block_size)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    log(f"training: {tokens_per_iter:,} tokens/step ({world} process(es), {dtype}, {device}) from step {step} to "
        f"{cfg.max_iters}")
    losses, history, evals = None, {}, {}
    if step == 0 and cfg.eval_iters > 0:
        losses = evals[0] = evaluate()
        log(f"step 0: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    t_start = t_last = time.perf_counter()
    steps_since, first_step = 0, step
    loss_acc = torch.zeros((), device=device)
    while step < cfg.max_iters:
        lr = get_lr(step, cfg)
        loss_acc += train_step(model, raw, opt, scaler, ctx, meta, cfg, gen, device, ddp, lr)
        step += 1
        steps_since += 1

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            if ddp:
                dist.all_reduce(loss_acc)
                loss_acc /= world
            lossf = loss_acc.item() / steps_since  # .item() syncs the GPU: only here, once per log interval
            if not math.isfinite(lossf):
                raise diverged(f"training loss is {lossf}", lr)
            now = time.perf_counter()
            dt = (now - t_last) / steps_since
            tps = tokens_per_iter / dt
            mfu = f", mfu {100 * fpt * tps / world / peak:.1f}%" if peak else ""
            log(f"iter {step}: loss {lossf:.4f}, lr {lr:.2e}, {1000 * dt:.1f} ms/iter, {tps:,.0f} tok/s{mfu}")
            history[step] = lossf
            if logf:
                logf.write(json.dumps({"step": step, "loss": lossf, "lr": lr, "ms_per_iter": 1000 * dt,
                                       "tok_per_s": tps}) + "\n")
                logf.flush()
            loss_acc.zero_()
            t_last, steps_since = now, 0

        if cfg.eval_iters > 0 and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
            losses = evals[step] = evaluate()
            if not all(math.isfinite(x) for x in losses.values()):
                raise diverged(f"evaluation loss is {losses}", lr)
            log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            # keep the best: weights that evaluate worse than those on disk never replace them (a run that blows up
            # with finite losses would otherwise overwrite the only good checkpoint). Every rank takes the same
            # branch: the losses were all-reduced.
            if losses["val"] <= best_val:
                best_val = losses["val"]
                checkpoint(losses)
                saved = (step, best_val)
                log(f"saved {ckpt_path} (step {step}, val loss {best_val:.4f})")
            else:
                log(f"kept {ckpt_path} (step {saved[0]}, val loss {saved[1]:.4f}): step {step}'s val loss "
                    f"{losses['val']:.4f} is worse")
            t_last = time.perf_counter()  # evaluation and saving are not training time
            if logf:
                logf.write(json.dumps({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                                       "saved": saved[0] == step}) + "\n")

    elapsed = time.perf_counter() - t_start
    if logf:
        logf.close()
    if saved is not None and saved[0] != step:
        log(f"done at step {step}; {on_disk()}, the best evaluated (the last weights were worse and are not saved)")
    if cfg.export_to and master:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--export_to: no checkpoint at {ckpt_path} to export (set --eval_iters > 0)")
        size = weights.export_slim(torch.load(ckpt_path, map_location="cpu", weights_only=True), cfg.export_to)
        log(f"exported {cfg.export_to} from {on_disk()} ({size / 2**20:.1f} MB, fp16, no optimizer state)")
    return {"step": step, "losses": history, "evals": evals, "best_val_loss": best_val,
            "saved_step": saved and saved[0], "elapsed_s": elapsed, "trained_steps": step - first_step,
            "tokens_per_iter": tokens_per_iter}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
