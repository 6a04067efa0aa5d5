"""Bad input at every command-line entry point: one line naming the problem and the fix, a non-zero exit, and nothing
written or changed on disk (file hashes of the run's folders and of the repo's ckpt/ and results/ before and after).

Most rows call the scripts' main(argv) in-process (fast); one runs train.py as a user does, to check that no traceback
reaches the terminal.
"""
import hashlib
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

import bench_cache
import eval as E
import generate as G
import model as M
import retrieval
import train
import weights
from generate import make_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIEVAL = os.path.join(ROOT, "ckpt", "retrieval", "ckpt.pt")
HAS_CUDA = torch.cuda.is_available()


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every bad input the rows need, built once: tiny and NaN checkpoints, files that are not checkpoints, a corpus,
    and a finished tiny training run to resume."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = M.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=257, max_seq_len=160)
    sd = M.Transformer(cfg).state_dict()
    torch.save({"model": sd, "config": vars(cfg), "tokenizer": {"kind": "bytes"}}, d / "tiny.pt")
    sd = {k: v.clone() for k, v in sd.items()}
    sd["output.weight"].fill_(float("nan"))
    torch.save({"model": sd, "config": vars(cfg), "tokenizer": {"kind": "bytes"}}, d / "nan.pt")
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.uint8).tolist()))
    (d / "text.pt").write_text("hello, not a checkpoint\n")
    with open(d / "pickle.pt", "wb") as f:
        pickle.dump({"model": {}, "config": {}}, f)
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text('{"hidden_size": 64,')
    (d / "afile").write_text("not a directory\n")
    (d / "corpus").mkdir()
    (d / "corpus" / "a.py").write_text("".join(f"def f{i}(x):\n    return x * {i % 7}\n\n" for i in range(600)))
    run = ["tiny", f"--data={d / 'corpus'}", f"--data_dir={d / 'dc'}", f"--out_dir={d / 'run'}"]
    train.main(run + ["--max_iters=10", "--eval_interval=5", "--log_interval=5"], log=quiet)
    return {"dir": str(d), "tiny": str(d / "tiny.pt"), "nan": str(d / "nan.pt"), "run": run,
            **{k: str(d / f"{k}.pt") for k in ("empty", "random", "text", "pickle")},
            "hf": str(d / "hf"), "afile": str(d / "afile"), "corpus": str(d / "corpus")}


def snapshot(*dirs):
    """{path: sha256} of every file under dirs (training logs excluded: a stopped run may append its last lines)."""
    out = {}
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in files:
                if name.endswith(".jsonl"):
                    continue
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_cli(fn, argv, capsys):
    """What a user sees: the scripts' __main__ blocks turn ValueError/FileNotFoundError into one line and exit 1
    or 2; argparse exits with its message. Returns (exit code, message)."""
    try:
        fn(argv)
    except (ValueError, FileNotFoundError) as e:
        return 1, str(e)
    except SystemExit as e:
        if isinstance(e.code, str):
            return 1, e.code
        return e.code, capsys.readouterr().err.strip().splitlines()[-1]
    return 0, ""


def _generate(argv):
    return G.main(["--quiet", "--max_new_tokens", "4", *argv])


def _train(argv):
    return train.main(argv, log=quiet)


def _ragged(p):
    model, _ = weights.load_model(p["tiny"])
    G.generate(model, [[1, 2, 3], [1, 2]], make_cache("h2o", model.config), 2)


def _fp16_range(p, name):
    # finite in fp32, beyond fp16: stored as Inf. The check names the layer that produced it (layer 1 here).
    cfg = M.ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    c = make_cache(name, cfg)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 16, 32, generator=g) for h in (4, 2, 2))
    c.attend(0, q, k, v)
    k = k.clone()
    k[..., 3] = 7e4
    c.attend(1, q, k, v)


def _nan_fp32(p):
    # NaN in a float32 run comes from the model (e.g. its weights), not from fp16 overflow: the hint says so
    cfg = M.ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    q, k, v = (torch.randn(1, h, 8, 32) for h in (4, 2, 2))
    k[0, 0, 3, 5] = float("nan")
    make_cache("zipcache", cfg).attend(0, q, k, v)


def _empty(p, name, B, T):
    cfg = M.ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
    q, k, v = (torch.randn(B, h, T, 32) for h in (4, 2, 2))
    make_cache(name, cfg).attend(0, q, k, v)


def _save_nan(p):
    # the save path itself refuses non-finite weights, whoever calls it
    path = os.path.join(p["dir"], "run", "ckpt.pt")
    weights.atomic_save({"model": {"w": torch.tensor([1.0, float("nan")])}}, path)


def _save_disk_full(p, monkeypatch):
    def full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    weights.atomic_save({"model": {"w": torch.ones(2)}}, os.path.join(p["dir"], "run", "ckpt.pt"))


CALLS = {"ragged": _ragged, "nan_fp32": _nan_fp32, "save_nan": _save_nan, "save_disk_full": _save_disk_full,
         **{f"fp16_{n}": (lambda n: lambda p: _fp16_range(p, n))(n) for n in ("dense", "zipcache", "kivi", "mikv")},
         **{f"empty_{n}_{B}x{T}": (lambda n, B, T: lambda p: _empty(p, n, B, T))(n, B, T)
            for n in G.CACHES for B, T in ((1, 0), (0, 4))}}

CUDA_SKIP = pytest.mark.skipif(HAS_CUDA, reason="checks the message on machines without CUDA")

ROWS = [
    # --- data lost or silently wrong
    ("train", ["{run}", "--resume", "--max_iters=30", "--learning_rate=3e3"], "the run diverged and stopped"),
    ("call", "save_nan", "contains NaN or Inf values; not saved"),
    ("call", "save_disk_full", "No space left on device"),
    *[("call", f"fp16_{n}", "layer 1 keys reach 7e+04, beyond the 65504") for n in ("dense", "zipcache", "kivi",
                                                                                        "mikv")],
    ("call", "nan_fp32", "layer 0 keys contains NaN or Inf values; quantizing it would poison the cache (check the "
                         "checkpoint's weights for NaN/Inf)"),
    ("generate", ["--temperature", "-1"], "--temperature: -1 must be a finite number >= 0"),
    ("generate", ["--temperature", "nan"], "--temperature: nan must be a finite number >= 0"),
    ("generate", ["--checkpoint", "{nan}"], "NaN or Inf logits"),
    ("generate", ["--checkpoint", "{nan}", "--temperature", "0"], "NaN or Inf logits"),
    ("generate", ["--checkpoint", RETRIEVAL, "--tokenizer", "bytes"], "--tokenizer bytes has 257 tokens but the model"),
    ("call", "ragged", "prompts of unequal lengths [2, 3]"),
    # --- crashes that were tracebacks
    ("generate", ["--checkpoint", "{tiny}", "--cache", "h2o", "--prompt", "abc"], "h2o keeps floor"),
    ("generate", ["--checkpoint", "{tiny}", "--cache", "h2o", "--keep_ratio", "0"], "keep_ratio=0 keeps no tokens"),
    ("generate", ["--checkpoint", "{tiny}", "--cache", "kivi", "--group", "0"], "KIVI group=0"),
    ("generate", ["--checkpoint", "{tiny}", "--prompt", "@{dir}"], "is a directory"),
    ("generate", ["--checkpoint", "{tiny}", "--prompt", "@{dir}/missing.txt"], "no such file"),
    ("train", ["{run_fresh}", "--batch_size=0"], "--batch_size=0 must be at least 1"),
    ("train", ["{run_fresh}", "--eval_interval=0"], "--eval_interval=0 must be at least 1"),
    ("train", ["{run_fresh}", "--log_interval=0"], "--log_interval=0 must be at least 1"),
    pytest.param("train", ["{run_fresh}", "--device=cuda"], "no CUDA GPU is visible", marks=CUDA_SKIP),
    ("train", ["tiny", "--out_dir={afile}"], "is a file, not a directory"),
    ("bench", ["--tokens", "0"], "--tokens: 0 must be at least 1"),
    ("bench", ["--heads", "-8"], "--heads: -8 must be at least 1"),
    ("bench", ["--steps", "0"], "--steps: 0 must be at least 1"),
    ("bench", ["--threads", "0"], "--threads: 0 must be at least 1"),
    ("bench", ["--head_dims", "6"], "divisible by 4"),
    pytest.param("bench", ["--device", "cuda"], "no CUDA GPU is visible", marks=CUDA_SKIP),
    *[("call", f"empty_{n}_{B}x{T}", "a prompt must hold at least one token") for n in G.CACHES
      for B, T in ((1, 0), (0, 4))],
    # --- unclear or silently accepted
    ("generate", ["--checkpoint", "{empty}"], "is empty (0 bytes)"),
    ("generate", ["--checkpoint", "{random}"], "is not a PyTorch checkpoint"),
    ("generate", ["--checkpoint", "{text}"], "is not a PyTorch checkpoint"),
    ("generate", ["--checkpoint", "{pickle}"], "a plain pickle"),
    ("generate", ["--checkpoint", "{hf}"], "config.json is not valid JSON"),
    ("generate", ["--checkpoint", "{tiny}", "--cache", "zipcache", "--bits", "16", "--low_bits", "4"],
     "conflicts with low_bits=4"),
    ("generate", ["--checkpoint", "{tiny}", "--cache", "mikv", "--bits", "4", "--high_bits", "8"],
     "conflicts with high_bits=8"),
    ("generate", ["--checkpoint", "{tiny}", "--cache", "zipcache", "--probe_ratio", "0"], "probe_ratio=0"),
    ("generate", ["--top_p", "0"], "--top_p: 0 must be in (0, 1]"),
    ("generate", ["--top_p", "1.5"], "--top_p: 1.5 must be in (0, 1]"),
    ("generate", ["--top_p", "nan"], "--top_p: nan must be in (0, 1]"),
    ("generate", ["--max_new_tokens", "0"], "--max_new_tokens: 0 must be at least 1"),
    ("generate", ["--top_k", "-1"], "--top_k: -1 must be >= 0"),
    ("generate", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
    pytest.param("generate", ["--device", "cuda"], "no CUDA GPU is visible", marks=CUDA_SKIP),
    ("train", ["{run_fresh}", "--val_frac=0"], "--val_frac=0.0 must be a fraction strictly between 0 and 1"),
    ("train", ["{run_fresh}", "--val_frac=1.5"], "--val_frac=1.5 must be a fraction strictly between 0 and 1"),
    ("train", ["{run_fresh}", "--max_iters=-1"], "--max_iters=-1 must be >= 0"),
    ("retrieval", ["--batch_tokens", "0"], "--batch_tokens=0 must be at least 1"),
    ("retrieval", ["--learning_rate", "nan"], "--learning_rate=nan must be finite and >= 0"),
    ("retrieval", ["--max_iters", "-1"], "--max_iters=-1 must be finite and >= 0"),
    ("eval", ["--lines", "abc"], "--lines='abc'"),
    ("eval", ["--n", "0"], "--n and --batch_size must be positive"),
    ("eval", ["--ppl_windows", "0"], "windows and prefill must be at least 1"),
    ("eval", ["--tokenizer", "bytes", "--groups", "main"], "--tokenizer bytes has 257 tokens but the model"),
    pytest.param("eval", ["--device", "cuda"], "no CUDA GPU is visible", marks=CUDA_SKIP),
]


def _expand(argv, p, tmp_path):
    fresh = ["tiny", f"--data={p['corpus']}", f"--data_dir={tmp_path / 'dc'}", f"--out_dir={tmp_path / 'out'}"]
    out = []
    for a in argv:
        if a == "{run}":
            out += p["run"]
        elif a == "{run_fresh}":
            out += fresh
        else:
            out.append(a.format(**p))
    return out


def _row_id(row):
    kind, argv, _ = getattr(row, "values", row)
    words = [argv] if isinstance(argv, str) else [os.path.basename(a) for a in argv if not a.startswith("{run")]
    return f"{kind}:{' '.join(words)}"[:60]


@pytest.mark.parametrize("kind,argv,msg", ROWS, ids=[_row_id(r) for r in ROWS])
def test_bad_input(kind, argv, msg, paths, tmp_path, capsys, monkeypatch):
    dirs = [paths["dir"], str(tmp_path), os.path.join(ROOT, "ckpt"), os.path.join(ROOT, "results")]
    before = snapshot(*dirs)
    if kind == "call":
        code, text = run_cli(lambda _: CALLS[argv](paths, *([monkeypatch] if argv == "save_disk_full" else [])),
                             None, capsys)
    else:
        fn = {"generate": _generate, "train": _train, "eval": E.main, "bench": bench_cache.main,
              "retrieval": retrieval.main}[kind]
        code, text = run_cli(fn, _expand(argv, paths, tmp_path), capsys)
    assert code != 0, f"accepted: {argv}"
    assert msg in text, text
    assert "\n" not in text.strip(), f"not one line: {text!r}"
    assert snapshot(*dirs) == before, "a failed command changed files on disk"
    assert not [f for f in os.listdir(os.path.join(paths["dir"], "run")) if ".tmp-" in f]


def test_resume_diverged_keeps_the_checkpoint_loadable(paths):
    # after the diverging resume above (or here, if run alone) the checkpoint still holds finite weights
    ck = torch.load(os.path.join(paths["dir"], "run", "ckpt.pt"), map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert ck["step"] == 10 and math.isfinite(ck["val_loss"])


def test_quick_eval_writes_elsewhere():
    assert E.get_args(["--quick"]).out_dir == os.path.join(ROOT, "results", "quick")
    assert E.get_args([]).out_dir == os.path.join(ROOT, "results")


def test_non_utf8_prompt_file_gets_a_note(paths, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_bytes(b"def f(x):\n    return '\xff'\n")
    G.main(["--quiet", "--checkpoint", paths["tiny"], "--prompt", f"@{f}", "--max_new_tokens", "2"])
    assert "is not valid UTF-8" in capsys.readouterr().err


def test_no_traceback_from_the_command_line():
    # generate.py's __main__ path is covered in test_generate.py; train.py prints its own way
    r = subprocess.run([sys.executable, "train.py", "--batch_size=0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("script", ["eval.py", "bench_train.py"])
def test_experiment_scripts_run_from_anywhere(script, tmp_path):
    # experiments/*.py find the flat core one folder up (their sys.path header) and each other as siblings, whatever
    # the working directory: eval.py imports retrieval.py beside it and data.py, weights.py, ... above it
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and r.stdout.startswith("usage: " + script), r.stderr
