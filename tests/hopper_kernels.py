"""Compile the Triton kernels to Hopper (sm_90) machine code, ahead of time and without a GPU
(Triton's frontend type-checks them, its bundled ptxas assembles them). Run as a script, in a
process where Triton is not in interpreter mode: tests/test_kernels_compile.py does."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from slicemoe.cache import kernel
from slicemoe.cache.tensor import STATS, S
from slicemoe.kernels import expert_gemm, rms_norm, rotary, topk

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_MAX = 232448  # bytes of shared memory a Hopper block may have (227 KiB)


def compile_for_hopper(fn, types: dict, constants: dict, **options) -> None:
    assert set(types) | set(constants) == set(fn.arg_names), "the signature here is stale"
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    # At launch Triton specialises on pointers and integers divisible by 16 (torch aligns its
    # allocations), which lets it pipeline loads through shared memory: compile the most
    # specialised variant, the one that needs the most (not the scalars it never specialises).
    fixed = {p.name for p in fn.params if p.do_not_specialize}
    aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if n not in fixed}
    source = ASTSource(fn, signature, constants, aligned)
    kernel = triton.compile(source, target=HOPPER, options=options)
    assert kernel.asm["cubin"]  # machine code was assembled
    shared = kernel.metadata.shared
    assert shared <= SHARED_MAX, f"{fn.__name__} needs {shared} B of shared memory"
    print(f"compiled {fn.__name__} for sm_90: {shared} B of shared memory")


def cache_layer_step(sliced: bool, nested: bool, eviction: int, on_miss: int) -> None:
    ptr = dict.fromkeys(("key_ptr", "used_ptr", "clock_ptr", "stats_ptr", "idx_ptr",
                         "ahead_e_ptr", "out_ptr"), "*i64")  # fmt: skip
    flags = dict.fromkeys(("pref_ptr", "high_ptr", "on_ptr", "drop_ptr", "ahead_c_ptr",
                           "ahead_on_ptr", "served_ptr", "dropped_ptr"), "*u8")  # fmt: skip
    ints = dict.fromkeys(kernel._SCALARS, "i64")
    constants = dict(
        N=1440, E=60, K=4, M=4, EVICTION=eviction, SLICED=sliced, NESTED=nested, ON_MISS=on_miss,
        PREFETCH_LSB=True, COLD=False, AHEAD=True, MAX_EVICT=3, BLOCK=1024, NSTATS=16,
        NCOLS=len(STATS), S_REQ=S["requests_MSB"], S_HIT=S["hits_MSB"], S_BYTES=S["bytes_MSB"],
        S_ACT=S["activations"], S_PREF=S["prefetch_bytes"], S_USED=S["prefetch_used_bytes"],
    )  # fmt: skip
    compile_for_hopper(kernel._layer_step, {**ptr, **flags, **ints}, constants, num_warps=1)


def expert_gemms(pairs: int) -> None:
    """The two GEMMs in the tiles `tile_shapes` gives for `pairs` pairs."""
    common = dict(ids_ptr="*i64", block_ptr="*i64", q_ptr="*u8", s_ptr="*fp32", z_ptr="*u8",
                  F="i32", E="i32", V="i32", shift_low="i32", mult_low="fp32", copy_low="i32",
                  q_copy="i32", s_copy="i32", z_path="i32")  # fmt: skip
    bm, gate_up_tile, down_tile = expert_gemm.tile_shapes(pairs, 60, 32)
    (gu_n, gu_k, gu_stages, gu_warps), (dn_n, dn_k, dn_stages, dn_warps) = gate_up_tile, down_tile
    shape = dict(I=1408, H=2048, G=32, BM=bm)  # Qwen1.5-MoE's experts
    gate_up = {**common, "x_ptr": "*bf16", "h_ptr": "*bf16", "TOPK": "i32"}
    compile_for_hopper(expert_gemm._gate_up, gate_up, {**shape, "BN": gu_n, "BK": gu_k},
                       num_stages=gu_stages, num_warps=gu_warps)  # fmt: skip
    down = {**common, "h_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"}
    compile_for_hopper(expert_gemm._down, down, {**shape, "BN": dn_n, "BK": dn_k},
                       num_stages=dn_stages, num_warps=dn_warps)  # fmt: skip


def dequantize() -> None:
    types = dict(q_ptr="*u8", s_ptr="*fp32", z_ptr="*u8", w_ptr="*bf16", used_ptr="*i64",
                 first="i32", E="i32", shift_low="i32", mult_low="fp32", copy_low="i32", q_copy="i32",
                 s_copy="i32", z_path="i32")  # fmt: skip
    shape = dict(OUT=2816, IN=2048, G=32, BN=64, BK=64)  # Qwen1.5-MoE's gate/up projection
    compile_for_hopper(expert_gemm._dequantize, types, shape)
    pairs = dict(v_ptr="*i64", ids_ptr="*i64", block_ptr="*i64", F="i32", SIZE="i32")
    compile_for_hopper(expert_gemm._align, pairs, dict(NV=120, BV=128, BM=16, BF=1024))


def norm_rotary_topk() -> None:
    bf16 = dict.fromkeys(("x_ptr", "w_ptr", "out_ptr"), "*bf16")
    compile_for_hopper(rms_norm._rms_norm, {**bf16, "eps": "fp32"}, dict(N=2048, BN=2048))
    ptrs = dict.fromkeys(("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr"), "*bf16")
    ints = dict.fromkeys(("S", "q_b", "q_h", "q_s", "k_b", "k_h", "k_s", "c_b", "c_s"), "i32")
    compile_for_hopper(rotary._rotary, {**ptrs, **ints}, dict(HQ=16, HK=16, D=128))
    scores = dict(x_ptr="*fp32", idx_ptr="*i64", N="i32", stride="i32")
    compile_for_hopper(topk._topk, scores, dict(K=4, BN=64), num_warps=topk.WARPS)


if __name__ == "__main__":
    # (sliced, nested, eviction: lru fifo lfu, on_miss: fetch skip_lsb drop substitute)
    for variant in ((True, True, 0, 0), (True, False, 2, 3), (False, True, 1, 2)):
        cache_layer_step(*variant)
    for pairs in (4, 512, 1036, 2048):  # each kind of tile code_experts launches
        expert_gemms(pairs)
    dequantize()
    norm_rotary_topk()
