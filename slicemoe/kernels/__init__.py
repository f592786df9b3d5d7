"""Triton kernels for the simulator on CUDA. Each is the fast path of a plain PyTorch function
that stays the reference (tests compare the two on the same inputs): `cache_step` of
slicemoe.tensorcache.layer_step, `expert_gemm` of slicemoe.models.code_experts' expert compute.
Importing this package needs Triton (absent from CPU installs)."""
