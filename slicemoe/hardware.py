"""Energy and latency of an XPU + DRAM + Flash device (DESIGN.md section 6).

The model charges three resources per layer step: XPU operations (2 per MAC over the weights
actually used), DRAM traffic (weights read, KV cache read/written, Flash fills written) and
Flash traffic (misses). Per layer, the XPU and DRAM work overlap with each other, while a miss
sits on the critical path unless `overlap_flash` says the fetch is hidden behind the layer.

Profiles are `slicemoe.config.HardwareConfig` values; the default is the SliceMoE mobile
platform (16.4 TOPS at 3.18 TOPS/W, LPDDR4 104 Gb/s at 1.5 pJ/bit, UFS 3.1 10 Gb/s at
103 pJ/bit). The sweep's hardware configs add other device classes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from slicemoe.config import HardwareConfig


@dataclass
class Cost:
    ops: float = 0.0
    dram_bytes: float = 0.0
    flash_bytes: float = 0.0
    compute_j: float = 0.0
    dram_j: float = 0.0
    flash_j: float = 0.0
    compute_s: float = 0.0
    dram_s: float = 0.0
    flash_s: float = 0.0
    latency_s: float = 0.0

    @property
    def energy_j(self) -> float:
        return self.compute_j + self.dram_j + self.flash_j

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def charge(hw: HardwareConfig, ops: float, dram_bytes: float, flash_bytes: float) -> Cost:
    """Cost of one layer step that does `ops` operations and moves the given bytes.

    Scalars or numpy arrays (one entry per simulated device) work alike.
    Flash fills land in DRAM, so callers include the filled bytes in `dram_bytes` too.
    """
    compute_s = ops / (hw.xpu_tops * 1e12)
    dram_s = dram_bytes * 8 / (hw.dram_gbps * 1e9)
    flash_s = flash_bytes * 8 / (hw.flash_gbps * 1e9)
    if hw.overlap_flash:
        latency = np.maximum(np.maximum(compute_s, dram_s), flash_s)
    else:
        latency = np.maximum(compute_s, dram_s) + flash_s
    return Cost(
        ops=ops,
        dram_bytes=dram_bytes,
        flash_bytes=flash_bytes,
        compute_j=ops / (hw.xpu_tops_per_w * 1e12),
        dram_j=dram_bytes * 8 * hw.dram_pj_per_bit * 1e-12,
        flash_j=flash_bytes * 8 * hw.flash_pj_per_bit * 1e-12,
        compute_s=compute_s,
        dram_s=dram_s,
        flash_s=flash_s,
        latency_s=latency,
    )


# A laptop-class device for contrast with the phone. Public figures:
# - NPU: Snapdragon X Elite / Lunar Lake class, ~45 INT8 TOPS (vendor spec sheets); ~5 TOPS/W
#   is an assumption in line with the phone XPU's efficiency scaled by a newer node.
# - LPDDR5-6400 on a 64-bit bus: 6400 MT/s x 64 bit = 409.6 Gb/s; ~1.2 pJ/bit assumes the ~20%
#   energy-per-bit reduction JEDEC/Micron quote for LPDDR5 over LPDDR4X applied to 1.5 pJ/bit.
# - PCIe 4.0 x4 NVMe SSD (Samsung 980 PRO datasheet): 7,000 MB/s sequential read = 56 Gb/s at
#   ~6.2 W average active read power -> 6.2 / 56e9 ~ 110 pJ/bit.
PROFILES = {
    "mobile_lpddr4_ufs31": HardwareConfig(),
    "laptop_lpddr5_nvme": HardwareConfig(
        name="laptop_lpddr5_nvme",
        xpu_tops=45.0,
        xpu_tops_per_w=5.0,
        dram_gbps=409.6,
        dram_pj_per_bit=1.2,
        dram_gb=16.0,
        flash_gbps=56.0,
        flash_pj_per_bit=110.0,
        flash_gb=1024.0,
    ),
}
