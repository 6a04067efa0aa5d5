"""
The statistics an accuracy claim needs (pure functions, no torch):

    wilson(k, n)            95% Wilson score interval of a success rate k / n
    mcnemar(a, b)           paired exact McNemar test of two caches on the same records: (wins, losses, p)
    bootstrap_mean(xs)      95% percentile bootstrap interval of a mean (perplexity over windows)

Why these: at 30 records 28/30 has a 95% interval of 78-98%, so 93% and 100% cannot be told apart unpaired. When two
caches answer the *same* records, only the records where they disagree carry information about which is better;
McNemar's exact test asks whether those discordant records split more unevenly than a fair coin would.
"""
import math
import random

Z95 = 1.959963984540054   # the standard normal's 97.5% quantile


def wilson(k, n, z=Z95):
    """(low, high) of the Wilson score interval for k successes in n trials, as fractions in [0, 1]."""
    if n <= 0:
        raise ValueError(f"wilson: n={n} records; an interval needs at least one")
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} successes out of n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a, b):
    """Paired exact McNemar test. a, b: per-record correctness (bools) of two caches on the same records, in the
    same order. -> (wins, losses, p): records a answers and b does not, the reverse, and the two-sided exact p of
    so uneven a split under Binomial(wins + losses, 1/2) (p = 1 when they never disagree)."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar: {len(a)} and {len(b)} records; a paired test needs the same records for both")
    wins = sum(1 for x, y in zip(a, b) if x and not y)
    losses = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return wins, losses, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return wins, losses, min(1.0, 2 * tail)


def bootstrap_mean(xs, reps=10000, seed=0, level=0.95):
    """(low, high) percentile bootstrap interval of mean(xs): resample the values with replacement `reps` times."""
    xs = list(xs)
    if not xs:
        raise ValueError("bootstrap_mean: no values")
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(rng.choice(xs) for _ in range(n)) / n for _ in range(reps))
    lo = means[int((1 - level) / 2 * reps)]
    hi = means[min(reps - 1, int((1 + level) / 2 * reps))]
    return lo, hi


def fmt_rate(k, n):
    """'93.0% [85.2, 96.9]' : the rate and its Wilson interval, in percent."""
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
