"""
Tokenizers, all built on tiktoken, behind one small wrapper.

Three kinds, each described by a plain dict `spec` that train.py stores in every checkpoint so generate.py can rebuild
exactly the tokenizer a model was trained with:

    {"kind": "bytes"}                 256 byte tokens + <|endoftext|> (id 256) = 257. Built in memory: no file, no
                                      download, every string encodes (UTF-8 bytes). The default for training here.
    {"kind": "gpt2"}                  OpenAI's GPT-2 BPE (50257 tokens), only if tiktoken already has it in its cache.
    {"kind": "llama3", "path": p}     Meta's Llama-3 `tokenizer.model`: a tiktoken ranks file (one "base64(token) rank"
                                      per line), Llama-3's split regex and its 256 special tokens.
    {"kind": "words", "words": [...], "digits": 3, "keys": true}
                                      bytes plus whole-piece tokens: every run of 1..digits digits (with and without a
                                      leading space, chunked like Llama-3), " 372:" keys and a short word list. Built in
                                      memory; made for the synthetic line-retrieval task (retrieval.py): 5 tokens a line.
    {"kind": "gguf", "path": p}       byte-level BPE (GPT-2 style) from a GGUF's tokenizer.ggml.* metadata.
    {"kind": "hf", "path": p}         byte-level BPE from a Hugging Face tokenizer.json (+ tokenizer_config.json).

The last two keep the file's own token ids (BPETokenizer maps tiktoken's merge ranks to them) and carry the model's
chat template, rendered with jinja2 as transformers does (render_chat).
"""
import base64
import datetime
import functools
import hashlib
import json
import math
import os
import signal
import tempfile
import threading

import numpy as np
import tiktoken

ENDOFTEXT = "<|endoftext|>"

# Llama-3's pre-tokenizer split regex (Meta's llama3 tokenizer.py): contractions, letters with one optional leading
# non-letter, digits in runs of at most 3, punctuation runs, newlines, other whitespace.
LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
# The named special tokens, in id order right after the BPE ranks (Llama 3.1 naming; Llama 3.0 calls ids 4, 5, 8, 10
# "reserved"; the ids that matter below are identical in both).
LLAMA3_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
# generation stops at end of text, end of turn (chat) and end of message (tool call), as in Meta's reference code
LLAMA3_STOPS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]

# GPT-2's ranks are two files tiktoken downloads and caches under sha1(url); we look for them, we never fetch
GPT2_URLS = [
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
]

# tiktoken's regex engine slows down badly on one huge match; Meta's reference encodes at most this many chars a call
MAX_ENCODE_CHARS = 400_000


class Tokenizer:
    """A tiktoken Encoding plus the ids and the spec the rest of the project needs."""

    def __init__(self, enc, spec, bos, eos, stops):
        self.enc = enc
        self.spec = spec  # plain dict, goes into checkpoints
        self.n_vocab = enc.n_vocab
        self.bos_id = enc.encode_single_token(bos)
        self.eos_id = enc.encode_single_token(eos)
        self.stop_ids = {enc.encode_single_token(s) for s in stops}

    def encode(self, text, bos=False, eos=False, allowed_special=frozenset()):
        """str -> list[int]. Special-token strings inside `text` are plain text unless named in `allowed_special`
        (a set of token strings, or "all"), so a corpus that happens to contain "<|endoftext|>" cannot inject one."""
        ids = [self.bos_id] if bos else []
        if allowed_special != "all":
            allowed_special = set(allowed_special)
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            ids += self.enc.encode(text[i:i + MAX_ENCODE_CHARS], allowed_special=allowed_special, disallowed_special=())
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts):
        """list[str] -> list[list[int]] of plain text (no special tokens), on tiktoken's threads: for corpora."""
        if any(len(t) > MAX_ENCODE_CHARS for t in texts):
            return [self.encode(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids):
        """list[int] -> str; bytes that are not valid UTF-8 (a byte model can emit half a character) become U+FFFD."""
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids):
        """list[int] -> the raw bytes, for streaming output that must not split a multi-byte character."""
        return self.enc.decode_bytes(list(ids))

    chat_template = None    # a jinja2 string for the models that ship one (BPETokenizer); see render_chat
    chat_source = ""        # the file it came from, for error messages

    def apply_chat(self, messages, add_generation_prompt=True):
        """[{"role", "content"}, ...] -> ids of the conversation in the model's own chat format, ending with the
        assistant's turn header, so generation continues as the assistant."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer {self.spec.get('kind')!r} has no chat template; drop --chat, or load a "
                             f"checkpoint whose .gguf or tokenizer_config.json carries one")
        # a file without a BOS (or EOS) id leaves the variable undefined, as transformers does: a template that
        # needs it renders it empty or refuses
        names = {k: self.special_text(i) for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id))
                 if i is not None}
        text = render_chat(self.chat_template, messages, add_generation_prompt, source=self.chat_source, **names)
        return self.encode(text, allowed_special="all")   # the template wrote the special tokens itself

    def special_text(self, i):
        return self.decode([i])

    def __repr__(self):
        return f"Tokenizer({self.spec}, n_vocab={self.n_vocab})"


# -----------------------------------------------------------------------------
# constructors

def byte_tokenizer():
    # with only single-byte ranks there is nothing to merge, so the split regex only chops text into pieces
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]{1,4096}", mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: 256})
    # one token both opens and closes documents, as in GPT-2: training text is doc <eot> doc <eot> ...
    return Tokenizer(enc, {"kind": "bytes"}, bos=ENDOFTEXT, eos=ENDOFTEXT, stops=[ENDOFTEXT])


# the words of retrieval.py's record format; a checkpoint stores its own list in the spec, so this may grow safely
WORDS = ("line", " line", "What", " What", " is", " the", " in", " REGISTER_CONTENT")


def words_tokenizer(words=WORDS, digits=3, keys=True):
    # A piece (regex match) that is a vocabulary entry becomes one token; any other piece falls back to BPE over its
    # bytes, where the only multi-byte merges are digit runs, so a word token is reachable only as a whole piece.
    # Digits split in runs of <= `digits`, left to right, as in Llama-3. keys: " 372:" (a full-width number and a
    # colon) is one token too, so a retrieval line's key is a single token and its value follows it directly.
    nums = [str(i).zfill(n) for n in range(1, digits + 1) for i in range(10 ** n)]
    pieces = nums + [" " + x for x in nums] + list(words)
    if keys:
        pieces += [f" {i}:" for i in range(10 ** (digits - 1), 10 ** digits)]
    ranks = {bytes([i]): i for i in range(256)}
    for piece in pieces:
        ranks.setdefault(piece.encode(), len(ranks))
    pat = r" ?\p{N}{1,%d}%s| ?[\p{L}_]+| ?[^\s\p{L}\p{N}_]+|\s+(?!\S)|\s+" % (digits, ":?" if keys else "")
    enc = tiktoken.Encoding(name="words", pat_str=pat, mergeable_ranks=ranks, special_tokens={ENDOFTEXT: len(ranks)})
    spec = {"kind": "words", "words": list(words), "digits": digits, "keys": keys}
    return Tokenizer(enc, spec, bos=ENDOFTEXT, eos=ENDOFTEXT, stops=[ENDOFTEXT])


def tiktoken_cache_dir():
    """Where tiktoken keeps downloads (same rule as tiktoken.load.read_file_cached)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_tokenizer():
    cache = tiktoken_cache_dir()
    missing = [u for u in GPT2_URLS if not os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()))]
    if missing:
        # tiktoken would try to download here; we never do that at run time (no network, never hang)
        raise ValueError(f"the gpt2 tokenizer is not in tiktoken's cache ({cache}); on a machine with internet run "
                         f"`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` (set TIKTOKEN_CACHE_DIR to "
                         f"share it), or use --tokenizer=bytes")
    enc = tiktoken.get_encoding("gpt2")
    return Tokenizer(enc, {"kind": "gpt2"}, bos=ENDOFTEXT, eos=ENDOFTEXT, stops=[ENDOFTEXT])


def read_ranks(path):
    """A tiktoken ranks file: one `base64(token_bytes) rank` per line -> {bytes: rank}."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except Exception:
                raise ValueError(f"{path}:{n} is not a tiktoken ranks line (base64 token, space, rank); is this a "
                                 f"Llama-3 tokenizer.model? (Llama-2's sentencepiece model is not supported)") from None
    if not ranks:
        raise ValueError(f"{path} holds no ranks; expected a Llama-3 tokenizer.model (tiktoken ranks file)")
    return ranks


def llama3_tokenizer(path):
    path = os.path.abspath(path)
    ranks = read_ranks(path)
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{path}: ranks are not 0..{n - 1} without gaps; the file is corrupt or not a tiktoken ranks file")
    names = LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED))]
    specials = {s: n + i for i, s in enumerate(names)}  # ids n .. n+255 (128000.. for the real model)
    enc = tiktoken.Encoding(name=f"llama3:{os.path.basename(path)}", pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                            special_tokens=specials)
    return Tokenizer(enc, {"kind": "llama3", "path": path}, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                     stops=LLAMA3_STOPS)


def find_tokenizer_model(d):
    """A model directory -> its tokenizer.model (Meta layout, or HF layout with Meta's file under original/), or
    None."""
    for cand in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
        if os.path.isfile(os.path.join(d, cand)):
            return os.path.join(d, cand)
    return None


def load_tokenizer(spec_or_path=None):
    """Build a Tokenizer from a spec dict, a name ("bytes", "gpt2"), a tokenizer.model path, or a model directory."""
    s = spec_or_path
    if s is None or s in ("bytes", "byte"):
        return byte_tokenizer()
    if s == "gpt2":
        return gpt2_tokenizer()
    if s == "words":
        return words_tokenizer()
    if isinstance(s, dict):
        kind = s.get("kind")
        if kind in ("bytes", "gpt2"):
            return load_tokenizer(kind)
        if kind == "words":
            return words_tokenizer(tuple(s.get("words", WORDS)), s.get("digits", 3), s.get("keys", False))
        if kind == "llama3":
            if not os.path.isfile(s.get("path", "")):
                raise ValueError(f"the checkpoint's tokenizer file {s.get('path')!r} does not exist here; "
                                 f"pass --tokenizer=PATH to the Llama-3 tokenizer.model it was made with")
            return llama3_tokenizer(s["path"])
        if kind in ("gguf", "hf"):
            if not os.path.isfile(s.get("path", "")):
                raise ValueError(f"the checkpoint's tokenizer file {s.get('path')!r} does not exist here; "
                                 f"pass --tokenizer=PATH to the .gguf or tokenizer.json it was made with")
            return gguf_tokenizer(s["path"]) if kind == "gguf" else hf_tokenizer(s["path"])
        raise ValueError(f"unknown tokenizer spec {s!r}; expected kind bytes, gpt2, words, llama3, gguf or hf")
    s = os.fspath(s)
    if os.path.isdir(s):
        model_file = find_tokenizer_model(s)
        if model_file:
            return llama3_tokenizer(model_file)
        if os.path.isfile(os.path.join(s, "tokenizer.json")):
            return hf_tokenizer(os.path.join(s, "tokenizer.json"))
        raise ValueError(f"no tokenizer.model in {s} or {s}/original; pass --tokenizer=PATH to a Llama-3 "
                         f"tokenizer.model")
    if s.endswith(".gguf") and os.path.isfile(s):
        return gguf_tokenizer(s)
    if s.endswith(".json") and os.path.isfile(s):
        return hf_tokenizer(s)
    if os.path.isfile(s):
        return llama3_tokenizer(s)
    raise ValueError(f"tokenizer {s!r} is neither 'bytes', 'gpt2', 'words', a tokenizer.model, a .gguf, a tokenizer.json "
                     f"nor a model directory")


def special_probe_ids(tok):
    """Token ids used as ZipCache's 'special token' probes (paper Table 2 gives no list; ours): newline, colon,
    question mark, period: the tokens that end a line or a clause. Ids that are not single tokens are skipped."""
    ids = set()
    for s in ("\n", ":", "?", ".", "\n\n"):
        e = tok.encode(s)
        if len(e) == 1:
            ids.add(e[0])
    return sorted(ids)


# -----------------------------------------------------------------------------
# byte-level BPE from a GGUF or a Hugging Face tokenizer.json (GPT-2 style: SmolLM, Llama 3, GPT-2, Qwen, ...)

# GPT-2's split regex (its encoder.py, and HF's ByteLevel(use_regex=True))
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM: every digit is its own piece (HF: Digits(individual_digits=True) before ByteLevel; llama.cpp's "smollm"),
# then GPT-2's regex. As one regex: a whitespace run just before a digit ends its piece, so it is taken whole, as
# GPT-2's \s+(?!\S) takes a run at the end of a piece.
SMOLLM_PAT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
# GGUF tokenizer.ggml.pre -> split regex (llama.cpp's names)
PRE_PATTERNS = {"gpt2": GPT2_PAT, "smollm": SMOLLM_PAT, "llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT}
# end-of-turn / end-of-text tokens generation stops at, besides the file's eos, when the vocabulary has them
STOP_NAMES = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: byte-level BPE vocabularies spell every byte as one of these."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class BPETokenizer(Tokenizer):
    """Byte-level BPE with the file's token ids.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so ranks come from merge order (the
    256 bytes first, then each merge's result in file order); its output ranks are mapped to the file's ids. Special
    (control) tokens are tiktoken special tokens: encoded only where `allowed_special` names them, plain text otherwise
    (transformers' split_special_tokens=True; transformers' default is allowed_special="all").
    """

    def __init__(self, spec, tokens, merges, special, pat, bos_id, eos_id, add_bos, chat_template=None, path="",
                 unk_id=None):
        b2u = bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        id_bytes, vocab = [], {}
        for i, t in enumerate(tokens):
            if i in special:
                b = t.encode("utf-8")
            else:
                try:
                    b = bytes(u2b[c] for c in t)
                except KeyError:
                    raise ValueError(f"{path}: token {i} {t!r} is not in the byte-level alphabet; this is not a "
                                     f"byte-level (GPT-2 style) BPE vocabulary") from None
                vocab.setdefault(b, i)
            id_bytes.append(b)
        ranks = {}
        for b in range(256):
            if bytes([b]) not in vocab:
                # SmolLM's vocabulary lacks a few control bytes; like HF's BPE they become the unknown token
                if unk_id is None:
                    raise ValueError(f"{path}: byte {b:#04x} has no token and there is no unknown token; not a "
                                     f"complete byte-level BPE vocabulary")
                vocab[bytes([b])] = unk_id
            ranks[bytes([b])] = len(ranks)
        for m in merges:
            a, c = m.split(" ", 1) if isinstance(m, str) else m
            try:
                merged = bytes(u2b[ch] for ch in a + c)
            except KeyError:
                raise ValueError(f"{path}: merge {m!r} is not byte-level BPE") from None
            if merged not in vocab:
                raise ValueError(f"{path}: merge {m!r} makes a token that is not in the vocabulary; the file is corrupt")
            ranks.setdefault(merged, len(ranks))
        specials = {tokens[i]: len(ranks) + k for k, i in enumerate(sorted(special))}
        self.enc = tiktoken.Encoding(name=f"bpe:{os.path.basename(path)}", pat_str=pat, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.id_of_rank = np.array([vocab[b] for b in ranks] + sorted(special), dtype=np.int64)   # tiktoken rank -> id
        self.id_bytes = id_bytes
        self.spec = spec
        self.n_vocab = len(tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        by_name = {tokens[i]: i for i in special}
        self.stop_ids = {eos_id} | {by_name[n] for n in STOP_NAMES if n in by_name}
        self.chat_template = chat_template

    def encode(self, text, bos=False, eos=False, allowed_special=frozenset()):
        """As Tokenizer.encode; bos=True adds the BOS token only if the file asks for one (add_bos_token: SmolLM
        says no, Llama 3 yes), as transformers does."""
        ranks = super().encode(text, allowed_special=allowed_special)
        ids = self.id_of_rank[np.asarray(ranks, dtype=np.int64)].tolist()
        if bos and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids):
        return b"".join(self.id_bytes[i] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


# GGUF metadata (the model's loader, weights.py, reads the same file through these)

@functools.lru_cache(maxsize=2)
def gguf_reader(path):
    """Open a GGUF file; a truncated or corrupt one is one clear line, not a numpy traceback. Cached: parsing the
    metadata of a 49k-token vocabulary takes seconds, and the model and its tokenizer read the same file."""
    from gguf import GGUFReader
    try:
        return GGUFReader(path)
    except Exception as e:
        raise ValueError(f"cannot read GGUF {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''});"
                         f" the file is truncated or corrupt: download it again") from None


def gguf_field(reader, key, default=None):
    """One metadata value as a Python object (str, int, float, bool or list), or default if absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


REQUIRED = object()
_GGUF_KINDS = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
    bool: ("a boolean", lambda v: isinstance(v, bool) or v in (0, 1)),
    "strs": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "ints": ("a list of integers", lambda v: isinstance(v, list) and all(isinstance(x, int) for x in v)),
}


def gguf_value(reader, path, key, kind, default=REQUIRED, lo=None, hi=None):
    """One metadata value checked for presence, type (int, float, str, bool, "strs", "ints") and range [lo, hi]
    (for lists: their length): every field a loader uses goes through here, so a damaged or hand-edited file is one
    line naming the field before anything is allocated from it. Absent: default, or an error if required."""
    f = reader.fields.get(key)
    if f is None:
        if default is REQUIRED:
            raise ValueError(f"{path}: metadata {key} is missing; the file is incomplete, or not a GGUF this loader "
                             f"supports")
        return default
    what, ok = _GGUF_KINDS[kind]
    try:
        v = f.contents()
    except Exception:
        v = ok = None
    if not ok or not ok(v):
        raise ValueError(f"{path}: metadata {key} is {str(v)[:40] if ok else 'unreadable'}, not {what}; the file is "
                         f"corrupt")
    if kind is bool:
        return bool(v)
    n = len(v) if isinstance(v, list) else v
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        rng = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"in {lo}..{hi}"
        what = f"has {n} entries" if isinstance(v, list) else f"is {v}"
        raise ValueError(f"{path}: metadata {key} {what}; it must be {rng} (the file is corrupt)")
    return v


def gguf_tokenizer(path):
    """tokenizer.ggml.* metadata of a GGUF -> BPETokenizer (only byte-level BPE, tokenizer.ggml.model == 'gpt2')."""
    r = gguf_reader(path)
    kind = gguf_value(r, path, "tokenizer.ggml.model", str, None)
    if kind != "gpt2":
        what = "a sentencepiece tokenizer" if kind == "llama" else "no byte-level BPE tokenizer"
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r} ({what}), which is not supported; only byte-level "
                         f"BPE ('gpt2': SmolLM, Llama 3, GPT-2) is; pass --tokenizer with a supported tokenizer")
    pre = gguf_value(r, path, "tokenizer.ggml.pre", str, "gpt2")
    if pre not in PRE_PATTERNS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_PATTERNS)})")
    tokens = gguf_value(r, path, "tokenizer.ggml.tokens", "strs", lo=1)
    n = len(tokens)
    types = gguf_value(r, path, "tokenizer.ggml.token_type", "ints", [1] * n, lo=n, hi=n)
    special = {i for i, t in enumerate(types) if t in (3, 4)}          # CONTROL, USER_DEFINED (llama.cpp's enum)
    ids = {k: gguf_value(r, path, f"tokenizer.ggml.{k}_token_id", int, None, 0, n - 1)
           for k in ("bos", "eos", "unknown")}
    tok = BPETokenizer({"kind": "gguf", "path": os.path.abspath(path)}, tokens,
                       gguf_value(r, path, "tokenizer.ggml.merges", "strs", []), special, PRE_PATTERNS[pre],
                       ids["bos"], ids["eos"], gguf_value(r, path, "tokenizer.ggml.add_bos_token", bool, False),
                       gguf_value(r, path, "tokenizer.chat_template", str, None), path, ids["unknown"])
    tok.chat_source = f"{path} (tokenizer.chat_template)"
    return tok


def hf_pattern(pt, path):
    """A tokenizer.json pre_tokenizer -> one split regex, for the byte-level layouts we know; else one clear line."""
    def byte_level(p, regex):
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex and not p.get("add_prefix_space")
    steps = (pt or {}).get("pretokenizers", [pt] if pt else [])
    if len(steps) == 1 and byte_level(steps[0], True):
        return GPT2_PAT                                                             # GPT-2
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1], True):
        return SMOLLM_PAT                                                           # SmolLM
    if len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {}) \
            and steps[0].get("behavior") == "Isolated" and byte_level(steps[1], False):
        return steps[0]["pattern"]["Regex"]                                         # Llama 3, Qwen
    raise ValueError(f"{path}: pre_tokenizer {json.dumps(pt)[:120]} is not byte-level BPE as supported here (ByteLevel, "
                     f"Digits+ByteLevel or Split+ByteLevel); use a GGUF or a Llama-3 tokenizer.model")


def hf_tokenizer(path):
    """A Hugging Face tokenizer.json (+ tokenizer_config.json beside it: bos/eos, add_bos_token, chat_template)."""
    try:
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path!r} as JSON ({type(e).__name__}); is it a tokenizer.json?") from None
    check_tokenizer_json(tj, path)
    m = tj.get("model") or {}
    if m.get("type") != "BPE" or tj.get("normalizer") is not None:
        raise ValueError(f"{path}: model type {m.get('type')!r} with normalizer {tj.get('normalizer') and tj['normalizer'].get('type')!r}"
                         f" is not byte-level BPE (a BPE model, no normalizer); use a GGUF or a Llama-3 tokenizer.model")
    pat = hf_pattern(tj.get("pre_tokenizer"), path)
    vocab = dict(m["vocab"])
    added = {a["content"]: a["id"] for a in tj.get("added_tokens") or []}
    vocab.update(added)
    if not vocab or max(vocab.values()) + 1 != len(set(vocab.values())):    # before a list of max id + 1 entries
        raise ValueError(f"{path}: token ids have gaps; the tokenizer.json is corrupt")
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    if None in tokens:
        raise ValueError(f"{path}: token ids have gaps; the tokenizer.json is corrupt")
    cfg = {}
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        cfg = read_tokenizer_config(cfg_path)

    def tok_id(name):
        v = cfg.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v is not None else None
    template = cfg.get("chat_template")
    if isinstance(template, list):          # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    bos, eos = tok_id("bos_token"), tok_id("eos_token")
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:     # Llama 3 says it only in its post-processor, which prepends <|begin_of_text|>
        add_bos = bos is not None and json.dumps(tokens[bos]) in json.dumps(tj.get("post_processor") or {})
    tok = BPETokenizer({"kind": "hf", "path": os.path.abspath(path)}, tokens, m.get("merges", []), set(added.values()),
                       pat, bos, eos if eos is not None else bos, bool(add_bos), template, path,
                       vocab.get(m.get("unk_token")) if m.get("unk_token") else None)
    tok.chat_source = f"{cfg_path} (chat_template)"
    return tok


def check_tokenizer_json(tj, path):
    """The parts of a tokenizer.json hf_tokenizer reads, checked for shape: one line naming the file and the part."""
    def bad(what):
        return ValueError(f"{path}: {what}; the tokenizer.json is corrupt or not a Hugging Face tokenizer.json")

    if not isinstance(tj, dict):
        raise bad(f"the top level is a JSON {type(tj).__name__}, not an object")
    m = tj.get("model") or {}
    if not isinstance(m, dict):
        raise bad(f"'model' is a {type(m).__name__}, not an object")
    for key in ("normalizer", "pre_tokenizer", "post_processor"):
        if tj.get(key) is not None and not isinstance(tj[key], dict):
            raise bad(f"'{key}' is a {type(tj[key]).__name__}, not an object or null")
    if m.get("type") != "BPE":
        return                                                  # refused by the caller, naming the model type
    vocab = m.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise bad("model.vocab is missing or not a non-empty object of token: id")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise bad("model.vocab has an id that is not a whole number >= 0")
    merges = m.get("merges", [])
    if not isinstance(merges, list) or not all(
            (isinstance(x, str) and " " in x) or (isinstance(x, list) and len(x) == 2 and all(isinstance(y, str)
                                                                                              for y in x))
            for x in merges):
        raise bad("model.merges is not a list of 'a b' strings or [a, b] pairs")
    if m.get("unk_token") is not None and not isinstance(m["unk_token"], str):
        raise bad("model.unk_token is not a string")
    added = tj.get("added_tokens") or []
    if not isinstance(added, list):
        raise bad("added_tokens is not a list")
    for k, a in enumerate(added):
        if not (isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int)
                and not isinstance(a.get("id"), bool) and a["id"] >= 0):
            raise bad(f"added_tokens[{k}] lacks a string 'content' and a whole-number 'id' >= 0")


def read_tokenizer_config(path):
    """tokenizer_config.json, checked for the fields hf_tokenizer reads; every problem names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise ValueError(f"cannot read {path} as JSON ({why}); restore it from the model's release") from None

    def bad(what):
        return ValueError(f"{path}: {what}; restore the file from the model's release")

    if not isinstance(cfg, dict):
        raise bad(f"the top level is a JSON {type(cfg).__name__}, not an object")
    for name in ("bos_token", "eos_token"):
        v = cfg.get(name)
        if v is not None and not isinstance(v.get("content") if isinstance(v, dict) else v, str):
            raise bad(f"{name} is neither a string nor an object with a string 'content'")
    if cfg.get("add_bos_token") is not None and not isinstance(cfg["add_bos_token"], bool):
        raise bad("add_bos_token is not true, false or null")
    t = cfg.get("chat_template")
    if t is not None and not isinstance(t, str) and not (
            isinstance(t, list) and all(isinstance(x, dict) and isinstance(x.get("template"), str) for x in t)):
        raise bad("chat_template is neither a string nor a list of {name, template} objects")
    return cfg


CHAT_TIME_LIMIT_S = 5.0          # a real template renders in milliseconds; nested long loops would run for hours
CHAT_MAX_CHARS = 10_000_000      # and one rendering more text than any context holds is a broken template


class _TemplateTimeout(BaseException):     # not an Exception: nothing inside jinja2 may swallow it
    pass


def render_chat(template, messages, add_generation_prompt=True, source="the chat template", **variables):
    """Render a chat template the way transformers does: jinja2's immutable sandbox with trim_blocks/lstrip_blocks,
    loop controls, a tojson filter, raise_exception() and strftime_now() (README, "Chat"). Guarded: at most
    CHAT_TIME_LIMIT_S seconds and CHAT_MAX_CHARS characters, and any error in the template (a syntax error, a
    division by zero, a string added to a number, ...) is one line naming `source`, the file it came from."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _Refused(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)

    def render():
        out, n = [], 0
        for chunk in env.from_string(template).generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                         **variables):
            out.append(chunk)
            n += len(chunk)
            if n > CHAT_MAX_CHARS:
                raise ValueError(f"{source} renders more than {CHAT_MAX_CHARS:,} characters for "
                                 f"{len(messages)} message(s); the template is broken: fix it or drop --chat")
        return "".join(out)

    try:
        return _with_time_limit(render, CHAT_TIME_LIMIT_S)
    except _Refused as e:
        raise ValueError(f"{source} refused the conversation: {e}") from None
    except _TemplateTimeout:
        raise ValueError(f"{source} did not render within {CHAT_TIME_LIMIT_S:g} s (a runaway loop?); fix the "
                         f"template or drop --chat") from None
    except ValueError as e:
        if str(e).startswith(source):
            raise
        raise ValueError(f"{source} does not render (ValueError: {_one_line(e)}); fix the template or drop "
                         f"--chat") from None
    except Exception as e:   # jinja2's own errors, and whatever the template's expressions raise
        raise ValueError(f"{source} does not render ({type(e).__name__}: {_one_line(e)}); fix the template or drop "
                         f"--chat") from None


class _Refused(Exception):
    """raise_exception() called by the template itself: the conversation, not the template, is wrong."""


def _one_line(e):
    return (str(e).strip().splitlines() or [""])[0][:200]


def _with_time_limit(fn, seconds):
    """fn() stopped after `seconds`: by SIGALRM in the main thread (the template's Python code is interrupted where
    it is), else in a daemon thread that is abandoned (the caller gets the error; the thread ends with the process)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise _TemplateTimeout()
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)      # and again every 0.1 s until it lands
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:   # handed to the caller
            box["err"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise _TemplateTimeout()
    if "err" in box:
        raise box["err"]
    return box["out"]
