"""Bad input at every command-line entry point: one line naming the problem and the fix, a non-zero exit, and nothing
written or changed on disk (file hashes of the run's folders and of the repo's ckpt/ and results/ before and after).

Most rows call the scripts' main(argv) in-process (fast); one runs train.py as a user does, to check that no traceback
reaches the terminal. The last tests interrupt writes: SIGKILL at random moments of `eval.py --merge` and of checkpoint
saves, and `ulimit -f` under a merge, each leaving the previous files whole.
"""
import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import bench_cache
import ablate_clla
import bench_model
import bench_train
import diagnose
import eval as E
import generate as G
import model as M
import paired
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


@pytest.fixture(scope="module")
def shards(paths):
    """Real-model shard files for --merge, made by eval.py itself on a tiny byte-level model: the two shards of one
    run, a shard of another run (--seed 1), and damaged or mismatched copies."""
    d = os.path.join(paths["dir"], "shards")
    cfg = M.ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=257, max_seq_len=512)
    torch.manual_seed(0)
    torch.save({"model": M.Transformer(cfg).state_dict(), "config": vars(cfg), "tokenizer": {"kind": "bytes"}},
               os.path.join(paths["dir"], "byte512.pt"))
    base = ["--checkpoint", os.path.join(paths["dir"], "byte512.pt"), "--quick", "--lengths", "400", "--n", "4",
            "--groups", "main", "--tasks", "passkey", "--batch_tokens", "800", "--out_dir", d]
    E.main(base + ["--shard", "0/2", "--name", "s0"])
    E.main(base + ["--shard", "1/2", "--name", "s1"])
    E.main(base + ["--shard", "1/2", "--seed", "1", "--name", "other"])
    j = lambda name: os.path.join(d, name + ".json")     # noqa: E731
    shutil.copy(j("s1"), j("s1copy"))
    with open(j("s0")) as f:
        text = f.read()
    with open(j("broken"), "w") as f:
        f.write(text[:len(text) // 2])
    with open(j("list"), "w") as f:
        f.write("[1, 2]")
    run = json.loads(text)
    run["rows"][1]["opts"] = {"bits": 3}
    with open(j("s0opts"), "w") as f:
        json.dump(run, f)
    return {f"sh_{k}": j(k) for k in ("s0", "s1", "other", "s1copy", "broken", "list", "s0opts")}


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_gguf(path, drop=(), **meta):
    """A tiny llama GGUF (test_weights' random Q8_0 weights, 300 tokens) with a byte-level tokenizer and a ChatML
    template. meta: {key with dots as __: (GGUFWriter method, value)} replaces or adds a field; drop leaves keys out."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter
    from test_weights import CFG, finish_gguf, random_llama
    from tokenizer import bytes_to_unicode
    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [b2u[b] for b in range(256)]
    tokens += [f"<pad{i}>" for i in range(CFG.vocab_size - len(tokens))]
    fields = {
        "llama.block_count": ("add_uint32", CFG.n_layers), "llama.context_length": ("add_uint32", CFG.max_seq_len),
        "llama.embedding_length": ("add_uint32", CFG.dim), "llama.feed_forward_length": ("add_uint32", CFG.hidden_dim),
        "llama.attention.head_count": ("add_uint32", CFG.n_heads),
        "llama.attention.head_count_kv": ("add_uint32", CFG.n_kv_heads),
        "llama.rope.freq_base": ("add_float32", CFG.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": ("add_float32", CFG.norm_eps),
        "tokenizer.ggml.model": ("add_string", "gpt2"), "tokenizer.ggml.pre": ("add_string", "gpt2"),
        "tokenizer.ggml.tokens": ("add_array", tokens),
        "tokenizer.ggml.token_type": ("add_array", [3] * 3 + [1] * 256 + [3] * (len(tokens) - 259)),
        "tokenizer.ggml.bos_token_id": ("add_uint32", 1), "tokenizer.ggml.eos_token_id": ("add_uint32", 2),
        "tokenizer.chat_template": ("add_string", CHATML)}
    fields.update({k.replace("__", "."): v for k, v in meta.items()})
    w = GGUFWriter(str(path), "llama")
    for key, (method, value) in fields.items():
        if key not in drop:
            getattr(w, method)(key, value)
    return finish_gguf(w, random_llama(Q.Q8_0)[0], path)


@pytest.fixture(scope="module")
def bad_models(paths):
    """GGUFs with one metadata field missing, mistyped or out of range, bad chat templates, and tokenizer.json /
    tokenizer_config.json files of the wrong shape."""
    from tokenizer import bytes_to_unicode
    d = os.path.join(paths["dir"], "models")
    os.makedirs(d)
    g = lambda name, **kw: write_gguf(os.path.join(d, name + ".gguf"), **kw)     # noqa: E731
    out = {"g_notokens": g("notokens", drop=("tokenizer.ggml.tokens",)),
           "g_heads0": g("heads0", llama__attention__head_count=("add_uint32", 0)),
           "g_headstr": g("headstr", llama__attention__head_count=("add_string", "four")),
           "g_ctx": g("ctx", llama__context_length=("add_uint64", 10 ** 13)),
           "g_bos": g("bos", tokenizer__ggml__bos_token_id=("add_uint32", 999)),
           "g_nobos": g("nobos", drop=("tokenizer.ggml.bos_token_id",)),
           "g_div0": g("div0", tokenizer__chat_template=("add_string", "{{ 1 / 0 }}")),
           "g_strnum": g("strnum", tokenizer__chat_template=("add_string", "{{ 'a' + 1 }}")),
           "g_loop": g("loop", tokenizer__chat_template=("add_string", "{% for i in range(100000) %}{% for j in "
                                                                       "range(100000) %}{% endfor %}{% endfor %}"))}
    b2u = bytes_to_unicode()
    good = {"model": {"type": "BPE", "vocab": {b2u[b]: b for b in range(256)}, "merges": []}, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "added_tokens": [{"content": "<|endoftext|>", "id": 256}]}
    bad = {"list": [good], "novocab": dict(good, model={"type": "BPE", "merges": []}),
           "noid": dict(good, added_tokens=[{"content": "<|endoftext|>"}]), "cfg": good}
    for name, tj in bad.items():
        os.makedirs(os.path.join(d, name))
        with open(os.path.join(d, name, "tokenizer.json"), "w") as f:
            json.dump(tj, f)
        out[f"tj_{name}"] = os.path.join(d, name, "tokenizer.json")
    with open(os.path.join(d, "cfg", "tokenizer_config.json"), "w") as f:
        f.write('{"bos_token": "<|endoftext|>",')
    return out


def _chat_hang(p, monkeypatch):
    # a template of nested long loops (1e10 iterations) stops at the time limit (shortened here) with one line
    import tokenizer
    monkeypatch.setattr(tokenizer, "CHAT_TIME_LIMIT_S", 0.5)
    tokenizer.load_tokenizer(p["g_loop"]).apply_chat([{"role": "user", "content": "hi"}])


def _ids_outside_vocab(p):
    model, _ = weights.load_model(p["tiny"])
    model(torch.tensor([[1, 2, 257]]))


def _merge_disk_full(p):
    # what `ulimit -f 4` does to a merge: every write past 4 KB fails (Python ignores SIGXFSZ, so it is EFBIG)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        E.main(["--merge", f"{p['sh_s0']},{p['sh_s1']}", "--out_dir", os.path.join(p["dir"], "shards"), "--name", "s0"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


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


CALLS = {"ragged": _ragged, "merge_disk_full": _merge_disk_full, "chat_hang": _chat_hang,
         "ids_outside_vocab": _ids_outside_vocab, "nan_fp32": _nan_fp32, "save_nan": _save_nan, "save_disk_full": _save_disk_full,
         **{f"fp16_{n}": (lambda n: lambda p: _fp16_range(p, n))(n) for n in ("dense", "zipcache", "kivi", "mikv")},
         **{f"empty_{n}_{B}x{T}": (lambda n, B, T: lambda p: _empty(p, n, B, T))(n, B, T)
            for n in G.CACHES for B, T in ((1, 0), (0, 4))}}

CUDA_SKIP = pytest.mark.skipif(HAS_CUDA, reason="checks the message on machines without CUDA")

ROWS = [
    # --- data lost or silently wrong
    ("train", ["{run}", "--resume", "--max_iters=30", "--learning_rate=3e3"], "the run diverged and stopped"),
    ("call", "save_nan", "contains NaN or Inf values; not saved"),
    ("call", "save_disk_full", "No space left on device"),
    ("call", "merge_disk_full", "shards/s0.json (File too large); free disk space"),
    ("eval", ["--merge", "{sh_s0},{sh_s0}", "--out_dir", "{out}"], "s0.json is given twice"),
    ("eval", ["--merge", "{sh_s1},{sh_s1copy}", "--out_dir", "{out}"],
     "s1.json and {sh_s1copy} both hold passkey record"),
    ("eval", ["--merge", "{sh_s0},{sh_other}", "--out_dir", "{out}"], "are shards of different runs"),
    ("eval", ["--merge", "{sh_s0},{sh_other}", "--out_dir", "{out}"], "seed 0 vs 1"),
    ("eval", ["--merge", "{sh_s0opts},{sh_s1}", "--out_dir", "{out}"], "with different caches"),
    ("eval", ["--merge", "{sh_s1},{sh_broken}", "--out_dir", "{out}"], "cannot read {sh_broken}"),
    ("eval", ["--merge", "{sh_list},{sh_s1}", "--out_dir", "{out}"], "{sh_list} is not a real-model result"),
    ("eval", ["--merge", "{sh_s1},{dir}/none.json", "--out_dir", "{out}"], "no file {dir}/none.json"),
    # --- files of other people: GGUF metadata, tokenizer.json, tokenizer_config.json, chat templates
    ("generate", ["--checkpoint", "{g_notokens}"], "{g_notokens}: metadata tokenizer.ggml.tokens is missing"),
    ("generate", ["--checkpoint", "{g_heads0}"], "{g_heads0}: metadata llama.attention.head_count is 0; it must be in "
                                                 "1..256"),
    ("generate", ["--checkpoint", "{g_headstr}"], "metadata llama.attention.head_count is four, not an integer"),
    ("generate", ["--checkpoint", "{g_ctx}"], "metadata llama.context_length is 10000000000000; it must be in "
                                              "1..1048576"),
    ("generate", ["--checkpoint", "{g_bos}", "--chat"], "metadata tokenizer.ggml.bos_token_id is 999; it must be in "
                                                        "0..299"),
    ("generate", ["--checkpoint", "{g_div0}", "--chat"], "{g_div0} (tokenizer.chat_template) does not render "
                                                         "(ZeroDivisionError"),
    ("generate", ["--checkpoint", "{g_strnum}", "--chat"], "{g_strnum} (tokenizer.chat_template) does not render "
                                                           "(TypeError"),
    ("call", "chat_hang", "(tokenizer.chat_template) did not render within 0.5 s"),
    ("generate", ["--checkpoint", "{tiny}", "--tokenizer", "{tj_list}"], "{tj_list}: the top level is a JSON list"),
    ("generate", ["--checkpoint", "{tiny}", "--tokenizer", "{tj_novocab}"], "{tj_novocab}: model.vocab is missing"),
    ("generate", ["--checkpoint", "{tiny}", "--tokenizer", "{tj_noid}"], "{tj_noid}: added_tokens[0] lacks"),
    ("generate", ["--checkpoint", "{tiny}", "--tokenizer", "{tj_cfg}"], "cannot read {dir}/models/cfg/"
                                                                        "tokenizer_config.json as JSON"),
    ("call", "ids_outside_vocab", "token id 257 is outside the model's vocabulary (0..256)"),
    ("train", ["{run_fresh}", "--max_seq_len=1000000000000"], "max_seq_len=1000000000000 must be in 1..1048576"),
    ("train", ["{run_fresh}", "--out_dir=/proc/zipcache-run"], "--out_dir=/proc/zipcache-run: cannot write in /proc"),
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
    ("retrieval", ["--batch_tokens", "0"], "argument --batch_tokens: 0 must be at least 1"),
    ("retrieval", ["--learning_rate", "nan"], "argument --learning_rate: nan must be finite and >= 0"),
    ("retrieval", ["--max_iters", "-1"], "argument --max_iters: -1 must be >= 0"),
    ("retrieval", ["--tie_embeddings", "maybe"], "argument --tie_embeddings: 'maybe' is not true or false"),
    ("eval", ["--lines", "abc"], "argument --lines: 'abc' is not a number"),
    ("eval", ["--n", "0"], "argument --n: 0 must be at least 1"),
    ("eval", ["--ppl_windows", "0"], "argument --ppl_windows: 0 must be at least 1"),
    ("eval", ["--ppl_groups", "holdback"], "argument --ppl_groups: holdback: choose from main, sweep"),
    ("eval", ["--lengths", ""], "argument --lengths: '': give comma-separated numbers"),
    ("eval", ["--labels", "dense fp16;ZipCache nope"], "--labels: ZipCache nope is not a row of --groups"),
    ("eval", ["--merge", ""], "argument --merge: '': give comma-separated JSON files"),
    ("eval", ["--tokenizer", "bytes", "--groups", "main"], "--tokenizer bytes has 257 tokens but the model"),
    pytest.param("eval", ["--device", "cuda"], "no CUDA GPU is visible", marks=CUDA_SKIP),
    # --- the experiments' flags: one line before a model loads (experiment_flags.py)
    ("diagnose", ["--configs", "default+k_group=abc"], "--configs: k_group='abc' in 'default+k_group=abc' must be a "
                                                       "whole number"),
    ("diagnose", ["--configs", "default+k_grup=3"], "'k_grup' in 'default+k_grup=3' is not an option of the zipcache"),
    ("diagnose", ["--ppl", "-1"], "argument --ppl: -1 must be >= 0"),
    ("diagnose", ["--lines", "abc"], "argument --lines: 'abc' is not a number"),
    ("diagnose", ["--checkpoint", "{tiny}", "--configs", "default+salient_ratio=2"],
     "--configs default+salient_ratio=2: salient_ratio=2 must be a fraction in [0, 1]"),
    ("bench_train", ["--threads", "0"], "argument --threads: 0 must be at least 1"),
    ("bench_train", ["--repeats", "0"], "argument --repeats: 0 must be at least 1"),
    ("bench_kernel", ["--interpret", "--heads", "8"], "argument --heads: '8': give 2 comma-separated numbers"),
    ("bench_kernel", ["--interpret", "--salient", "2"], "argument --salient: 2 must be a fraction in [0, 1]"),
    ("bench_kernel", ["--heads", "32,7"], "query heads must be a multiple of KV heads"),
    ("bench_model", ["--tokens", "1024,x"], "argument --tokens: 'x' is not a number (in '1024,x'"),
    ("bench_model", ["--threads", "-1"], "argument --threads: -1 must be at least 1 (in '-1'; e.g. 1,2)"),
    ("ablate_clla", ["--jobs", "0"], "argument --jobs: 0 must be at least 1"),
    ("paired", ["{dir}/none.json"], "none.json: not a readable eval.py JSON"),
]


def _expand(argv, p, tmp_path):
    p = dict(p, out=str(tmp_path / "out"))
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
def test_bad_input(kind, argv, msg, paths, tmp_path, capsys, monkeypatch, request):
    if "sh_" in str(argv) + msg or argv == "merge_disk_full":
        paths = dict(paths, **request.getfixturevalue("shards"))
    if "{g_" in str(argv) + msg or "{tj_" in str(argv) or argv == "chat_hang":
        paths = dict(paths, **request.getfixturevalue("bad_models"))
    dirs = [paths["dir"], str(tmp_path), os.path.join(ROOT, "ckpt"), os.path.join(ROOT, "results")]
    before = snapshot(*dirs)
    if kind == "call":
        code, text = run_cli(lambda _: CALLS[argv](paths, *([monkeypatch] if argv in ("save_disk_full", "chat_hang")
                                                             else [])), None, capsys)
    else:
        fn = {"generate": _generate, "train": _train, "eval": E.main, "bench": bench_cache.main,
              "retrieval": retrieval.main, "diagnose": diagnose.main, "bench_train": bench_train.main,
              "bench_kernel": bench.main, "bench_model": bench_model.main, "ablate_clla": ablate_clla.main,
              "paired": paired.main}[kind]
        code, text = run_cli(fn, _expand(argv, paths, tmp_path), capsys)
    assert code != 0, f"accepted: {argv}"
    assert msg.format(**paths) in text, text
    assert "\n" not in text.strip(), f"not one line: {text!r}"
    assert snapshot(*dirs) == before, "a failed command changed files on disk"
    assert not [f for d in dirs for _, _, fs in os.walk(d) for f in fs if ".tmp-" in f], "a temp file was left"


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


# -----------------------------------------------------------------------------
# interrupted writes: a kill or a full disk in the middle of writing results or a checkpoint leaves the previous files

ENV1 = dict(os.environ, OMP_NUM_THREADS="1")


def test_sigkill_during_merge_leaves_every_results_file_whole(shards, tmp_path):
    """SIGKILL `eval.py --merge` at random moments of its writes (from its first temp file on: the JSON, the report,
    the plot), several times: every output file is the previous one or the complete new one, never empty or cut."""
    merge = ["--merge", f"{shards['sh_s0']},{shards['sh_s1']}", "--name", "m"]
    E.main(merge + ["--out_dir", str(tmp_path / "ref")])
    names = [n for n in ("m.json", "m.md", "m_fig1.png") if (tmp_path / "ref" / n).exists()]
    new = {n: (tmp_path / "ref" / n).read_bytes() for n in names}
    old = {n: f"the previous {n}\n".encode() for n in names}
    out, rng, seen = tmp_path / "out", random.Random(0), set()
    out.mkdir()
    for k in range(10):
        for n in names:
            (out / n).write_bytes(old[n])
        pid = os.fork()           # eval.py --merge in a child that has torch and matplotlib loaded already: fast
        if pid == 0:
            try:
                with open(os.devnull, "w") as null:
                    sys.stdout = sys.stderr = null
                    E.main(merge + ["--out_dir", str(out)])
            finally:
                os._exit(0)
        t0 = time.time()
        while not any(".tmp-" in f for f in os.listdir(out)) and time.time() - t0 < 30 \
                and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.0005)
        time.sleep(rng.random() * (0.001, 0.004, 0.02, 0.1, 0.3)[k % 5])   # the JSON and report go by in ms
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        state = tuple((out / n).read_bytes() == new[n] for n in names)
        for n in names:
            assert (out / n).read_bytes() in (old[n], new[n]), f"{n} is neither the previous file nor the new one"
        seen.add(state)
        for f in os.listdir(out):                   # a killed write leaves its temp file, never the real name
            if ".tmp-" in f:
                os.remove(out / f)
    assert len(seen) > 1, f"every kill landed between the same two writes: {seen}"


def test_sigkill_during_checkpoint_saves_leaves_it_loadable(tmp_path):
    """A process saving a 4 MB checkpoint in a loop is killed at random moments: ckpt.pt always loads, whole, and
    holds one of the saves (every weight equals its step)."""
    path = tmp_path / "ckpt.pt"
    code = ("import sys, torch, weights\n"
            "w = torch.zeros(1024, 1024)\n"
            "for step in range(10**6):\n"
            "    w.fill_(step)\n"
            "    weights.atomic_save({'model': {'w': w}, 'step': step}, sys.argv[1])\n")
    rng, steps = random.Random(1), []
    for _ in range(4):
        p = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, env=ENV1)
        t0 = time.time()
        while p.poll() is None and not (path.exists() and f"ckpt.pt.tmp-{p.pid}" in os.listdir(tmp_path)) \
                and time.time() - t0 < 60:            # this process is writing, over a checkpoint that exists
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.3))
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
        ck = torch.load(path, weights_only=True)
        assert torch.equal(ck["model"]["w"], torch.full((1024, 1024), float(ck["step"])))
        steps.append(ck["step"])


def test_full_disk_during_merge_is_one_line_and_keeps_the_results(shards, tmp_path):
    """`ulimit -f 4` (4 KB per file) under `eval.py --merge`: one line naming the file, exit 1, the previous
    results byte for byte, no temp file left."""
    out = tmp_path / "out"
    out.mkdir()
    for n in ("m.json", "m.md"):
        (out / n).write_text(f"the previous {n}\n")
    before = snapshot(str(out))
    cmd = (f"ulimit -f 4; exec {sys.executable} {os.path.join(ROOT, 'experiments', 'eval.py')} --merge "
           f"{shards['sh_s0']},{shards['sh_s1']} --out_dir {out} --name m")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=ENV1, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"eval.py: error: could not write {out}/m.json (File too large)"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert snapshot(str(out)) == before and not [f for f in os.listdir(out) if ".tmp-" in f]


def test_chat_without_a_bos_id_renders(bad_models):
    # a GGUF that names no BOS token: the template's bos_token is undefined (empty), as in transformers, not a crash
    from tokenizer import load_tokenizer
    tok = load_tokenizer(bad_models["g_nobos"])
    assert tok.bos_id is None
    assert tok.decode(tok.apply_chat([{"role": "user", "content": "hi"}])) == ("<|im_start|>user\nhi<|im_end|>\n"
                                                                              "<|im_start|>assistant\n")
    G.main(["--quiet", "--checkpoint", bad_models["g_nobos"], "--chat", "--prompt", "hi", "--max_new_tokens", "2"])
