"""train.py and data.py on CPU: learning, bit-exact resume after SIGKILL, 2-process torchrun, bad inputs, export.

All runs use the `tiny` preset (0.13M parameters, 32-token blocks): each training run takes a second or two.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data as datalib
import train
from tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~25 KB of simple, learnable Python-like text in two files."""
    d = tmp_path_factory.mktemp("corpus")
    for k in range(2):
        lines = [f"def f{i}(x):\n    return x * {i % 7} + {k}\n\n" for i in range(400)]
        (d / f"part{k}.py").write_text("".join(lines))
    return str(d)


def tiny(tmp_path, corpus, *extra):
    return ["tiny", f"--data={corpus}", f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'dc'}", *extra]


def quiet(*a, **k):
    pass


def test_loss_goes_down(tmp_path, corpus):
    r = train.main(tiny(tmp_path, corpus, "--max_iters=40", "--eval_interval=40"), log=quiet)
    first, last = r["evals"][0], r["evals"][40]
    # fresh init predicts ~uniformly over the 257 byte tokens: loss ~ ln(257) = 5.55 (std 0.02 weights -> tiny logits)
    assert abs(first["val"] - math.log(257)) < 0.05
    # 40 steps on this repetitive text get well below it (typically ~2.5); 1.5 nats is a wide margin
    assert last["val"] < first["val"] - 1.5 and last["train"] < first["train"] - 1.5
    assert r["step"] == 40 and os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_resume_after_sigkill_is_bit_exact(tmp_path, corpus):
    """Kill a run (SIGKILL, no clean-up) right after it saves; resume; the next losses and the final weights equal an
    uninterrupted run's exactly (same batches from the restored sampler RNG, same AdamW state, same schedule)."""
    common = ["--eval_interval=5", "--log_interval=1", "--lr_decay_iters=400"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # same threads -> same float reductions
    killed = tmp_path / "killed"
    killed.mkdir()
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *tiny(killed, corpus, "--max_iters=400",
                                                                                 *common)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    for line in p.stdout:
        if line.startswith("saved"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step = torch.load(killed / "out" / "ckpt.pt", weights_only=True)["step"]  # the last complete checkpoint
    assert step % 5 == 0 and step > 0
    resumed = train.main(["--resume", f"--out_dir={killed / 'out'}", f"--max_iters={step + 3}"], log=quiet)

    ref = tmp_path / "ref"
    ref.mkdir()
    full = train.main(tiny(ref, corpus, f"--max_iters={step + 3}", *common), log=quiet)
    assert resumed["step"] == full["step"] == step + 3
    for s in range(step + 1, step + 4):
        assert resumed["losses"][s] == full["losses"][s]  # exact float equality, not a tolerance
    a = torch.load(killed / "out" / "ckpt.pt", weights_only=True)
    b = torch.load(ref / "out" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == step + 3
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    assert torch.equal(a["rng"]["sampler"][0], b["rng"]["sampler"][0])


def test_torchrun_two_processes_gloo(tmp_path, corpus):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), *tiny(tmp_path, corpus, "--max_iters=6", "--eval_interval=3",
                                                 "--log_interval=3")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es)" in r.stdout and r.stdout.count("saved") == 2  # rank 0 alone logs and saves
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 6 and math.isfinite(ck["val_loss"]) and ck["val_loss"] < math.log(257)
    s0, s1 = ck["rng"]["sampler"]  # each rank's own batch stream, both saved for resume
    assert not torch.equal(s0, s1)


def test_export_slim_checkpoint(tmp_path, corpus):
    from weights import load_model
    out = tmp_path / "ship" / "ckpt.pt"
    train.main(tiny(tmp_path, corpus, "--max_iters=5", f"--export_to={out}"), log=quiet)
    slim = torch.load(out, weights_only=True)
    assert "optimizer" not in slim and "rng" not in slim and slim["tokenizer"] == {"kind": "bytes"}
    assert all(v.dtype == torch.float16 for v in slim["model"].values())
    full, _ = load_model(str(tmp_path / "out" / "ckpt.pt"))
    half, meta = load_model(str(out), dtype=torch.float32)
    x = torch.randint(0, 257, (2, 16))
    # fp16 rounding of the weights (rel. 2^-11) moves logits of this tiny model by ~1e-3
    torch.testing.assert_close(half(x)[0], full(x)[0], atol=2e-2, rtol=0)
    assert meta["tokenizer"] == {"kind": "bytes"} and meta["step"] == 5


# --- data.py

def test_non_utf8_bytes_become_replacement_chars(tmp_path):
    raw = b"ok \xff\xfe bad \xc3( end\n"
    (tmp_path / "a.txt").write_bytes(raw)
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")  # NUL bytes: skipped as binary
    notes = []
    meta = datalib.prepare(str(tmp_path), load_tokenizer("bytes"), str(tmp_path / "dc"), 0, 0.0, notes.append)
    ids = np.fromfile(os.path.join(meta["dir"], "train.bin"), dtype=meta["dtype"]).tolist()
    # reference: Python's own U+FFFD replacement, as UTF-8 bytes, then the end-of-text token
    assert ids == list(raw.decode("utf-8", errors="replace").encode()) + [256]
    assert any("not UTF-8" in n for n in notes) and any("binary" in n for n in notes)


def test_data_cache_reused_and_invalidated(tmp_path, corpus):
    tok, logs = load_tokenizer("bytes"), []
    m1 = datalib.prepare(corpus, tok, str(tmp_path), 0.01, 0.1, logs.append)
    m2 = datalib.prepare(corpus, tok, str(tmp_path), 0.01, 0.1, logs.append)
    assert m1 == m2 and "reusing" in logs[-1]
    # the cap: 0.01 MB = 10485 bytes of text, plus one end-of-text token per document read
    assert m1["train_tokens"] + m1["val_tokens"] == int(0.01 * 2**20) + m1["files"]
    m3 = datalib.prepare(corpus, tok, str(tmp_path), 0.02, 0.1, logs.append)
    assert m3["dir"] != m1["dir"] and "reusing" not in logs[-1]


def test_cap_never_splits_a_character(tmp_path):
    (tmp_path / "u.txt").write_text("é" * 1000)  # 2 bytes each; a cap at an odd byte count cuts one in half
    docs, _ = datalib.read_corpus(str(tmp_path), ["u.txt"], 1001)
    assert docs == ["é" * 500]


# --- the command line

def test_overrides_are_typed():
    c = train.apply_overrides(train.TrainConfig(), ["tiny", "--max_iters=7", "--compile", "--learning_rate=1e-3",
                                                   "--n_kv_heads=none", '--rope_scaling={"factor": 8.0}'])
    assert (c.max_iters, c.compile, c.learning_rate, c.block_size) == (7, True, 1e-3, 32)
    assert c.model["n_kv_heads"] is None and c.model["rope_scaling"] == {"factor": 8.0} and c.model["dim"] == 64
    assert train.parse_value("g", "32", str | int) == 32 and train.parse_value("g", "token", str | int) == "token"


def test_lr_schedule():
    c = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.get_lr(0, c) == pytest.approx(1 / 11)             # linear warmup from lr/(warmup+1)
    assert train.get_lr(10, c) == pytest.approx(1.0)                # peak right after warmup
    assert train.get_lr(60, c) == pytest.approx(0.1 + 0.9 * 0.5)    # cosine midpoint
    assert train.get_lr(110, c) == pytest.approx(0.1) and train.get_lr(500, c) == pytest.approx(0.1)


@pytest.mark.parametrize("argv, msg", [
    (["--max_iter=5"], "unknown flag --max_iter; did you mean --max_iters"),
    (["--max_iters=1.5"], "not a valid int"),
    (["--compile=maybe"], "not a valid bool"),
    (["--block_size"], "needs a value"),
    (["huge"], "unknown preset"),
    (["--n_kv_heads=3"], "multiple of n_kv_heads"),
    (["--block_size=1024"], "exceeds max_seq_len"),
])
def test_bad_flags(tmp_path, argv, msg):
    with pytest.raises(ValueError, match=msg):
        train.main(argv + [f"--out_dir={tmp_path / 'o'}", f"--data_dir={tmp_path / 'dc'}"], log=quiet)
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "dc")  # failed before writing


def test_bad_corpora_and_resume(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        train.main(tiny(tmp_path, str(tmp_path / "empty")), log=quiet)
    with pytest.raises(ValueError, match="fewer than block_size"):
        (tmp_path / "short.txt").write_text("x = 1\n" * 20)
        train.main(tiny(tmp_path, str(tmp_path / "short.txt")), log=quiet)
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        train.main(["--resume", f"--out_dir={tmp_path / 'none'}"], log=quiet)
    assert not os.path.exists(tmp_path / "none")
    # an existing run is never overwritten by a fresh one, nor resumed with a different shape
    train.main(tiny(tmp_path, corpus, "--max_iters=2", "--eval_interval=2"), log=quiet)
    ck = tmp_path / "out" / "ckpt.pt"
    before = ck.read_bytes()
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        train.main(tiny(tmp_path, corpus), log=quiet)
    with pytest.raises(ValueError, match="shape comes from the checkpoint"):
        train.main(["--resume", f"--out_dir={tmp_path / 'out'}", "--dim=128"], log=quiet)
    assert ck.read_bytes() == before


def test_cli_error_is_one_line():
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--dimm=3"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: unknown flag --dimm; did you mean --dim?\n"


def test_bench_train_matches_parameters_and_times_both_models():
    # bench_train.py: the SwiGLU hidden size matches nanoGPT's non-embedding parameters within 0.5% for every shape
    # of the table, and one (tiny) timed run returns a ratio for each thread count and shape
    import bench_train as BT
    for _, dim, n_layers, n_heads, n_kv in BT.SHAPES:
        _, _, hidden, n_ours, n_ref = BT.matched_models(dim, n_layers, n_heads, n_kv)
        assert abs(n_ours / n_ref - 1) < 0.005 and hidden % 8 == 0
    threads = torch.get_num_threads()
    try:
        rows = BT.bench_training([1], 2, B=2, T=16, shapes=[("tiny", 64, 1, 2, 1)])
    finally:
        torch.set_num_threads(threads)                 # bench_training sets it; the rest of the session keeps its own
    assert len(rows) == 1 and rows[0][0] == 1 and rows[0][-1] > 0


@pytest.mark.parametrize("lr", [3e1, 3e3, 3e-3])
def test_diverging_resume_keeps_the_best(tmp_path, corpus, lr):
    """Resume a finished run at an absurd learning rate: 30 blows the loss up to ~1e3 with finite values, 3e3 to NaN.
    The checkpoint is never replaced by worse weights (byte-identical), a better one may replace it (3e-3 keeps
    learning), and the last message names exactly the step and val loss that ckpt.pt holds."""
    train.main(tiny(tmp_path, corpus, "--max_iters=10", "--eval_interval=5"), log=quiet)
    ck = tmp_path / "out" / "ckpt.pt"
    before, old = ck.read_bytes(), torch.load(ck, weights_only=True)
    logs = []
    argv = ["--resume", f"--out_dir={tmp_path / 'out'}", "--max_iters=20", f"--learning_rate={lr}"]
    try:
        train.main(argv, log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    except ValueError as e:
        assert "diverged" in str(e) and "\n" not in str(e)
        logs.append(str(e))
    now = torch.load(ck, weights_only=True)
    assert now["val_loss"] <= old["val_loss"] and now["best_val_loss"] == now["val_loss"]
    if now["step"] == old["step"]:
        assert ck.read_bytes() == before
    last = next(m for m in reversed(logs) if f"{ck}" in m)
    assert f"step {now['step']}" in last and f"val loss {now['val_loss']:.4f}" in last, last
    if lr == 3e3:
        assert now["step"] == 10 and "the run diverged" in last
    elif lr == 3e1:
        assert now["step"] == 10 and last.startswith("done at step 20") and logs[-2].startswith("kept")
    else:
        assert now["step"] == 20 and last.startswith("saved")
