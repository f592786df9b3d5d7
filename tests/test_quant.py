import pytest
import torch

from slicemoe.quant import join, low_path, lsb, msb, quantize, slice_bytes, tensor_bytes


def weights(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gauss":
        return torch.randn(256, 1024, generator=g)
    # Student-t with df=3 from its definition, so the draw is seeded by the generator too.
    z = torch.randn(256, 1024, generator=g)
    chi2 = torch.randn(3, 256, 1024, generator=g).pow(2).sum(0)
    return z / (chi2 / 3).sqrt()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("h,l", [(8, 4), (6, 3), (4, 2), (8, 2)])
def test_msb_and_lsb_rebuild_the_high_bit_code_exactly(h, l, symmetric):
    qt = quantize(weights("gauss"), h, 32, symmetric)
    assert qt.q.max() <= 2**h - 1
    assert torch.equal(join(msb(qt, l), lsb(qt, l), h, l), qt.q)
    assert msb(qt, l).max() <= 2**l - 1 and lsb(qt, l).max() <= 2 ** (h - l) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_accepts_half_inputs_and_roundtrips_within_half_a_step(dtype):
    w = weights("gauss").to(dtype)
    qt = quantize(w, 8, 32)
    err = (qt.dequantize() - w.float()).abs().unflatten(-1, (-1, 32)).amax(-1)
    assert torch.all(err <= qt.scale * 0.5 + 1e-6)
    assert qt.dequantize(dtype).dtype == dtype


def test_asymmetric_zero_point_follows_the_formula():
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])
    qt = quantize(w, 4, 4)
    s = 3.0 / 15
    assert qt.scale.item() == pytest.approx(s)
    assert qt.zp.item() == round(1.0 / s)
    assert qt.q.tolist() == [[0, 5, 8, 15]]


def mse(a, b):
    return (a - b).pow(2).mean().item()


@pytest.mark.parametrize("dist", ["gauss", "student_t3"])
@pytest.mark.parametrize("h,l", [(8, 4), (6, 3), (4, 2)])
def test_table1_pattern_amat_near_base_trunc_far_worse(dist, h, l):
    w = weights(dist)
    qt = quantize(w, h, 32, symmetric=False)
    err = {s: mse(low_path(w, qt, l, s).dequantize(), w) for s in ("amat", "trunc", "base")}
    # AMAT floors both q and the zero-point: the zero-point's lost low bits add a second
    # rounding error, measured at 1.3-1.9x base's MSE here (never better than 2x worse).
    assert err["amat"] < 2.0 * err["base"]
    assert err["trunc"] > 100 * err["amat"]


@pytest.mark.parametrize("h,l", [(8, 4), (6, 3)])
def test_symmetric_trunc_is_orders_of_magnitude_worse(h, l):
    w = weights("gauss")
    qt = quantize(w, h, 32, symmetric=True)
    amat = mse(low_path(w, qt, l, "amat").dequantize(), w)
    assert mse(low_path(w, qt, l, "trunc").dequantize(), w) > 100 * amat


def test_amat_low_path_uses_the_msb_codes_and_shifted_metadata():
    w = weights("gauss")
    qt = quantize(w, 8, 32)
    lo = low_path(w, qt, 4, "amat")
    assert torch.equal(lo.q, qt.q >> 4)
    assert torch.equal(lo.zp, torch.floor(qt.zp / 16))
    assert torch.allclose(lo.scale, qt.scale * 16)


def test_bad_bits_and_groups_name_the_problem():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 32), 9)
    with pytest.raises(ValueError, match="group"):
        quantize(torch.randn(4, 30), 4, group=32)
    qt = quantize(torch.randn(4, 32), 4)
    with pytest.raises(ValueError, match="low bits"):
        low_path(None, qt, 4, "amat")
    with pytest.raises(ValueError, match="scheme"):
        low_path(None, qt, 2, "nope")


# DeepSeek-V2-Lite routed expert: gate, up (1408 x 2048) and down (2048 x 1408) -> 3 matrices.
DSV2_LITE_EXPERT = 3 * 2048 * 1408  # 8,650,752 weights, 270,336 groups of 32


def test_slice_bytes_by_hand_deepseek_v2_lite_mat84():
    n, groups = DSV2_LITE_EXPERT, DSV2_LITE_EXPERT // 32
    assert groups == 270_336
    sizes = slice_bytes(n, 8, 4, 32, symmetric=False)
    # FULL: 8 bits/weight + per group fp16 scale + 8-bit zero-point.
    assert sizes["FULL"] == 8_650_752 + 270_336 * 3 == 9_461_760
    # MSB: 4 bits/weight + per group fp16 scale + 4-bit zero-point.
    assert sizes["MSB"] == 4_325_376 + 270_336 * 20 // 8 == 5_001_216
    # LSB: the other 4 bits/weight + the zero-point's low 4 bits per group.
    assert sizes["LSB"] == 4_325_376 + 270_336 // 2 == 4_460_544
    assert sizes["MSB"] + sizes["LSB"] == sizes["FULL"]


def test_slice_bytes_by_hand_deepseek_v2_lite_mat63():
    n, groups = DSV2_LITE_EXPERT, 270_336
    sizes = slice_bytes(n, 6, 3, 32, symmetric=False)
    assert sizes["FULL"] == n * 6 // 8 + groups * (16 + 6) // 8 == 7_231_488
    assert sizes["MSB"] == n * 3 // 8 + groups * (16 + 3) // 8 == 3_886_080
    assert sizes["LSB"] == n * 3 // 8 + groups * 3 // 8 == 3_345_408
    assert sizes["MSB"] + sizes["LSB"] == sizes["FULL"]


def test_symmetric_slices_carry_no_zero_point():
    assert tensor_bytes(64, 4, 32, symmetric=True) == 32 + 2 * 2
    sizes = slice_bytes(64, 8, 4, 32, symmetric=True)
    assert sizes == {"FULL": 64 + 4, "MSB": 32 + 4, "LSB": 32}
    assert slice_bytes(64, 8, None, 32, symmetric=False) == {"FULL": 70, "MSB": 70, "LSB": 0}
    # Unquantized experts are stored in fp16 whatever the compute dtype.
    assert slice_bytes(64, None, None, 32, symmetric=False) == {"FULL": 128, "MSB": 128, "LSB": 0}


def test_expert_biases_ride_at_16_bits_in_every_computing_slice():
    """gpt-oss-20b's expert shape (hidden 2880, width 2880): 3 x 2880 x 2880 weights plus 2 x
    2880 + 2880 bias values. By hand, MAT84 asymmetric, group 32:
    FULL = n + n/32 x 3 bytes (fp16 scale, 8-bit zero-point) + 2 x 8640 bias bytes,
    MSB  = n/2 + n/32 x 2.5 bytes + 17,280, LSB = n/2 + n/32 x 0.5 bytes (no biases)."""
    n, biases = 3 * 2880 * 2880, 2 * 2880 + 2880
    sizes = slice_bytes(n, 8, 4, 32, False, fp16=biases)
    assert sizes == {"FULL": 27_233_280, "MSB": 14_402_880, "LSB": 12_830_400}
    assert sizes["MSB"] + sizes["LSB"] == sizes["FULL"]
    assert slice_bytes(n, None, None, 32, False, fp16=biases)["FULL"] == 2 * (n + biases)
