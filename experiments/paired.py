"""
Accuracy with its evidence: every passkey cell with its 95% Wilson interval, the paired exact McNemar test of
ZipCache's default against dense and against KIVI-2 (the baseline at its real ratio) on the same records, and each
cache's perplexity change with a paired bootstrap interval over the same text windows.

    python experiments/paired.py results/real/run3.json                 # prints the tables (markdown)
    python experiments/paired.py results/real/run3.json --out results/real/paired.md
    python experiments/paired.py results/real/run7.json --with results/real/run5.json \
        --rename "ZipCache default=ZipCache default, 2-bit keys" --out results/real/paired.md

It reads an eval.py JSON (each row's `records`: per length, [depth, correct] per record in run order; its
`ppl_window_nll`: the mean NLL per token of each perplexity window). The same records and windows go to every cache
in one eval.py run (one prefill serves them all), so rows pair record by record and window by window; the script
checks that the depths agree before pairing. --with adds the rows of earlier runs on the same records (records in
the same run order: the same --n, seed and --skip_records), for caches the main file did not run; --rename relabels
theirs first (a row whose cache's default has changed since).
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

import stats
import weights
from experiment_flags import Parser

PAIRS = (("ZipCache default", "dense fp16"), ("ZipCache default", "KIVI-2"),
         ("ZipCache default", "ZipCache default, 2-bit keys"),      # the default against the one before it
         ("ZipCache default, pooled scores", "ZipCache default"))   # a candidate switch against the default


def load(path):
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable eval.py JSON ({e}); give a results/.../*.json that eval.py wrote")
    rows = [r for r in run.get("rows", []) if r.get("records") or r.get("ppl_window_nll")]
    if not rows:
        raise ValueError(f"{path}: no row has per-record passkey or per-window perplexity results; run eval.py with "
                         f"--tasks passkey or ppl")
    return run, rows


def renames(text):
    """--rename "A=B;C=D" -> {A: B, C: D}."""
    out = {}
    for part in filter(None, (t.strip() for t in text.split(";"))):
        a, sep, b = part.partition("=")
        if not sep or not a.strip() or not b.strip():
            raise ValueError(f"--rename {text!r}: {part!r} is not OLD LABEL=NEW LABEL")
        out[a.strip()] = b.strip()
    return out


def joined(path, others, rename):
    """The main file's run and rows, plus the rows of `others` (renamed first) whose labels it lacks."""
    run, rows = load(path)
    have = {r["label"] for r in rows}
    for o in others:
        for r in load(o)[1]:
            r = dict(r, label=rename.get(r["label"], r["label"]))
            if r["label"] not in have:
                rows.append(r)
                have.add(r["label"])
    return run, rows


def records(row, length):
    """[(depth, correct)] of one row at one length, or [] when the row did not run it."""
    return [tuple(r) for r in row.get("records", {}).get(str(length), [])]


def paired(a, b, where):
    """Correctness lists of two rows on the same records (depths must agree record by record)."""
    n = min(len(a), len(b))               # a stopped run: the records both finished, in the same run order
    if [d for d, _ in a[:n]] != [d for d, _ in b[:n]]:
        raise ValueError(f"{where}: the two rows hold different records (depths differ); they are not paired")
    return [c for _, c in a[:n]], [c for _, c in b[:n]]


def ppl_change(x, y):
    """Perplexity of x over y's, as a percent change, with its 95% paired bootstrap interval over the windows:
    the ratio is exp(mean over windows of the NLL difference), so resampling windows resamples the differences."""
    if len(x) != len(y):
        raise ValueError(f"perplexity rows over {len(x)} and {len(y)} windows are not paired; compare one run's rows")
    d = [a - b for a, b in zip(x, y)]
    lo, hi = stats.bootstrap_mean(d)
    pct = lambda v: 100 * (math.exp(v) - 1)                                                   # noqa: E731
    return pct(sum(d) / len(d)), pct(lo), pct(hi)


def ppl_report(rows):
    """The perplexity table: each cache against dense, and the ZipCache default against KIVI-2, on the same windows."""
    by_label = {r["label"]: r for r in rows if r.get("ppl_window_nll")}
    if "dense fp16" not in by_label:
        return []
    dense = by_label["dense fp16"]["ppl_window_nll"]
    out = ["", f"Perplexity over {len(dense)} windows (the same windows for every cache): change against dense, "
               f"[95% paired bootstrap interval over windows].", "",
           "| cache | real ratio | perplexity | vs dense |", "|---|---|---|---|"]
    for label, r in by_label.items():
        c, lo, hi = ppl_change(r["ppl_window_nll"], dense)
        out.append(f"| {label} | {r.get('ppl_real', 1.0):.2f}x | {r['ppl']:.3f} | {c:+.1f}% [{lo:+.1f}, {hi:+.1f}] |")
    for x, y in PAIRS[1:]:                                   # the pairs other than dense, where both ran
        if x in by_label and y in by_label:
            c, lo, hi = ppl_change(by_label[x]["ppl_window_nll"], by_label[y]["ppl_window_nll"])
            out += ["", f"{x} against {y}, same windows: {c:+.1f}% [{lo:+.1f}, {hi:+.1f}] perplexity."]
    return out


def report(run, rows, path):
    lengths = sorted({int(k) for r in rows for k in r.get("records", {})})
    by_label = {r["label"]: r for r in rows}
    if not lengths:
        return "\n".join([f"# Perplexity with paired bootstrap intervals\n", f"Source: `{path}` "
                          f"({run.get('meta', {}).get('command', 'eval.py')}).", *ppl_report(rows)]) + "\n"
    out = [f"# Passkey with 95% Wilson intervals and paired McNemar tests\n",
           f"Source: `{path}` ({run.get('meta', {}).get('command', 'eval.py')}). Each cell: correct/records = rate "
           f"[95% Wilson interval]; the real ratio at the longest length after the cache name.\n",
           "| cache | " + " | ".join(f"passkey@{L}" for L in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
    for r in rows:
        cells = []
        for L in lengths:
            rec = records(r, L)
            k = sum(c for _, c in rec)
            cells.append(f"{k}/{len(rec)} = {stats.fmt_rate(k, len(rec))}" if rec else "-")
        ratio = r.get("real_at", {}).get(str(lengths[-1]))
        out.append(f"| {r['label']}" + (f" ({ratio:.2f}x)" if ratio else "") + " | " + " | ".join(cells) + " |")
    out += ["", "Paired exact McNemar test, same records: won = the first answers and the second does not.", "",
            "| pair | length | records | won | lost | p |", "|---|---|---|---|---|---|"]
    for x, y in PAIRS:
        if x not in by_label or y not in by_label:
            continue
        for L in lengths:
            a, b = paired(records(by_label[x], L), records(by_label[y], L), f"{x} vs {y} at {L}")
            if a:
                won, lost, p = stats.mcnemar(a, b)
                out.append(f"| {x} vs {y} | {L} | {len(a)} | {won} | {lost} | {p:.3g} |")
    return "\n".join(out + ppl_report(rows)) + "\n"


def main(argv=None):
    p = Parser(prog="paired.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("json", help="an eval.py results JSON")
    p.add_argument("--with", dest="others", default="", help="comma list of earlier eval.py JSONs on the same records "
                   "(same --n and seed): their rows join for the caches the main file lacks")
    p.add_argument("--rename", default="", help="'OLD=NEW;...': relabel --with rows first (e.g. the default's row "
                   "from before its default changed)")
    p.add_argument("--out", default=None, help="also write the markdown here (atomically)")
    args = p.parse_args(argv)
    others = [x for x in args.others.split(",") if x]
    run, rows = joined(args.json, others, renames(args.rename))
    text = report(run, rows, ", ".join([args.json] + others))
    print(text, end="")
    if args.out:
        weights.atomic_write(args.out, text)       # whole or not at all: a stopped write leaves the old file
    return text


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"paired.py: error: {e}")
