"""tokenizer.py: the Llama-3 ranks-file path, the in-memory byte tokenizer, load_tokenizer, and the no-download rule."""
import base64
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
