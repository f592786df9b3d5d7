"""The slice cache (DESIGN.md section 4), one contract in four implementations:

- `reference`: `SliceCache` and its eviction policies, the readable definition of the others;
- `compiled`: replay of request arrays in a numba-compiled loop, every policy but LFU and
  Belady (slicemoe.replay);
- `tensor`: the caches of B simulated devices as tensors, one layer step at a time
  (slicemoe.tensor_runtime);
- `kernel`: `tensor.layer_step` as one Triton kernel (on CUDA).

tests/test_cache_conformance.py runs the same sequences through all of them. Only the
reference is imported here: the others need numba, or Triton, which not every install has.
"""

from slicemoe.cache.reference import (
    EVICTION,
    FIFO,
    KIND_CODE,
    KINDS,
    LFU,
    LRU,
    Belady,
    Budget,
    Key,
    SliceCache,
    Stats,
    eviction_params,
    make_policy,
)

__all__ = [
    "EVICTION",
    "FIFO",
    "KIND_CODE",
    "KINDS",
    "LFU",
    "LRU",
    "Belady",
    "Budget",
    "Key",
    "SliceCache",
    "Stats",
    "eviction_params",
    "make_policy",
]
