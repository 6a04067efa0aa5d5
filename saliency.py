"""
Token saliency for mixed-precision / eviction caches (pure tensor functions).

    probe_positions   which query rows to materialize at prefill (recent, random, recent+random, special, all)
    column_scores     accumulated (H2O, MiKV), normalized (ZipCache) or locality scores from attention rows
    probe_scores      softmax(q[probes] k^T / sqrt(D)) with causal rows, summed per (sequence, KV head)
    split             salient / regular token indices per (sequence, KV head)

Why normalized: column j of a causal attention matrix has L - j nonzero entries, and early rows have few softmax
competitors, so the plain column sum (accumulated attention) favours early tokens (ZipCache paper, Fig. 3).
Dividing by the number of rows that can see token j removes that bias.
"""
import math

import torch

PROBE_MODES = ("recent+random", "recent", "random", "special", "all")
SCORES = ("normalized", "accumulated", "locality")
NORMS = ("full", "probe")


def probe_positions(L, mode="recent+random", recent=0.05, random=0.05, generator=None, special=None):
    """int64 [P] query positions whose attention rows are materialized.

    recent: n_rec = L - floor(L - recent*L) >= 1 newest positions [L - n_rec, L) (so the last token is always one).
    random: n_rnd = floor(random*L) positions drawn uniformly *with replacement* (duplicates count twice, as in the
            official code) from [0, L - n_rec) -- the positions not already recent -- with `generator` (a seeded CPU
            torch.Generator, so CPU and GPU runs agree). "random" alone draws from [0, L), at least one.
    special: the given positions (e.g. of newline/punctuation tokens, see special_positions), deduplicated; the
            last position if none falls inside the prompt. (Table 2's "special tokens" probes: its exact token set
            is not public, so the caller chooses it.)
    all:    every row (the exact score; tests).
    """
    if mode not in PROBE_MODES:
        raise ValueError(f"probe mode {mode!r} is unknown; use one of {PROBE_MODES}")
    if L < 1:
        raise ValueError("probe_positions: the prompt is empty; prefill needs at least one token")
    if mode == "all":
        return torch.arange(L)
    if mode == "special":
        if special is None:
            raise ValueError("probe mode 'special' needs the special-token positions; pass special=... "
                             "(ZipCache: call cache.set_special_positions(...) before prefill)")
        pos = torch.unique(torch.as_tensor(special, dtype=torch.long).flatten())
        pos = pos[(pos >= 0) & (pos < L)]
        return pos if pos.numel() else torch.tensor([L - 1])
    n_rec = L - math.floor(L - recent * L) if "recent" in mode else 0
    n_rnd = math.floor(random * L) if "random" in mode else 0
    if mode == "random":
        n_rnd = max(n_rnd, 1)
    parts = [torch.arange(L - n_rec, L)]
    if n_rnd > 0 and L - n_rec > 0:
        parts.insert(0, torch.randint(0, L - n_rec, (n_rnd,), generator=generator))
    return torch.cat(parts)


def special_positions(ids, special_ids):
    """Positions (int64, sorted, union over the batch) where ids [B, L] hold one of `special_ids`."""
    ids = torch.as_tensor(ids)
    hit = torch.isin(ids, torch.as_tensor(list(special_ids), dtype=ids.dtype, device=ids.device))
    return hit.reshape(-1, ids.shape[-1]).any(0).nonzero().flatten().cpu()


def column_scores(attn, rows, L, score="normalized", norm="full"):
    """Scores [..., L] from attention rows attn [..., P, L] (probabilities) at query positions rows [P].

    accumulated: p_j = sum_i A[i, j]                                        (H2O, MiKV)
    normalized:  p_j = sum_i A[i, j] / n_j, n_j = L - j ("full", the official divisor although only the probe
                 rows are summed) or the number of probe rows at positions >= j ("probe", the exact count, >= 1)
    locality:    p_j = j                                                    (a recency baseline, paper Table A)
    """
    return normalize_columns(attn.float().sum(-2), rows, L, score, norm)


def normalize_columns(col, rows, L, score="normalized", norm="full"):
    """Column sums col [..., L] -> scores, as column_scores describes."""
    if score not in SCORES:
        raise ValueError(f"score {score!r} is unknown; use one of {SCORES}")
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r} is unknown; use one of {NORMS}")
    if score == "locality":
        return torch.arange(L, dtype=torch.float32, device=col.device).expand(*col.shape[:-1], L)
    if score == "accumulated":
        return col
    j = torch.arange(L, device=col.device)
    if norm == "full":
        n = (L - j).float()
    else:
        # number of probe rows i with rows[i] >= j: a reversed cumulative count, duplicates included
        cnt = torch.bincount(rows.to(col.device), minlength=L).flip(0).cumsum(0).flip(0)
        n = cnt.float().clamp_min(1)
    return col / n


def group_sum(x, n_kv_heads):
    """[B, H, ...] -> [B, H_kv, ...], summing the g = H / H_kv query heads that read each KV head."""
    return x.unflatten(1, (n_kv_heads, -1)).sum(2)


def probe_attention(q, k, rows, sm_scale=None):
    """Materialized causal attention rows for one group: q [B, g, P, D] at positions rows [P], k [B, L, D]
    -> fp32 probabilities [B, g, P, L] (row i sees keys j <= rows[i])."""
    L, D = k.shape[-2], k.shape[-1]
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    s = (q.float() * sm_scale) @ k.float()[:, None].transpose(-1, -2)               # [B, g, P, L]
    lo = max(0, min(L, int(rows.min()) + 1))  # no row masks a key before its earliest position + 1
    masked = torch.arange(lo, L, device=k.device)[None, :] > rows.to(k.device)[:, None]  # [P, L - lo], True = future
    s[..., lo:].masked_fill_(masked, float("-inf"))
    return s.softmax(-1)


def probe_scores(q, k, rows, score="normalized", norm="full", sm_scale=None, chunk=32):
    """Saliency [B, H_kv, L] fp32 from the probe rows only.

    q [B, H, L, D], k [B, H_kv, L, D] (RoPE applied). Query head i reads KV head i // g; the g heads of a group are
    summed. Memory: one KV-head group and `chunk` probe rows at a time, so at most B * g * chunk * L fp32 values
    are live (the official code materializes every head at once). Speed: the rows are processed in position order,
    and a chunk whose last row sits at position m only scores keys [0, m] (column sums ignore row order).
    """
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    g = H // H_kv
    if score == "locality":
        return normalize_columns(q.new_zeros(B, H_kv, L, dtype=torch.float32), rows, L, score)
    srt = rows.cpu().sort().values
    col = torch.zeros(B, H_kv, L, dtype=torch.float32, device=q.device)
    for h in range(H_kv):
        for c0 in range(0, len(srt), chunk):
            r = srt[c0:c0 + chunk]
            m = int(r[-1]) + 1
            rd = r.to(q.device)
            a = probe_attention(q[:, h * g:(h + 1) * g, rd], k[:, h, :m], rd, sm_scale)  # [B, g, p, m]
            col[:, h, :m] += a.sum((1, 2))
    return normalize_columns(col, rows, L, score, norm)


# -----------------------------------------------------------------------------
# decode time: the scores of a block of N decode tokens, from the block's own queries (README "ZipCache in five steps")

def decode_probabilities(q, k_buf, lse):
    """One decode query's attention probability of each buffered token, summed over the query heads of its KV group:
    q [B, H, D], k_buf [B, H_kv, n, D], lse [B, H] (natural-log logsumexp over the whole cache, from the decode
    kernel) -> [B, H_kv, n]. exp(q·k/sqrt(D) - lse) is the token's true softmax probability, so the compressed part
    of the cache is not read again."""
    B, H, D = q.shape
    Hkv = k_buf.shape[1]
    s = q.float().reshape(B, Hkv, H // Hkv, 1, D) @ k_buf.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, g, 1, n]
    return torch.exp(s[..., 0, :] * D ** -0.5 - lse.view(B, Hkv, H // Hkv, 1)).sum(2)


def normalize_block(acc, n_tail=0):
    """Accumulated probabilities acc [..., N] of a block -> normalized scores, as at the prefill: row j was seen
    by the N - j decode queries from its own on, so it is divided by N - j; the n_tail prompt rows buffered in front
    of the decode tokens (ZipCacheConfig.n_recent) were seen by all N - n_tail of them."""
    N = acc.shape[-1]
    return acc / (N - torch.arange(N, device=acc.device).clamp(min=n_tail))


# -----------------------------------------------------------------------------
# the split

def pool_scores(scores, w):
    """scores [..., L] -> their mean over the 2w+1 positions around each one (fewer at the ends), so that the tokens
    next to a salient one score high too (SnapKV pools its scores the same way before picking tokens)."""
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])                                                  # [N, 1, L]
    summed = torch.nn.functional.avg_pool1d(x, 2 * w + 1, stride=1, padding=w, count_include_pad=False)
    return summed.reshape(shape)


def n_regular(n, salient_ratio):
    """n_lo = floor((1 - r) * n), guarded against float error (1 - 0.9 = 0.0999...)."""
    return min(n, max(0, math.floor((1.0 - salient_ratio) * n + 1e-9)))


def split(scores, salient_ratio):
    """scores [B, H_kv, n] -> (hi, lo) int64 indices [B, H_kv, n_hi] / [B, H_kv, n_lo], each ascending.

    The n_lo = floor((1 - r) n) lowest-scored tokens are regular. A stable sort breaks ties: the earlier
    position goes regular first, identically on CPU and GPU. Equal counts for every (b, h) is what lets the cache
    keep one row table per sequence.
    """
    n = scores.shape[-1]
    n_lo = n_regular(n, salient_ratio)
    order = torch.sort(scores, dim=-1, stable=True).indices  # ascending score; ties keep position order
    lo = order[..., :n_lo].sort(-1).values
    hi = order[..., n_lo:].sort(-1).values
    return hi, lo
