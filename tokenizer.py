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
"""
import base64
import hashlib
import os
import tempfile

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
    """A model directory -> its tokenizer.model (Meta layout, or HF layout with Meta's file under original/)."""
    for cand in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
        if os.path.isfile(os.path.join(d, cand)):
            return os.path.join(d, cand)
    hint = " (it has only tokenizer.json; download original/tokenizer.model too)" if os.path.isfile(
        os.path.join(d, "tokenizer.json")) else ""
    raise ValueError(f"no tokenizer.model in {d} or {d}/original{hint}; pass --tokenizer=PATH to a Llama-3 tokenizer.model")


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
        raise ValueError(f"unknown tokenizer spec {s!r}; expected kind bytes, gpt2, words or llama3")
    s = os.fspath(s)
    if os.path.isdir(s):
        return llama3_tokenizer(find_tokenizer_model(s))
    if os.path.isfile(s):
        return llama3_tokenizer(s)
    raise ValueError(f"tokenizer {s!r} is neither 'bytes', 'gpt2', 'words', a tokenizer.model file nor a model directory")


def special_probe_ids(tok):
    """Token ids used as ZipCache's 'special token' probes (paper Table 2 gives no list; ours): newline, colon,
    question mark, period: the tokens that end a line or a clause. Ids that are not single tokens are skipped."""
    ids = set()
    for s in ("\n", ":", "?", ".", "\n\n"):
        e = tok.encode(s)
        if len(e) == 1:
            ids.add(e[0])
    return sorted(ids)
