"""`load` compiles the pass's kernels on a cut copy of the model while the checkpoint loads
(slicemoe.run.compile_ahead)."""

from __future__ import annotations

import importlib.util
import pkgutil

import pytest
import torch

from slicemoe.config import EvalConfig, ModelConfig, RunConfig
from slicemoe.models import checkpoint_dir, skeleton
from slicemoe.run import compile_ahead, load, record, run


def test_the_cut_model_runs_the_pass_beside_the_load_and_leaves_the_rngs_alone(capsys):
    cfg = RunConfig()
    path = checkpoint_dir(cfg.model.name, cfg.model.path)
    from transformers import AutoTokenizer

    before = torch.random.get_rng_state()
    thread = compile_ahead(cfg, path, AutoTokenizer.from_pretrained(path), torch.device("cpu"))
    assert thread is not None
    thread.join()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert "not compiled ahead" not in capsys.readouterr().err


def test_the_copy_ranks_at_every_depth_a_recorded_pass_ranks_at(monkeypatch):
    """A recorded pass ranks each next MoE layer's experts, 16 deep (the stream's next-gate
    ranking), beside the routers' top 4: each depth is a constant of the top-k kernel on CUDA.
    The copy records too and has two MoE layers, so it ranks at both (the device backend, which
    ranks only where a stream is recorded)."""
    from transformers import AutoTokenizer

    import slicemoe.prefetch
    import slicemoe.routing

    depths = []

    def spy(top_indices):
        return lambda x, k: depths.append(k) or top_indices(x, k)

    for module in (slicemoe.prefetch, slicemoe.routing):
        monkeypatch.setattr(module, "top_indices", spy(module.top_indices))
    cfg = RunConfig(model=ModelConfig(backend="tensor"), eval=EvalConfig(limit=2, max_new_tokens=3))
    path = checkpoint_dir(cfg.model.name, cfg.model.path)
    compile_ahead(cfg, path, AutoTokenizer.from_pretrained(path), torch.device("cpu")).join()
    ahead = set(depths)
    depths.clear()
    record(cfg, load(cfg))
    assert set(depths) == {4, 16} and ahead == set(depths), (ahead, set(depths))


def test_no_copy_is_built_where_it_and_the_model_would_not_fit_the_free_memory(monkeypatch):
    cfg = RunConfig()
    path = checkpoint_dir(cfg.model.name, cfg.model.path)
    weights = sum(p.numel() for p in skeleton(path).parameters()) * 4  # float32
    asked = []

    def free_and_total(device):
        asked.append(device)
        return weights, 2 * weights  # the model would fit alone, not with its copy

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_and_total)
    # CUDA is never touched: the answer comes before anything is built.
    assert compile_ahead(cfg, path, None, torch.device("cuda")) is None
    assert asked == [torch.device("cuda")]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("experts, topk", [(60, 4), (8, 2), (64, 8), (128, 1)])
def test_the_launch_sizes_reach_every_tile_shape_and_the_grouped_gemm(experts, topk):
    from slicemoe.kernels.expert_gemm import GROUPED_ROWS, launch_tokens, tile_shapes

    *decode, grouped = launch_tokens(experts, topk, 32)
    kinds = {tile_shapes(t * topk, experts, 32) for t in range(1, grouped)}
    assert {tile_shapes(t * topk, experts, 32) for t in decode} == kinds
    assert len(decode) == len(kinds) and decode == sorted(decode)
    assert (grouped - 1) * topk < GROUPED_ROWS * experts <= grouped * topk


def _jit_kernels():
    """Every Triton kernel of the package (`triton.runtime.JITFunction`s)."""
    from triton.runtime import JITFunction

    import slicemoe.cache.kernel
    import slicemoe.kernels

    modules = [slicemoe.cache.kernel] + [
        importlib.import_module(f"slicemoe.kernels.{m.name}")
        for m in pkgutil.iter_modules(slicemoe.kernels.__path__)
    ]
    return [v for m in modules for v in vars(m).values() if isinstance(v, JITFunction)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_kernels_are_built_in_load_and_none_in_the_run():
    from triton import knobs

    cfg = RunConfig(model=ModelConfig(dtype="bfloat16"), eval=EvalConfig(limit=12))
    for kernel in _jit_kernels():  # what earlier tests compiled in this process is forgotten
        kernel.device_caches.clear()
    built = []
    # Each build with the key Triton specialised it by (argument types, alignment, constants):
    # a build in the run shows what the cut copy launched differently.
    knobs.runtime.jit_post_compile_hook = lambda *, fn, key, **_: built.append(f"{fn.name} {key}")
    try:
        loaded = load(cfg)
        in_load = list(built)
        built.clear()
        run(cfg, loaded)
    finally:
        knobs.runtime.jit_post_compile_hook = None
    names = {build.split()[0] for build in in_load}
    assert {"_gate_up", "_rms_norm"} <= names, in_load
    # Except the cache's layer step: its slot count (MoE layers x experts) is a constant of the
    # kernel, and the copy has fewer MoE layers (measured on an H100: one build, in the first step).
    assert [build.split()[0] for build in built] in ([], ["_layer_step"]), built
