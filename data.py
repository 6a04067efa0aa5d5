"""
Corpus -> token memmaps, and random training batches from them. Used by train.py.

A corpus is a text file, a directory of text files, or (default, no download) the Python standard library's own .py
sources read from the running interpreter. It is tokenized once into train.bin / val.bin (flat token arrays, uint16
when the vocabulary fits, else uint32) plus meta.json, in a cache directory named by a fingerprint of everything that
decides the tokens (files, sizes, mtimes, tokenizer, limits), so a second run with the same inputs reuses them.

Rules a reader should know (README "Training" repeats them):
- Files are read in a fixed pseudo-random order (sorted by sha1 of their relative path), so the first max_corpus_mb
  and the validation tail are both a mix of the whole directory rather than its alphabetically first part.
- Each document is followed by the end-of-text token (GPT-2 style); tokenizers with a distinct BOS also get one first.
- Bytes that are not valid UTF-8 become U+FFFD (one note line says how many files had them); files with NUL bytes
  are treated as binary and skipped (also noted).
- Validation = the last val_frac of the token stream.
"""
import codecs
import hashlib
import json
import os
import shutil
import sysconfig

import numpy as np
import torch

STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
FORMAT_VERSION = 1


def stdlib_files():
    """The running interpreter's standard library .py files: no tests, no third-party packages, nothing built here."""
    root = sysconfig.get_paths()["stdlib"]
    rel = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in STDLIB_SKIP_DIRS and not x.startswith(".")]
        rel += [os.path.relpath(os.path.join(d, f), root) for f in files
                if f.endswith(".py") and not f.startswith("_sysconfigdata")]  # that one is machine-specific
    return root, rel


def corpus_files(data):
    """'' -> the stdlib corpus; a file -> [it]; a directory -> every non-hidden file below it. Fixed order."""
    if not data:
        root, rel = stdlib_files()
    elif os.path.isfile(data):
        root, rel = os.path.dirname(os.path.abspath(data)), [os.path.basename(data)]
    elif os.path.isdir(data):
        root, rel = os.path.abspath(data), []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            rel += [os.path.relpath(os.path.join(d, f), root) for f in files if not f.startswith(".")]
    else:
        raise ValueError(f"--data={data!r} is neither a file nor a directory; pass a text file, a directory of text "
                         f"files, or nothing for the default corpus")
    rel.sort(key=lambda p: hashlib.sha1(p.encode()).hexdigest())  # a fixed shuffle, the same on every machine
    return root, rel


def read_corpus(root, rel, max_bytes):
    """-> (list of document strings, notes). Stops after max_bytes (0 = no limit), cutting on a character boundary."""
    docs, notes, total, bad, binary = [], [], 0, [], []
    for p in rel:
        with open(os.path.join(root, p), "rb") as f:
            b = f.read(max_bytes - total if max_bytes else -1)
        if b"\x00" in b:
            binary.append(p)
            continue
        capped = bool(max_bytes) and total + len(b) >= max_bytes
        if capped:
            notes.append(f"corpus capped at {max_bytes / 2**20:g} MB (--max_corpus_mb) in file {len(docs) + 1} of "
                         f"{len(rel)}")
        # final=False at the cap holds back a character the cut split in two, instead of turning it into U+FFFD
        try:
            text = codecs.getincrementaldecoder("utf-8")("strict").decode(b, final=not capped)
        except UnicodeDecodeError:
            text = codecs.getincrementaldecoder("utf-8")("replace").decode(b, final=not capped)
            bad.append(p)
        if text:
            docs.append(text)
        total += len(b)
        if max_bytes and total >= max_bytes:
            break
    if bad:
        notes.append(f"{len(bad)} file(s) had bytes that are not UTF-8, replaced by U+FFFD (first: {bad[0]})")
    if binary:
        notes.append(f"skipped {len(binary)} binary file(s) containing NUL bytes (first: {binary[0]})")
    return docs, notes


def fingerprint(root, rel, tok, max_bytes, val_frac):
    """Everything that decides the token arrays, hashed; a change in any of it means re-tokenizing."""
    h = hashlib.sha256()
    spec = dict(tok.spec)
    if spec.get("path"):  # the ranks file's content, not just its name
        with open(spec["path"], "rb") as f:
            spec["sha256"] = hashlib.sha256(f.read()).hexdigest()
    h.update(json.dumps([FORMAT_VERSION, root, spec, max_bytes, val_frac]).encode())
    for p in rel:
        st = os.stat(os.path.join(root, p))
        h.update(f"\0{p}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare(data, tok, data_dir, max_corpus_mb, val_frac, log=print):
    """Tokenize the corpus once (or find it already done) -> meta dict with paths, dtype and token counts."""
    root, rel = corpus_files(data)
    max_bytes = int(max_corpus_mb * 2**20)
    fp = fingerprint(root, rel, tok, max_bytes, val_frac)
    out = os.path.join(data_dir, fp)
    if os.path.exists(os.path.join(out, "meta.json")):  # meta.json is written last: present = complete
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        if meta["tokenizer"] == tok.spec:
            log(f"data: reusing {out} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
            return dict(meta, dir=out)
    docs, notes = read_corpus(root, rel, max_bytes)
    for n in notes:
        log(f"data: note: {n}")
    what = f"--data={data}" if data else f"the default corpus ({root})"
    if not docs:
        raise ValueError(f"no text found in {what} ({len(rel)} files, all empty or binary); pass --data a text file "
                         f"or a directory of text files")
    # [bos] doc [eos] per document, tokenized on tiktoken's threads; no Python loop over tokens
    bos = [tok.bos_id] if tok.bos_id != tok.eos_id else []
    ids = [bos + d + [tok.eos_id] for d in tok.encode_batch(docs)]
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    arr = np.concatenate([np.asarray(d, dtype=dtype) for d in ids])
    n_val = int(len(arr) * val_frac)
    splits = {"train": arr[:len(arr) - n_val], "val": arr[len(arr) - n_val:]}
    # write into a temp dir beside the final one, then rename: a crash never leaves a half-written cache
    tmp = f"{out}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for name, a in splits.items():
        a.tofile(os.path.join(tmp, f"{name}.bin"))
    meta = {"tokenizer": tok.spec, "dtype": np.dtype(dtype).name, "source": what, "files": len(docs),
            "bytes": sum(len(d.encode()) for d in docs), "train_tokens": int(len(splits["train"])),
            "val_tokens": int(n_val), "val_frac": val_frac, "max_corpus_mb": max_corpus_mb, "notes": notes}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)  # a stale, incomplete or mismatching one
    os.replace(tmp, out)
    log(f"data: {what}: {meta['files']} files, {meta['bytes'] / 2**20:.2f} MB -> {meta['train_tokens']:,} train / "
        f"{n_val:,} val tokens ({meta['dtype']}) in {out}")
    return dict(meta, dir=out)


def get_batch(meta, split, batch_size, block_size, gen, device):
    """Random windows of block_size+1 tokens -> (x, y) [B, T] int64, y = x shifted by one. `gen` is the sampler RNG."""
    # a fresh memmap per batch: holding one open keeps growing the process's resident pages (nanoGPT's note)
    data = np.memmap(os.path.join(meta["dir"], f"{split}.bin"), dtype=meta["dtype"], mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen).numpy()
    win = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64))  # [B, T+1], one gather
    x, y = win[:, :-1].contiguous(), win[:, 1:].contiguous()
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
