"""Triton kernels of the model's compute on CUDA: `expert_gemm`, the fast path of
slicemoe.models.code_experts' expert compute, which stays the reference (tests compare the two
on the same inputs). The cache's layer-step kernel lives with the cache's other implementations
(slicemoe.cache.kernel). Importing this package needs Triton (absent from CPU installs)."""
