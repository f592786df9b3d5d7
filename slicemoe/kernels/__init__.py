"""Triton kernels of the model's compute on CUDA: `expert_gemm`, the fast path of
slicemoe.models.code_experts' expert compute, which stays the reference (tests compare the two
on the same inputs); `rms_norm` and `rotary`, the family's norms and rotary embedding where they
compute the common formulas; `topk`, the routers' top-k (slicemoe.routing calls it for CUDA
tensors). The cache's layer-step kernel lives with the cache's other implementations
(slicemoe.cache.kernel). Importing this package needs Triton (absent from CPU installs)."""

from slicemoe.kernels import rms_norm, rotary


def fuse(model) -> None:
    """A loaded model's common norms and rotary embedding, each one kernel on CUDA (each falls
    back to the family's own code for calls it does not cover)."""
    rms_norm.fuse(model)
    rotary.fuse(model)
