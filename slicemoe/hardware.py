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

    def total(self) -> Cost:
        """One cost from one whose fields are arrays (a row, or a layer step, per entry)."""
        return Cost(*(float(np.sum(getattr(self, f.name))) for f in fields(self)))


def charge(
    hw: HardwareConfig, ops: float, dram_bytes: float, flash_bytes: float, prefetched: float = 0.0
) -> Cost:
    """Cost of one layer step that does `ops` operations and moves the given bytes.

    Scalars, numpy arrays or torch tensors (one entry per simulated device) work alike.
    Flash fills land in DRAM, so callers include the filled bytes in `dram_bytes` too.
    `prefetched` of the `flash_bytes` were fetched ahead for the next layer: they overlap this
    layer's compute and DRAM time, while demand misses wait (unless `overlap_flash`):
        latency = max(compute, DRAM, prefetch Flash time) + demand Flash time.
    Energy counts every Flash byte, prefetches that are never used included.
    """
    compute_s = ops / (hw.xpu_tops * 1e12)
    dram_s = dram_bytes * 8 / (hw.dram_gbps * 1e9)
    flash_s = flash_bytes * 8 / (hw.flash_gbps * 1e9)
    if hw.overlap_flash:
        latency = _max(_max(compute_s, dram_s), flash_s)
    else:
        ahead_s = prefetched * 8 / (hw.flash_gbps * 1e9)
        latency = _max(_max(compute_s, dram_s), ahead_s) + (flash_s - ahead_s)
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


def _max(a, b):
    """Elementwise maximum of scalars, numpy arrays or torch tensors (which have the method)."""
    return a.maximum(b) if hasattr(a, "maximum") else np.maximum(a, b)


# A thin-and-light laptop: same accelerator as the phone, so comparing the two profiles isolates
# the memory system. Public figures (conf/hardware/laptop_lpddr5_nvme.yaml holds the same values;
# a test keeps them equal):
# - DRAM: LPDDR5X-8533 (JEDEC JESD209-5B) on a 128-bit bus, as in Intel Core Ultra 200V (136.5
#   GB/s in Intel's specifications): 8533 MT/s x 128 bit = 1092 Gb/s. Energy scaled from the
#   LPDDR4 1.5 pJ/bit with Samsung's press claims (LPDDR5 -30% vs LPDDR4X, 2018; LPDDR5X -20% vs
#   LPDDR5, 2021): 1.5 x 0.7 x 0.8 = 0.84 pJ/bit.
# - Flash: Samsung 990 PRO (PCIe 4.0 x4) data sheet, 7,450 MB/s sequential read at 5.4 W average
#   active power: 59.6 Gb/s and 5.4 W / 59.6 Gb/s = 91 pJ/bit.
PROFILES = {
    "mobile_lpddr4_ufs31": HardwareConfig(),
    "laptop_lpddr5_nvme": HardwareConfig(
        name="laptop_lpddr5_nvme",
        dram_gbps=1092.0,
        dram_pj_per_bit=0.84,
        dram_gb=32.0,
        flash_gbps=59.6,
        flash_pj_per_bit=91.0,
        flash_gb=1000.0,
    ),
}
