"""tokenizer.py: the Llama-3 ranks-file path, the in-memory byte tokenizer, load_tokenizer, and the no-download rule."""
import base64
import json
import os

import pytest

from tokenizer import LLAMA3_NUM_SPECIAL, load_tokenizer


def write_ranks(path, merges=(b"th", b"the", b" t", b"in", b" the", b"ing")):
    """A tiny but real BPE ranks file: all 256 bytes, then a few merges whose halves are ranked lower (as BPE needs)."""
    toks = [bytes([i]) for i in range(256)] + list(merges)
    with open(path, "wb") as f:
        for rank, t in enumerate(toks):
            f.write(base64.b64encode(t) + b" " + str(rank).encode() + b"\n")
    return len(toks)


@pytest.fixture
def llama3(tmp_path):
    n = write_ranks(tmp_path / "tokenizer.model")
    return load_tokenizer(str(tmp_path / "tokenizer.model")), n


TEXTS = ["the thing in the", "", "héllo wörld — ünïcode ✓ 日本語 🙂\n\ttabs\r\n", "x" * 1000, "I'm 12345 ok?!"]


def test_llama3_roundtrip_and_merges(llama3):
    tok, n = llama3
    assert tok.n_vocab == n + LLAMA3_NUM_SPECIAL
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    # the merges really apply: " the" is one token (rank 256+4), "th" (256) inside "thing" + "ing" (261)
    assert tok.encode(" the") == [256 + 4]
    assert tok.encode("thing") == [256, 256 + 5]
    # Llama-3's regex splits digits in runs of at most 3, so no token spans "123|45"
    assert tok.decode(tok.encode("12345")[:3]) == "123"


def test_llama3_special_tokens(llama3):
    tok, n = llama3
    # ids follow Meta's layout: begin_of_text = first id after the ranks, eot_id = +9, end_of_text = +1
    assert tok.bos_id == n and tok.eos_id == n + 1
    eot = tok.enc.encode_single_token("<|eot_id|>")
    assert eot == n + 9 and tok.stop_ids >= {n + 1, eot}
    chat = "<|start_header_id|>user<|end_header_id|>\n\nhi the<|eot_id|>"
    ids = tok.encode(chat, bos=True, allowed_special="all")
    assert ids[0] == n and ids[1] == n + 6 and ids[-1] == eot
    assert tok.decode(ids) == "<|begin_of_text|>" + chat
    # by default special-token text is just text: a corpus cannot inject control tokens
    plain = tok.encode("<|eot_id|>")
    assert eot not in plain and tok.decode(plain) == "<|eot_id|>"
    assert tok.encode("a", eos=True)[-1] == n + 1
    # the last reserved token has the last id
    assert tok.enc.encode_single_token("<|reserved_special_token_246|>") == n + LLAMA3_NUM_SPECIAL - 1


def test_load_from_dir_and_spec(tmp_path, llama3):
    tok, _ = llama3
    (tmp_path / "m" / "original").mkdir(parents=True)
    write_ranks(tmp_path / "m" / "original" / "tokenizer.model")  # HF layout keeps Meta's file under original/
    t2 = load_tokenizer(str(tmp_path / "m"))
    t3 = load_tokenizer(tok.spec)  # a spec as stored in a checkpoint
    for t in (t2, t3):
        assert t.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert tok.spec == {"kind": "llama3", "path": str(tmp_path / "tokenizer.model")}


def test_byte_tokenizer_roundtrips_unicode():
    tok = load_tokenizer({"kind": "bytes"})
    assert tok.n_vocab == 257 and tok.eos_id == tok.bos_id == 256 and tok.stop_ids == {256}
    weird = "".join(chr(c) for c in range(0, 0x3000, 7)) + "\U0001F600\U0010FFFF" + "\x00\ud7ff"
    for t in TEXTS + [weird]:
        ids = tok.encode(t)
        assert ids == list(t.encode("utf-8"))  # independent reference: the UTF-8 bytes themselves
        assert tok.decode(ids) == t
    assert tok.encode("a", bos=True, eos=True) == [256, 97, 256]
    assert tok.decode([256]) == "<|endoftext|>"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # half a character decodes to U+FFFD, never raises
    assert tok.encode_batch(["ab", "é"]) == [[97, 98], [0xC3, 0xA9]]


@pytest.mark.parametrize("bad, msg", [
    ("nope/none", "neither"),
    ({"kind": "sentencepiece"}, "unknown tokenizer spec"),
    ({"kind": "llama3", "path": "/no/such/tokenizer.model"}, "does not exist"),
])
def test_bad_inputs(bad, msg):
    with pytest.raises(ValueError, match=msg):
        load_tokenizer(bad)


def test_bad_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0bnot base64 at all!!\n")  # e.g. a sentencepiece proto
    with pytest.raises(ValueError, match="not a tiktoken ranks line"):
        load_tokenizer(str(tmp_path / "tokenizer.model"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tokenizer.json").write_text("{}")    # a dir with only tokenizer.json reads it: not BPE here
    with pytest.raises(ValueError, match="is not byte-level BPE"):
        load_tokenizer(str(tmp_path / "d"))


def test_gpt2_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: must fail fast with a clear message
    with pytest.raises(ValueError, match="not in tiktoken's cache"):
        load_tokenizer("gpt2")


# -----------------------------------------------------------------------------
# byte-level BPE from a tokenizer.json or GGUF metadata, against a vocabulary trained here with `tokenizers`

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIXED = ("Hello  world, it's 2026-12-01: 3.14159 x1 1234567 $42.00\n\n\n   x  1 \t\t9\r\n héllo wörld — ✓ 日本語 🙂 "
         "def f(a, b=2):\n    return a  +  b  # comment\n\n<|im_start|>user\nhi<|im_end|> <|endoftext|> ")


def corpus():
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)[:40]]


def train_bpe(digits):
    """A ~1k-token byte-level BPE trained on Python's reference manual: GPT-2 style, or SmolLM's digit split."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if digits else byte_level)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return hf


@pytest.mark.parametrize("digits", [False, True], ids=["gpt2", "smollm"])
def test_tokenizer_json_matches_hf(tmp_path, digits):
    hf = train_bpe(digits)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}')
    tok = load_tokenizer(str(tmp_path))                                # a model dir with only tokenizer.json
    assert tok.spec["kind"] == "hf" and tok.n_vocab == hf.get_vocab_size()
    text = MIXED * 3 + "".join(corpus()[40:] if len(corpus()) > 40 else corpus())[:20_000]
    # HF matches added tokens inside text: our allowed_special="all"; our default keeps them plain text
    assert tok.encode(text, allowed_special="all") == hf.encode(text).ids
    plain = tok.encode(text)
    assert tok.decode(plain) == text and hf.token_to_id("<|im_start|>") not in plain
    assert tok.eos_id == hf.token_to_id("<|im_end|>") and tok.eos_id in tok.stop_ids


def test_gguf_tokenizer_metadata(tmp_path):
    """The same trained vocabulary written as GGUF tokenizer.ggml.* metadata (what llama.cpp's converter writes)."""
    from gguf import GGUFWriter
    hf = train_bpe(digits=True)
    tj = json.loads(hf.to_str())
    vocab = tj["model"]["vocab"] | {a["content"]: a["id"] for a in tj["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    tok = load_tokenizer(str(tmp_path / "t.gguf"))
    assert tok.encode(MIXED * 5, allowed_special="all") == hf.encode(MIXED * 5).ids
    assert tok.encode("x", bos=True) == tok.encode("x")                # add_bos_token false: no BOS
    ids = tok.apply_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == vocab["<|im_start|>"] and tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_bad_tokenizer_json(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}, "normalizer": None}))
    with pytest.raises(ValueError, match="is not byte-level BPE"):
        load_tokenizer(str(p))
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": None,
                             "pre_tokenizer": {"type": "Metaspace"}}))                   # sentencepiece-style BPE
    with pytest.raises(ValueError, match="not byte-level BPE"):
        load_tokenizer(str(p))


# -----------------------------------------------------------------------------
# chat templates, rendered as transformers does (jinja2 sandbox, trim_blocks/lstrip_blocks, raise_exception)

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def test_chat_templates():
    from tokenizer import render_chat
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert render_chat(CHATML, msgs) == ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
                                         "What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(CHATML, msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    assert render_chat(LLAMA3, msgs, bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="refused the conversation: unknown role tool"):
        render_chat(LLAMA3, [{"role": "tool", "content": "x"}], bos_token="")
    with pytest.raises(ValueError, match="does not render"):
        render_chat("{% for %}", msgs)


def test_llama3_chat_through_ranks_file(llama3):
    from tokenizer import render_chat
    tok, _ = llama3
    text = render_chat(LLAMA3, [{"role": "user", "content": "the thing"}], bos_token="<|begin_of_text|>")
    ids = tok.encode(text, allowed_special="all")
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
