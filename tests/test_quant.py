"""quant.py: quantizer error bounds, packing bit order and round trip, granularities, CST, fake-quant STE."""
import pytest
import torch

import quant


def _bound(scale, mn):
    # per-element error bound: half a step, plus the fp16 rounding of the stored min (|mn| * 2^-11)
    # and a little fp32 slack for the division/multiplication.
    return scale.float() / 2 + mn.float().abs() * 2 ** -11 + 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("D", [4, 64, 128])
def test_pack_unpack_roundtrip(bits, D):
    g = torch.Generator().manual_seed(bits * 1000 + D)
    codes = torch.randint(0, 2 ** bits, (3, 5, D), generator=g).to(torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, D * bits // 8)
    assert torch.equal(quant.unpack(packed, bits), codes)


def test_pack_bit_order_is_planar():
    # the planar packing (README "ZipCache in five steps"): 4-bit byte j = x[j] | x[j+D/2] << 4;
    # 2-bit byte j = x[j] | x[j+D/4]<<2 | x[j+D/2]<<4 | x[j+3D/4]<<6
    x = torch.tensor([1, 2, 3, 0, 3, 1, 0, 2], dtype=torch.uint8)
    p2 = quant.pack(x, 2)
    assert p2.tolist() == [1 | 3 << 2 | 3 << 4 | 0 << 6, 2 | 0 << 2 | 1 << 4 | 2 << 6]
    x4 = torch.tensor([1, 15, 7, 0], dtype=torch.uint8)
    assert quant.pack(x4, 4).tolist() == [1 | 7 << 4, 15 | 0 << 4]


def test_pack_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits=3"):
        quant.pack(torch.zeros(8, dtype=torch.uint8), 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_matches_formula_and_error_bound(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 40, 16, generator=g) * 3 + 1
    codes, scale, mn = quant.quantize(x, bits, dim=-1)
    assert codes.dtype == torch.uint8 and scale.dtype == mn.dtype == torch.float16
    assert scale.shape == mn.shape == (2, 3, 40, 1)
    # independent formula
    s = ((x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2 ** bits - 1)).clamp_min(2 ** -14).half()
    m = x.amin(-1, keepdim=True).half()
    q = torch.clamp(torch.round((x - m.float()) / s.float()), 0, 2 ** bits - 1)
    assert torch.equal(scale, s) and torch.equal(mn, m) and torch.equal(codes.float(), q)
    assert int(codes.max()) <= 2 ** bits - 1
    err = (quant.dequantize(codes, scale, mn) - x).abs()
    assert (err <= _bound(scale, mn)).all()


def test_round_half_to_even_and_clamp():
    # codes land exactly on .5 -> torch.round rounds half to even
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0]])
    codes, scale, mn = quant.quantize(x, 2, dim=-1)  # scale = 1, mn = 0
    assert float(scale) == 1.0 and codes.tolist() == [[0, 0, 2, 2, 3]]


@pytest.mark.parametrize("gran", ["tokenwise", "channelwise", "groupwise_ch", "groupwise_tok", "cst"])
@pytest.mark.parametrize("bits", [2, 4])
def test_granularity_error_bounds(gran, bits):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 64, 64, generator=g)
    x[..., 5] *= 20  # an outlier channel (keys have them)
    if gran == "tokenwise":
        c, s, m = quant.quantize_tokenwise(x, bits)
        assert s.shape == (2, 2, 64, 1)
        xh = quant.dequantize(c, s, m)
        bound = _bound(s, m)
    elif gran == "channelwise":
        c, s, m = quant.quantize_channelwise(x, bits)
        assert s.shape == (2, 2, 1, 64)
        xh = quant.dequantize(c, s, m)
        bound = _bound(s, m)
    elif gran.startswith("groupwise"):
        dim = -1 if gran.endswith("ch") else -2
        c, s, m = quant.quantize_groupwise(x, bits, group=32, dim=dim)
        assert c.shape == x.shape
        assert s.shape == ((2, 2, 64, 2, 1) if dim == -1 else (2, 2, 2, 1, 64))
        xh = quant.dequantize_groupwise(c, s, m, group=32, dim=dim)
        # broadcast the per-group bound back to elements
        bound = quant.dequantize_groupwise(torch.ones_like(c), _bound(s, m), torch.zeros_like(m), 32, dim)
    else:
        c, s, m, ch = quant.quantize_cst(x, bits)
        assert ch.shape == (2, 2, 1, 64) and ch.dtype == torch.float16
        xh = quant.dequantize_cst(c, s, m, ch)
        bound = ch.float() * _bound(s, m) * (1 + 1e-6)  # the error of x/c scales back by c
    assert xh.shape == x.shape
    assert ((xh - x).abs() <= bound).all()


def test_groupwise_needs_divisible_size():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quant.quantize_groupwise(torch.randn(4, 48), 4, group=32)


def test_constant_group_is_finite_and_exact():
    # a constant not representable in fp16: the eps-sized scale lets the codes absorb mn's rounding
    x = torch.full((3, 8), 0.3333)
    c, s, m = quant.quantize(x, 2, dim=-1)
    xh = quant.dequantize(c, s, m)
    assert torch.isfinite(xh).all() and ((xh - x).abs() <= 0.3333 * 2 ** -11).all()  # exact up to fp16
    # an fp16-exact constant reconstructs bit-exactly, also through fake_quant
    x = torch.full((3, 8), 0.25)
    c, s, m = quant.quantize(x, 2, dim=-1)
    assert torch.equal(quant.dequantize(c, s, m), x) and torch.equal(quant.fake_quant(x, 2, dim=-1), x)
    # the official code has no epsilon: 0/0 = NaN (kept reachable through fake_quant for ablations)
    assert torch.isnan(quant.fake_quant(x, 2, dim=-1, scale_eps=0)).all()
    # the uint8 path defines that code as 0, so a cache in official mode stays finite and exact
    c0, s0, m0 = quant.quantize(x, 2, dim=-1, scale_eps=0)
    assert torch.equal(quant.dequantize(c0, s0, m0), x)


def test_outliers_finite():
    x = torch.randn(4, 64)
    x[1, 3] = 6e4  # near the fp16 max
    for bits in (2, 4):
        c, s, m = quant.quantize(x, bits, dim=-1)
        assert torch.isfinite(quant.dequantize(c, s, m)).all()
        c, s, m, ch = quant.quantize_cst(x.unsqueeze(0), bits)
        assert torch.isfinite(quant.dequantize_cst(c, s, m, ch)).all()


def test_non_finite_input_is_a_clear_error():
    x = torch.randn(4, 8)
    x[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize(x, 4, dim=-1)
    x[2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.fake_quant(x, 4, dim=-1)


def test_bad_bits():
    with pytest.raises(ValueError, match="bits=0"):
        quant.quantize(torch.randn(4), 0, dim=-1)


def test_cst_normalizer_zeros_and_ties():
    # V [T=3, D=4]: channel 0 all zero, channel 1 has tied |max| (+-4), channel 2 all negative, channel 3 mixed
    v = torch.tensor([[0.0, 4.0, -1.0, 0.5],
                      [0.0, -4.0, -9.0, -0.25],
                      [0.0, 1.0, -2.0, 0.0]])
    ch = quant.cst_normalizer(v)
    assert ch.tolist() == [[2 ** -14, 2.0, 3.0, float(torch.tensor(0.5).sqrt().half())]]
    c, s, m, ch2 = quant.quantize_cst(v, 4)
    vh = quant.dequantize_cst(c, s, m, ch2)
    assert torch.isfinite(vh).all()
    # the zero channel shares its tokens' (scale, mn), so its error is c * half a step: scale_eps-small
    assert (vh[:, 0].abs() <= 2 ** -14 * _bound(s, m)[:, 0]).all()
    # official mode (no epsilon): c = 0 for the zero channel; it reconstructs as exact zeros, never NaN
    c, s, m, ch0 = quant.quantize_cst(v, 4, scale_eps=0)
    assert float(ch0[0, 0]) == 0.0
    vh0 = quant.dequantize_cst(c, s, m, ch0)
    assert torch.isfinite(vh0).all() and (vh0[:, 0] == 0).all()


def test_cst_row_scope_one_pair_per_row():
    # token_dims=(1, -1) on [B, H, T, D]: one (scale, mn) per (b, t) over all heads (official "row" scope)
    x = torch.randn(2, 3, 5, 8)
    c, s, m, ch = quant.quantize_cst(x, 2, token_dims=(1, -1))
    assert s.shape == (2, 1, 5, 1) and ch.shape == (2, 3, 1, 8)
    xn = x / ch.float()
    s_ref = ((xn.amax((1, 3), keepdim=True) - xn.amin((1, 3), keepdim=True)) / 3).clamp_min(2 ** -14).half()
    assert torch.equal(s, s_ref)


def test_fake_quant_ste_gradient_and_value():
    x = torch.randn(4, 16, requires_grad=True)
    y = quant.fake_quant(x, 4, dim=-1)
    c, s, m = quant.quantize(x.detach(), 4, dim=-1)
    assert torch.equal(y.detach(), quant.dequantize(c, s, m))  # same value as the uint8 path
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through: identity gradient
    x2 = x.detach().clone().requires_grad_()
    y2 = quant.fake_quant(x2, 4, dim=-1, ste=False)
    assert not y2.requires_grad  # rounding has no gradient without the STE


def test_fake_quant_keeps_dtype():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert quant.fake_quant(x, 4, dim=-1).dtype == torch.bfloat16


def test_nested_one_sub_group_is_plain_quantize():
    # one sub-group along sub_dim: the nested statistics are the plain fp16 pair (base = (mn, 0, scale, 0), codes 0)
    x = torch.randn(2, 3, 1, 40, 16, generator=torch.Generator().manual_seed(0)) * 3
    codes, stat, base = quant.quantize_nested(x, 2, dim=3, sub_dim=2)
    c0, s0, m0 = quant.quantize(x, 2, dim=3)
    assert torch.equal(codes, c0) and not stat.any()
    s, m = quant.dequantize_nested(stat, base)
    assert torch.equal(s, s0) and torch.equal(m, m0)


@pytest.mark.parametrize("bits", [2, 4])
def test_nested_stats_cover_every_sub_group(bits):
    # 12 sub-groups of 16 rows with very different ranges: the nested min is rounded down and the scale up, so no
    # value is clipped, and the step is never finer than the sub-group's own (the price of 4-bit statistics)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 16, 8, generator=g) * torch.rand(1, 12, 1, 8, generator=g) * 5 \
        + torch.randn(1, 12, 1, 8, generator=g) * 3                                         # [B, n_sub, rows, D]
    codes, stat, base = quant.quantize_nested(x, bits, dim=2, sub_dim=1)
    assert stat.shape == (1, 12, 1, 8) and base.shape == (1, 1, 1, 4, 8)
    s, m = quant.dequantize_nested(stat, base)                                              # fp16 [1, 12, 1, 8]
    L = 2 ** bits - 1
    _, s_own, _ = quant.quantize(x, bits, dim=2)
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    fp16 = 2 ** -10 * (m.float().abs() + L * s.float() + hi.abs())   # the nested values are rounded to fp16
    assert (m.float() <= lo + fp16).all() and (m.float() + L * s.float() >= hi - fp16).all()
    assert (s.float() >= s_own.float() * (1 - 2 ** -10)).all()
    # the codes are plain asymmetric quantization with the nested (scale, min): error at most half a step
    err = (codes.float() * s.float() + m.float() - x).abs()
    assert (err <= 0.5 * s.float() + fp16).all()
    assert not torch.equal(s, s_own)   # the nested values really are a coarser grid than the own fp16 pairs


@pytest.mark.parametrize("n", [1, 3, 11, 13])       # 13 runs of 11 rows: two empty runs
@pytest.mark.parametrize("pool", [False, True])
def test_quantize_runs_is_each_run_alone(n, pool):
    x = torch.randn(2, 3, 11, 8, generator=torch.Generator().manual_seed(n))
    codes, (scale, mn) = quant.quantize_runs(x, 2, n, pool=pool)
    assert codes.shape == x.shape and scale.shape == mn.shape == (1 if pool else 2, 3, n, 8)
    for j, rows in enumerate(torch.arange(11).tensor_split(n)):   # tensor_split's runs of consecutive rows
        if len(rows) == 0:
            assert not scale[:, :, j].any() and not mn[:, :, j].any()
            continue
        c, s, m = quant.quantize(x[:, :, rows], 2, dim=(0, 2) if pool else 2)
        assert torch.equal(codes[:, :, rows], c)
        assert torch.equal(scale[:, :, j], s[:, :, 0]) and torch.equal(mn[:, :, j], m[:, :, 0])
    # nested: the same codes as quantize_nested over the padded runs, and no rows gives zero statistics
    codes_n, (stat, base) = quant.quantize_runs(x, 4, n, pool=pool, nested=True)
    assert codes_n.shape == x.shape and stat.shape == scale.shape and base.shape == (scale.shape[0], 3, 1, 4, 8)
    empty, (z_stat, z_base) = quant.quantize_runs(x[:, :, :0], 4, n, nested=True)
    assert empty.shape == (2, 3, 0, 8) and not z_stat.any() and not z_base.any()


def test_pack_bits_order_and_roundtrip():
    bits = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.uint8)
    packed = quant.pack_bits(bits)                                  # bit i of byte j = entry 8j + i
    assert packed.tolist() == [[1 | 1 << 3, 1 | 1 << 1]]
    assert torch.equal(quant.unpack_bits(packed)[..., :10], bits)
