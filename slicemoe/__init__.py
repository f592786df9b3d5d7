"""SliceMoE: bit-sliced expert caching, AMAT quantization and prefill-guided warmup for MoE LLMs."""

from slicemoe.config import RunConfig

__all__ = ["RunConfig"]
