"""
Synthetic line retrieval, in the spirit of LongEval (the task of the ZipCache paper's Fig. 1 and Fig. 5).

A record is many lines `line <id>: <value>`, then a question about one of them; the answer is that line's value,
which nothing but the context can tell (ids and values are uniform random, so guessing succeeds 1 time in 90,000):

    line 372: 24802
    line 915: 11093
    ...
    What is line 372: 24802

Two styles of the same content. "compact" is what the model trained here reads (with the "words" tokenizer a line is
5 tokens: line, " 372:", " 248", "02", newline; the question ends with the same key token " 372:" and the value
follows it, exactly as in the line). "longeval" is LongEval's own wording for real LLMs (Llama-3 etc.):
a preamble, `line 372: REGISTER_CONTENT is <24802>` lines and a spelled-out question. eval.py picks the style from
the tokenizer.

Splits are decided by the content, not by the seed: a record belongs to train, val or test by a hash of its lines
(80/10/10), and each generator skips records of the other splits, so no test record can ever appear in training.

    OMP_NUM_THREADS=1 python experiments/retrieval.py --export_to=ckpt/retrieval/ckpt.pt   # the shipped model (27 min)
    python experiments/retrieval.py --show=1 --lines=5                                     # print an example
"""
import hashlib
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

ID_RANGE = (100, 1000)          # 3-digit line ids: one key token each (" 372:"), distinct within a record
VALUE_RANGE = (10000, 100000)   # 5-digit values: two tokens (" 248", "02"), as Llama-3 splits digits in runs of 3
SPLITS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}   # hash bucket (mod 10) -> split
STYLES = ("compact", "longeval")
LONGEVAL_PREAMBLE = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains a "
    "'<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its corresponding "
    "<REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the corresponding <REGISTER_CONTENT> of "
    "a certain line index. Now the record start:\n\n")


# -----------------------------------------------------------------------------
# records and splits

def split_of(lines):
    """The split a record belongs to, from a hash of its content (stable across Python versions and machines)."""
    h = hashlib.sha1(",".join(f"{i}:{v}" for i, v in lines).encode()).digest()
    bucket = int.from_bytes(h[:4], "little") % 10
    return next(name for name, b in SPLITS.items() if bucket in b)


def make_record(rng, n_lines, split):
    """n_lines (id, value) pairs of the given split: ids distinct; values uniform, except that their first chunk (the
    leading 3 digits, one token) is distinct within a record. Why: a 2-layer model copies the value chunk by chunk,
    finding the second chunk by the first; with repeated first chunks (~20% of questions at 200 lines) it can only
    guess between the lines that share it, which capped our dense model near 90% (measured). LongEval allows repeats."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use one of {list(SPLITS)}")
    if not 1 <= n_lines <= ID_RANGE[1] - ID_RANGE[0]:
        raise ValueError(f"n_lines={n_lines} must be in 1..{ID_RANGE[1] - ID_RANGE[0]} (the number of distinct ids)")
    while True:  # rejection: ~1.25 draws for train, ~10 for val/test; cheap
        ids = rng.sample(range(*ID_RANGE), n_lines)
        heads = rng.sample(range(VALUE_RANGE[0] // 100, VALUE_RANGE[1] // 100), n_lines)    # first chunks, distinct
        lines = [(i, 100 * h + rng.randrange(100)) for i, h in zip(ids, heads)]
        if split_of(lines) == split:
            return lines


def render_line(line_id, value, style="compact"):
    if style == "compact":
        return f"line {line_id}: {value}\n"
    return f"line {line_id}: REGISTER_CONTENT is <{value}>\n"


def render_question(line_id, style="compact"):
    """The question; the answer follows it directly (compact: " 24802"; longeval: "24802>")."""
    if style == "compact":
        return f"What is line {line_id}:"
    return (f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {line_id}? I need the number."
            f"\nAnswer: The <REGISTER_CONTENT> in line {line_id} is <")


def example(n_lines, index, split="test", seed=0, style="compact"):
    """Example number `index` of a split at a line count: dict(prompt, answer, line_id, position, lines).

    Deterministic in (seed, split, n_lines, index); the asked line is uniform over the record, its position kept
    so accuracy can be broken down by where the line sits.
    """
    if style not in STYLES:
        raise ValueError(f"style {style!r} is unknown; use one of {STYLES}")
    rng = random.Random(f"{seed}/{split}/{n_lines}/{index}")
    lines = make_record(rng, n_lines, split)
    pos = rng.randrange(n_lines)
    body = "".join(render_line(i, v, style) for i, v in lines)
    # compact records open with a newline, as every record does in the training text (and it gives position 0 a
    # fixed token, the model's attention sink)
    head = "\n" if style == "compact" else LONGEVAL_PREAMBLE
    return {"prompt": head + body + render_question(lines[pos][0], style), "answer": str(lines[pos][1]),
            "line_id": lines[pos][0], "position": pos, "lines": lines}


def examples(n_lines, n, split="test", seed=0, style="compact"):
    return [example(n_lines, i, split, seed, style) for i in range(n)]


# -----------------------------------------------------------------------------
# scoring: exact match of the retrieved number

NUMBER = re.compile(r"\d+")


def extract_answer(text):
    """The first run of digits in the model's output, or None."""
    m = NUMBER.search(text)
    return m.group() if m else None


def score(output, answer):
    """True iff the first number in `output` is exactly `answer` (no prefix, no extra digits, no partial credit)."""
    return extract_answer(output) == str(answer)



# -----------------------------------------------------------------------------
# training: whole records, loss on the answers only, an attention warm start, a curriculum over line counts
#
# Why not train.py's next-token loss on random windows of a text file? Every line id and value is random, so ~95% of
# the tokens carry an irreducible loss whose gradient noise drowns the few answer tokens: 5M tokens of that left a
# 1.4M-parameter model at 0% retrieval. With the loss on the answers only (what instruction tuning does) the model
# soon learns to copy *a* value, but finding the line by its key -- an induction-style circuit (a previous-token head
# feeding a matching head) -- still sat on a plateau for thousands of steps on this CPU. The warm start removes the
# plateau: while the curriculum is still growing, an auxiliary loss tells one head where the answer is (the asked
# line's value token); the model must still build the features that let that head find it, and everything after
# the curriculum reaches full length is trained by the answer loss alone. The model, optimizer and checkpoint
# format are train.py's own.

@dataclass
class RetrievalTrainConfig:
    out_dir: str = "out-retrieval"
    export_to: str = ""             # also write a slim fp16 checkpoint here (what ships in ckpt/retrieval/)
    init_from: str = ""             # start from this checkpoint's weights at the full line count (a second stage)
    # curriculum: records have n ~ U[cap/4, cap] lines; the cap starts at lines_start and grows by grow_factor
    # whenever the answer loss of the last 50 steps is below grow_below, up to `lines`
    lines: int = 200
    lines_start: int = 8
    grow_below: float = 0.3
    grow_factor: float = 1.25
    # attention warm start: until the cap reaches `lines`, an auxiliary loss points head 0 of the last layer at
    # the line token that holds each answer (see warm_start_loss); after that only the answer loss trains
    warm_weight: float = 1.0
    questions: int = 8              # questions at the end of each record: n_lines of them, at least this many ...
    max_questions: int = 48         # ... and at most this many (each answer = 3 scored tokens)
    batch_tokens: int = 3072        # tokens per step; batch size = batch_tokens // record length
    max_iters: int = 6000
    eval_interval: int = 500
    eval_n: int = 50                # val examples per line count for the accuracy printout
    learning_rate: float = 1e-3     # constant after warmup, then a linear cooldown to min_lr
    min_lr: float = 1e-4
    warmup_iters: int = 100
    cooldown: float = 0.2           # fraction of max_iters
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    # the model (ModelConfig fields): head_dim 64 so ZipCache's ratio and the Triton kernel shape are the real ones
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int = 1
    head_dim: int = 64
    tie_embeddings: bool = True     # copying a value = reading its embedding back out
    emb_std: float = 0.1            # init std of the tied embedding (0.02 makes the first logits too flat to copy)
    max_seq_len: int = 1536


def lr_at(step, cfg):
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    start = cfg.max_iters * (1 - cfg.cooldown)
    frac = min(1.0, max(0.0, (step - start) / max(1, cfg.max_iters - start)))
    return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)


def record_batch(tok, rng, n_lines, n_records, questions, split="train"):
    """n_records records of n_lines lines + `questions` questions, equal lengths -> (x, y, mask, where) [B, T]:
    mask marks the answer tokens of y (" 248", "02", newline); where[b, t] = the position in x of the line token
    that y[b, t] copies (the asked line's own value chunk), -1 elsewhere (for the attention warm start)."""
    texts, where, mask = [], [], []
    for _ in range(n_records):
        lines = make_record(rng, n_lines, split)
        asked = [rng.randrange(n_lines) for _ in range(questions)]
        texts.append("\n" + "".join(render_line(i, v) for i, v in lines) +
                     "".join(f"{render_question(lines[j][0])} {lines[j][1]}\n" for j in asked))
        # compact layout: "\n", 5 tokens a line (line, " 372:", v1, v2, \n), 7 a question (What, is, line, " 372:",
        # v1, v2, \n). In x, the question's key predicts v1 (line token 2), v1 predicts v2 (3), v2 the newline.
        w, mk = [-1] * (5 * n_lines + 7 * questions), [False] * (5 * n_lines + 7 * questions)
        for k, j in enumerate(asked):
            key = 1 + 5 * n_lines + 7 * k + 3
            w[key], w[key + 1] = 1 + 5 * j + 2, 1 + 5 * j + 3
            mk[key] = mk[key + 1] = mk[key + 2] = True  # the newline too, else greedy decoding runs on into digits
        where.append(w)
        mask.append(mk)
    ids = torch.tensor([tok.encode(t) for t in texts])                         # [B, T+1] (all the same length)
    if ids.shape[1] != 1 + 5 * n_lines + 7 * questions:
        raise ValueError(f"record_batch needs the words tokenizer with keys (one token per line key), got {tok}")
    return ids[:, :-1], ids[:, 1:], torch.tensor(mask), torch.tensor(where)


class AttentionTap:
    """Training-only stand-in for a cache (model.py hands every layer's q, k, v to `cache.attend`): explicit,
    differentiable causal attention in the tapped layers, whose probabilities it keeps; SDPA elsewhere."""
    pos = 0

    def __init__(self, layers):
        self.layers, self.p = set(layers), {}

    def attend(self, layer, q, k, v):
        if layer not in self.layers:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        g, T = q.shape[1] // k.shape[1], q.shape[2]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5                       # [B, H, T, T]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        self.p[layer] = s.softmax(-1)
        return self.p[layer] @ v


def warm_start_loss(tap, where, last):
    """Auxiliary loss of the attention warm start: -log of the attention that head 0 of the last layer pays, from
    each answer position, to the asked line's token holding the answer (the retrieval head's known target)."""
    b, t = (where >= 0).nonzero(as_tuple=True)
    return -tap.p[last][b, 0, t, where[b, t]].clamp_min(1e-9).log().mean()


@torch.no_grad()
def dense_accuracy(model, tok, n_lines, n, split="val", seed=0, batch=50):
    """Greedy exact-match accuracy (%) with no cache at all: the model's own ceiling."""
    model.eval()
    device = next(model.parameters()).device
    exs, hits = examples(n_lines, n, split, seed), 0
    for b in range(0, n, batch):
        chunk = exs[b:b + batch]
        x = torch.tensor([tok.encode(e["prompt"]) for e in chunk], device=device)
        for _ in range(3):
            x = torch.cat([x, model(x, last_only=True)[0][:, -1:].argmax(-1)], 1)
        hits += sum(score(tok.decode(r[-3:]), e["answer"]) for r, e in zip(x.tolist(), chunk))
    model.train()
    return 100.0 * hits / n


def train(cfg, log=print):
    import train as T  # train.py's optimizer
    import weights
    from model import ModelConfig, Transformer
    from tokenizer import load_tokenizer

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} already exists; choose another --out_dir (runs are not resumed)")
    tok = load_tokenizer("words")
    mconf = ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                        head_dim=cfg.head_dim, vocab_size=tok.n_vocab, tie_embeddings=cfg.tie_embeddings,
                        max_seq_len=cfg.max_seq_len)
    if 1 + 5 * cfg.lines + 7 * cfg.max_questions > cfg.max_seq_len:
        raise ValueError(f"--lines={cfg.lines} records do not fit max_seq_len={cfg.max_seq_len}; raise it")
    torch.manual_seed(cfg.seed)
    model = Transformer(mconf)
    torch.nn.init.normal_(model.tok_embeddings.weight, std=cfg.emb_std)
    cap = cfg.lines_start
    if cfg.init_from:  # second stage: the weights of a finished run, fresh optimizer, no curriculum
        model.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=True)["model"])
        cap = cfg.lines
    opt = T.make_optimizer(model, cfg, torch.device("cpu"))
    rng = random.Random(f"retrieval-train/{cfg.seed}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {asdict(mconf)}")
    t0 = time.perf_counter()
    history, aux_hist, acc = [], [], {}
    for step in range(1, cfg.max_iters + 1):
        lr = lr_at(step - 1, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        n = rng.randint(max(2, cap // 4), cap)
        k = min(max(n, cfg.questions), cfg.max_questions)
        x, y, mask, where = record_batch(tok, rng, n, max(1, cfg.batch_tokens // (1 + 5 * n + 7 * k)), k)
        warm = cap < cfg.lines and cfg.warm_weight > 0
        tap = AttentionTap((cfg.n_layers - 1,)) if warm else None
        logits, _ = model(x, cache=tap)                                         # [B, T, V]
        loss = F.cross_entropy(logits[mask], y[mask])
        history.append(loss.item())
        if warm:
            aux = warm_start_loss(tap, where, cfg.n_layers - 1)
            aux_hist.append(aux.item())
            loss = loss + cfg.warm_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 50 == 0:
            recent = sum(history[-50:]) / 50
            aux_msg = f", warm-start loss {sum(aux_hist[-50:]) / 50:.3f}" if warm else ""
            log(f"iter {step}: answer loss {recent:.4f}{aux_msg}, lines <= {cap}, lr {lr:.2e}, "
                f"{time.perf_counter() - t0:.0f}s")
            if recent < cfg.grow_below and cap < cfg.lines:
                cap = min(cfg.lines, math.ceil(cap * cfg.grow_factor))
                log(f"curriculum: lines <= {cap}" + (" (warm start off)" if cap == cfg.lines else ""))
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            counts = sorted({c for c in (10, 50, 100, 150, 200, cfg.lines) if c <= cfg.lines})
            acc = {c: dense_accuracy(model, tok, c, cfg.eval_n) for c in counts}
            log(f"step {step}: val accuracy " + ", ".join(f"{c} lines {a:.1f}%" for c, a in acc.items()))
            weights.save_checkpoint(ckpt_path, model, tok, step, train_config=asdict(cfg), val_accuracy=acc,
                                    elapsed_s=time.perf_counter() - t0, lines_cap=cap, optimizer=opt.state_dict())
    elapsed = time.perf_counter() - t0
    log(f"done: {cfg.max_iters} steps in {elapsed:.0f}s")
    if cfg.export_to:
        size = weights.export_slim(torch.load(ckpt_path, map_location="cpu", weights_only=True), cfg.export_to)
        log(f"exported {cfg.export_to} ({size / 2**20:.1f} MB, fp16, no optimizer state)")
    return acc, elapsed


def main(argv=None):
    from experiment_flags import BOOLEAN, NONNEGATIVE, POSITIVE, Parser, number
    p = Parser(prog="retrieval.py", description="train the line-retrieval model (see RetrievalTrainConfig for every "
               "--flag), or print examples with --show N")
    p.add_argument("--show", type=NONNEGATIVE, default=0, help="print N test prompts of --lines lines and exit")
    # sizes and counts must be >= 1, every other number finite and >= 0 (seed aside), booleans true or false
    positive = ("lines", "lines_start", "questions", "max_questions", "batch_tokens", "eval_interval", "eval_n", "dim",
                "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len")
    kinds = {bool: BOOLEAN, str: str, float: number(float, lambda x: 0 <= x < float("inf"), "finite and >= 0")}
    for f in fields(RetrievalTrainConfig):
        kind = type(f.default)
        tp = int if f.name == "seed" else POSITIVE if f.name in positive else NONNEGATIVE if kind is int else kinds[kind]
        p.add_argument(f"--{f.name}", type=tp, default=f.default)
    a = vars(p.parse_args(argv))
    if a.pop("show"):
        for e in examples(a["lines"], 1):
            print(e["prompt"] + " " + e["answer"])
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    train(RetrievalTrainConfig(**a))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"retrieval.py: error: {e}")
