"""
The accuracy-vs-bytes frontier: each method's passkey accuracy (pooled over the lengths every row ran, with its 95%
Wilson interval) and perplexity against its real compression ratio, over the settings of its own knobs that the
eval.py runs hold (ZipCache's salient ratio and key-group size, KIVI's bits and group, MiKV's salient ratio, H2O's
keep ratio).

    python experiments/frontier.py results/real/eval.json --out results/real/frontier
    python experiments/frontier.py results/real/eval.json,results/real/sweep2.json --out results/real/frontier

Several runs join only when they ran the same records (their dense rows' records agree at the shared lengths); a
label held by two runs is taken from the first.

writes FRONTIER.md (the table) and FRONTIER.png (the two panels). The claim it tests: ZipCache's points lie above
every other method's at every ratio from 3.5x to 6x.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the flat core, one folder up

import stats
import weights
from experiment_flags import Parser

METHODS = (("ZipCache", "zipcache"), ("KIVI", "kivi"), ("MiKV", "mikv"), ("H2O", "h2o"))


def points(rows):
    """(method, label, real ratio, correct, records, perplexity or None) for every row of the comparison and the sweep,
    pooled over the lengths all those rows share."""
    rows = [r for r in rows if r.get("group") in ("main", "sweep") and r.get("records") and r["cache"] != "dense"]
    shared = sorted(set.intersection(*(set(r["records"]) for r in rows)), key=int)
    out = []
    for r in rows:
        method = next((m for m, c in METHODS if r["cache"] == c), None)
        if method is None:
            continue
        if r["cache"] == "zipcache" and (r["opts"].get("paper") or r["opts"].get("k_stat_bits")):
            method = "ZipCache paper preset" if r["opts"].get("paper") else "ZipCache fp16 key stats"
        elif r["cache"] == "zipcache" and r["opts"].get("k_low_bits"):
            method = "ZipCache, 4-bit keys"                 # the current default's salient-ratio curve
        elif r["cache"] == "zipcache" and r["opts"].get("k_group"):
            method = "ZipCache key-group sweep"
        rec = [c for L in shared for _, c in r["records"][L]]
        ratio = sum(r["real_at"][L] for L in shared) / len(shared)
        out.append((method, r["label"], ratio, sum(rec), len(rec), r.get("ppl")))
    return shared, sorted(out, key=lambda p: (p[0], p[2]))


def joined_rows(paths):
    """The rows of one or more eval.py runs on the same passkey records, each label once (the first run's)."""
    rows, dense = {}, None
    for path in paths:
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable eval.py JSON ({e})")
        d = next((r for r in run.get("rows", []) if r.get("cache") == "dense" and r.get("records")), None)
        if dense is not None and d is not None:
            for L in set(dense["records"]) & set(d["records"]):       # the same records, in any order (shards)
                if sorted(x for x, _ in dense["records"][L]) != sorted(x for x, _ in d["records"][L]):
                    raise ValueError(f"{path}: its passkey records at {L} are not those of {paths[0]} (depths "
                                     f"differ); join runs made with the same --n and --seed")
        dense = dense or d
        for r in run.get("rows", []):
            rows.setdefault(r["label"], r)
    return list(rows.values())


def table(shared, pts, path):
    lines = [f"# Passkey and perplexity against real bytes\n", f"Source `{path}`; passkey pooled over lengths "
             f"{', '.join(shared)} (the lengths every row ran), 95% Wilson interval; real ratio averaged over them.\n",
             "| method | setting | real ratio | passkey | perplexity |", "|---|---|---|---|---|"]
    for m, label, ratio, k, n, ppl in pts:
        lines.append(f"| {m} | {label} | {ratio:.2f}x | {stats.fmt_rate(k, n)} | {f'{ppl:.2f}' if ppl else '-'} |")
    return "\n".join(lines) + "\n"


def plot(pts, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in sorted({p[0] for p in pts}):
        mine = [p for p in pts if p[0] == m]
        x = [p[2] for p in mine]
        acc = [100 * p[3] / p[4] for p in mine]
        err = [[max(0.0, 100 * (p[3] / p[4] - stats.wilson(p[3], p[4])[0])) for p in mine],     # rounding at 0%
               [max(0.0, 100 * (stats.wilson(p[3], p[4])[1] - p[3] / p[4])) for p in mine]]    # and at 100%
        a.errorbar(x, acc, yerr=err, marker="o", capsize=3, label=m)
        with_ppl = [p for p in mine if p[5]]
        if with_ppl:
            b.plot([p[2] for p in with_ppl], [p[5] for p in with_ppl], "o", label=m)
    a.axvspan(3.5, 6, color="grey", alpha=0.1)
    a.set(xlabel="real compression ratio (every byte counted)", ylabel="passkey accuracy (%)",
          title="passkey (95% Wilson intervals)")
    b.set(xlabel="real compression ratio", ylabel="perplexity", title="perplexity (main rows only)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    weights.atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return True


def main(argv=None):
    p = Parser(prog="frontier.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("json", help="an eval.py results JSON (real model), or a comma list of runs on the same records")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.png (atomically)")
    args = p.parse_args(argv)
    shared, pts = points(joined_rows(args.json.split(",")))
    if not pts:
        raise ValueError(f"{args.json}: no compressed cache has passkey records; run experiments/eval.py first")
    text = table(shared, pts, args.json)
    print(text, end="")
    if args.out:
        weights.atomic_write(args.out + ".md", text)
        print(f"wrote {args.out}.md" + (f", {args.out}.png" if plot(pts, args.out + ".png") else
                                        " (matplotlib is not installed: no plot)"))
    return shared, pts


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"frontier.py: error: {e}")
