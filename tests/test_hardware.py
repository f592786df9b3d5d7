import pytest

from slicemoe.config import HardwareConfig
from slicemoe.hardware import PROFILES, charge
from slicemoe.quant import slice_bytes

HW = HardwareConfig()
# DeepSeek-V2-Lite expert at MAT84 (see test_quant for the byte counts by hand).
MSB, LSB = 5_001_216, 4_460_544


def test_slice_sizes_used_here_are_the_hand_computed_ones():
    sizes = slice_bytes(3 * 2048 * 1408, 8, 4, 32, symmetric=False)
    assert (sizes["MSB"], sizes["LSB"]) == (MSB, LSB)


@pytest.mark.parametrize("nbytes", [MSB, LSB])
def test_flash_fetch_of_one_slice_by_hand(nbytes):
    c = charge(HW, ops=0, dram_bytes=0, flash_bytes=nbytes)
    bits = nbytes * 8
    assert c.flash_s == pytest.approx(bits / 10e9)  # UFS 3.1: 10 Gb/s
    assert c.flash_j == pytest.approx(bits * 103e-12)  # 103 pJ/bit
    assert c.latency_s == pytest.approx(c.flash_s)
    # MSB: 40,009,728 bits -> 4.0010 ms and 4.1210 mJ.
    if nbytes == MSB:
        assert c.flash_s == pytest.approx(4.0009728e-3)
        assert c.flash_j == pytest.approx(4.12100198e-3)


def test_energy_is_linear_in_bytes_and_ops():
    one = charge(HW, 1e9, 1e6, 1e5)
    three = charge(HW, 3e9, 3e6, 3e5)
    for f in ("compute_j", "dram_j", "flash_j", "energy_j"):
        assert getattr(three, f) == pytest.approx(3 * getattr(one, f))
    assert one.compute_j == pytest.approx(1e9 / 3.18e12)
    assert one.dram_j == pytest.approx(8e6 * 1.5e-12)


def test_layer_latency_is_max_of_compute_and_dram_plus_flash_unless_overlapped():
    ops, dram, flash = 2e9, 5e6, 1e6
    c = charge(HW, ops, dram, flash)
    compute_s, dram_s, flash_s = ops / 16.4e12, dram * 8 / 104e9, flash * 8 / 10e9
    assert c.latency_s == pytest.approx(max(compute_s, dram_s) + flash_s)
    o = charge(HardwareConfig(overlap_flash=True), ops, dram, flash)
    assert o.latency_s == pytest.approx(max(compute_s, dram_s, flash_s))
    assert o.energy_j == pytest.approx(c.energy_j)


def test_costs_add_up():
    a, b = charge(HW, 1e9, 1e6, 0), charge(HW, 0, 0, 2e6)
    s = a + b
    assert s.energy_j == pytest.approx(a.energy_j + b.energy_j)
    assert s.latency_s == pytest.approx(a.latency_s + b.latency_s)


def test_second_profile_is_a_faster_device_class():
    laptop = PROFILES["laptop_lpddr5_nvme"]
    assert laptop.flash_gbps > HW.flash_gbps and laptop.dram_gbps > HW.dram_gbps
    assert charge(laptop, 0, 0, MSB).latency_s < charge(HW, 0, 0, MSB).latency_s


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_equal_the_sweep_configs(name):
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parent.parent / "conf" / "hardware" / f"{name}.yaml"
    assert yaml.safe_load(conf.read_text()) == asdict(PROFILES[name])
