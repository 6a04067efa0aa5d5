"""experiments/stats.py against hand-computed cases."""
import math

import pytest

import stats


def test_wilson_hand_computed():
    # 28/30: p = 0.9333, z = 1.96; centre = (p + z^2/60) / (1 + z^2/30), half = z/(1 + z^2/30) sqrt(p q/30 + z^2/3600)
    lo, hi = stats.wilson(28, 30)
    assert lo == pytest.approx(0.7868, abs=1e-4) and hi == pytest.approx(0.9815, abs=1e-4)
    assert stats.wilson(0, 10)[0] == 0.0 and stats.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert stats.wilson(10, 10)[1] == pytest.approx(1.0) and stats.wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert stats.wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    with pytest.raises(ValueError, match="at least one"):
        stats.wilson(0, 0)


def test_mcnemar_hand_computed():
    # 5 discordant records, all won by a: p = 2 * (1/2)^5 = 0.0625
    a = [True] * 5 + [True] * 10 + [False] * 3
    b = [False] * 5 + [True] * 10 + [False] * 3
    assert stats.mcnemar(a, b) == (5, 0, pytest.approx(0.0625))
    # 7 won, 1 lost: p = 2 * (C(8,0) + C(8,1)) / 2^8 = 18/256
    a = [True] * 7 + [False] + [True] * 4
    b = [False] * 7 + [True] + [True] * 4
    assert stats.mcnemar(a, b) == (7, 1, pytest.approx(18 / 256))
    assert stats.mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    assert stats.mcnemar([True, False], [False, True])[2] == 1.0            # an even split: p capped at 1
    with pytest.raises(ValueError, match="same records"):
        stats.mcnemar([True], [True, False])


def test_bootstrap_covers_the_mean():
    xs = [10.0, 11.0, 12.0, 13.0, 30.0]
    lo, hi = stats.bootstrap_mean(xs, reps=2000)
    assert lo < sum(xs) / len(xs) < hi and lo >= min(xs) and hi <= max(xs)
    assert stats.bootstrap_mean([5.0] * 4) == (5.0, 5.0)
    assert stats.fmt_rate(28, 30) == "93.3% [78.7, 98.2]"


def test_paired_report_pairs_the_same_records(tmp_path):
    import json
    import paired
    rec = lambda cs: {"1024": [[(i + 0.5) / len(cs), c] for i, c in enumerate(cs)]}
    run = {"meta": {"command": "test"}, "rows": [
        {"label": "dense fp16", "records": rec([True] * 6), "real_at": {"1024": 1.0}},
        {"label": "ZipCache default", "records": rec([True, True, False, True, False, True]), "real_at": {"1024": 4.6}},
        {"label": "KIVI-2", "records": rec([False, True, True, True, False, False]), "real_at": {"1024": 4.7}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    text = paired.main([str(path), "--out", str(tmp_path / "p.md")])
    assert "| ZipCache default (4.60x) | 4/6 = 66.7% [30.0, 90.3] |" in text
    assert "| ZipCache default vs dense fp16 | 1024 | 6 | 0 | 2 | 0.5 |" in text
    assert "| ZipCache default vs KIVI-2 | 1024 | 6 | 2 | 1 | 1 |" in text
    assert (tmp_path / "p.md").read_text() == text
    run["rows"][2]["records"]["1024"][0][0] = 0.9                 # another record: pairing must refuse
    path.write_text(json.dumps(run))
    import pytest
    with pytest.raises(ValueError, match="not paired"):
        paired.main([str(path)])


def test_paired_joins_an_earlier_run_with_renamed_rows(tmp_path):
    import json
    import paired
    import pytest
    rec = lambda cs: {"1024": [[(i + 0.5) / len(cs), c] for i, c in enumerate(cs)]}
    old = {"meta": {"command": "old"}, "rows": [
        {"label": "dense fp16", "records": rec([True] * 4)},
        {"label": "ZipCache default", "records": rec([True, False, False, True])}]}
    new = {"meta": {"command": "new"}, "rows": [{"label": "ZipCache default", "records": rec([True, True, True, False])}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    text = paired.main([str(tmp_path / "new.json"), "--with", str(tmp_path / "old.json"),
                        "--rename", "ZipCache default=ZipCache default, 2-bit keys"])
    assert "| ZipCache default vs dense fp16 | 1024 | 4 | 0 | 1 | 1 |" in text          # the new row, the old dense
    assert "| ZipCache default vs ZipCache default, 2-bit keys | 1024 | 4 | 2 | 1 | 1 |" in text
    assert "| ZipCache default, 2-bit keys | 2/4" in text
    text = paired.main([str(tmp_path / "new.json"), "--with", str(tmp_path / "old.json")])   # not renamed:
    assert "| ZipCache default | 3/4" in text and "2/4" not in text                  # the main file's row wins
    with pytest.raises(ValueError, match="not OLD LABEL=NEW LABEL"):
        paired.main([str(tmp_path / "new.json"), "--with", str(tmp_path / "old.json"), "--rename", "x"])


def test_paired_perplexity_bootstrap(tmp_path):
    import json
    import math
    import paired
    import pytest
    dense = [2.0, 2.2, 1.9, 2.1]
    zip_ = [x + 0.05 for x in dense]                                  # +0.05 nats in every window: exactly +5.13%
    kivi = [x + d for x, d in zip(dense, [0.1, 0.3, 0.2, 0.0])]        # +0.15 nats on average, spread
    run = {"meta": {"command": "test"}, "rows": [
        {"label": "dense fp16", "ppl": math.exp(sum(dense) / 4), "ppl_window_nll": dense, "ppl_real": 1.0},
        {"label": "ZipCache default", "ppl": math.exp(sum(zip_) / 4), "ppl_window_nll": zip_, "ppl_real": 4.5},
        {"label": "KIVI-2", "ppl": math.exp(sum(kivi) / 4), "ppl_window_nll": kivi, "ppl_real": 4.7}]}
    path = tmp_path / "ppl.json"
    path.write_text(json.dumps(run))
    text = paired.main([str(path)])
    assert "| ZipCache default | 4.50x | 8.166 | +5.1% [+5.1, +5.1] |" in text   # a constant difference: no spread
    c, lo, hi = paired.ppl_change(kivi, dense)
    assert c == pytest.approx(100 * (math.exp(0.15) - 1)) and lo < c < hi
    assert lo >= 100 * (math.exp(0.0) - 1) and hi <= 100 * (math.exp(0.3) - 1)   # within the windows' own range
    assert "ZipCache default against KIVI-2, same windows: -9.5% [" in text
    with pytest.raises(ValueError, match="not paired"):
        paired.ppl_change(dense[:3], zip_)


def test_frontier_pools_the_shared_lengths(tmp_path):
    import json
    import frontier
    rec = lambda cs: [[(i + 0.5) / len(cs), c] for i, c in enumerate(cs)]
    row = lambda label, cache, opts, group, recs, ratio, ppl=None: dict(
        label=label, cache=cache, opts=opts, group=group, records=recs, real_at={L: ratio for L in recs}, ppl=ppl)
    run = {"rows": [
        row("dense fp16", "dense", {}, "main", {"1024": rec([True] * 4)}, 1.0),
        row("ZipCache default", "zipcache", {}, "main", {"1024": rec([True, True, False, True]),
                                                         "4096": rec([False] * 4)}, 4.6, 12.0),
        row("KIVI-2", "kivi", {"bits": 2}, "main", {"1024": rec([True, False, False, True])}, 3.9, 15.0),
        row("H2O (10% kept)", "h2o", {"keep_ratio": 0.1}, "sweep", {"1024": rec([False] * 4)}, 9.8)]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    shared, pts = frontier.main([str(path), "--out", str(tmp_path / "f")])
    assert shared == ["1024"]                                   # 4096 is not shared by every row: left out
    assert [(p[0], p[3], p[4]) for p in pts] == [("H2O", 0, 4), ("KIVI", 2, 4), ("ZipCache", 3, 4)]
    assert (tmp_path / "f.md").read_text().count("|") > 10 and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    # a second run on the same records joins (its dense row is dropped: the first run's label wins); one on other
    # records is refused
    run2 = {"rows": [row("dense fp16", "dense", {}, "main", {"1024": rec([True] * 4)}, 1.0),
                     row("KIVI-2 (group 64)", "kivi", {"bits": 2, "group": 64}, "sweep",
                         {"1024": rec([True, False, True, True])}, 4.9),
                     row("ZipCache key groups of 64", "zipcache", {"k_group": 64, "k_low_bits": 0}, "sweep",
                         {"1024": rec([True] * 4)}, 4.8),
                     row("ZipCache 4-bit keys, 50% salient", "zipcache", {"salient_ratio": 0.5, "k_low_bits": 4},
                         "sweep", {"1024": rec([True] * 4)}, 4.3)]}
    path2 = tmp_path / "run2.json"
    path2.write_text(json.dumps(run2))
    shared, pts = frontier.main([f"{path},{path2}"])
    assert [(p[0], p[1], p[3]) for p in pts if p[1] != "H2O (10% kept)"] == [
        ("KIVI", "KIVI-2", 2), ("KIVI", "KIVI-2 (group 64)", 3), ("ZipCache", "ZipCache default", 3),
        ("ZipCache key-group sweep", "ZipCache key groups of 64", 4),
        ("ZipCache, 4-bit keys", "ZipCache 4-bit keys, 50% salient", 4)]          # the 4-bit-key curve, its own
    run2["rows"][0]["records"]["1024"][1][0] = 0.99
    path2.write_text(json.dumps(run2))
    import pytest
    with pytest.raises(ValueError, match="not those of"):
        frontier.main([f"{path},{path2}"])
