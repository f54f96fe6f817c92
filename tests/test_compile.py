"""eym.compile: regional compilation of the temporal attention, close to eager, no recompiles.

Inductor on CPU compiles C++ (gcc): one TemporalAttention forward + backward takes ~13 s cold
here, the tiny UNet's four blocks far longer, so inductor runs on a single module and the
tiny-model tests (routing through ``train_stage``) use dynamo's ``aot_eager`` backend, which
traces the same graphs (forward and backward, same guards) without generating code.
"""

from __future__ import annotations

import pytest
import torch

import eym.compile
from eym.compile import compiled_regions, inductor_cache_dir
from eym.spacetime import TemporalAttention, inflate, space_time_kwargs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _nonzero(module: TemporalAttention, seed: int = 0) -> TemporalAttention:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def _fwd_bwd(module, x, num_frames):
    x = x.clone().requires_grad_(True)
    y = module(x, num_frames)
    y.square().mean().backward()
    grads = [x.grad, *(p.grad.clone() for p in module.parameters())]
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def test_inductor_temporal_attention_matches_eager_and_does_not_recompile(tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("EYM_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # recorded, so the variable is removed again after
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # the default: eym_home()/"inductor"
    module = _nonzero(TemporalAttention(16, 2, 8))
    x = torch.randn(2 * 4, 5, 16, generator=torch.Generator().manual_seed(1))
    eager, eager_grads = _fwd_bwd(module, x, 4)
    with compiled_regions(module) as n:
        assert n == 1
        compiled, compiled_grads = _fwd_bwd(module, x, 4)
        graphs = _graphs()
        assert graphs >= 1  # it did compile
        with torch._dynamo.config.patch(error_on_recompile=True):  # same shapes: the cached graph
            again, _ = _fwd_bwd(module, x + 1.0, 4)
        assert _graphs() == graphs
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert module._compiled_call_impl is None  # eager again after the block
    # inductor wrote its graphs under eym_home()/"inductor", where a Space keeps them
    assert inductor_cache_dir() == tmp_path / "inductor"
    assert any((tmp_path / "inductor").rglob("*"))


def test_compiled_regions_on_the_tiny_unet_close_and_no_recompile(tiny_bundle, monkeypatch):
    import torch._dynamo

    from eym.models import load_components

    monkeypatch.setattr(eym.compile, "BACKEND", "aot_eager")
    c = load_components(str(tiny_bundle), device="cpu")
    unet = inflate(c.unet)
    for i, m in enumerate(m for m in unet.modules() if isinstance(m, TemporalAttention)):
        _nonzero(m, i)
    gen = torch.Generator().manual_seed(0)
    x, emb, t = torch.randn(4, 4, 4, 4, generator=gen), torch.randn(4, 77, 32, generator=gen), torch.tensor([10])

    def run():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=emb, cross_attention_kwargs=space_time_kwargs(4)).sample

    eager = run()
    with compiled_regions(unet) as n:
        assert n == 4  # every transformer block's temporal attention, nothing else
        compiled = run()
        graphs = _graphs()
        assert 1 <= graphs <= 4  # at most one per token shape: blocks of one level share a graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            run()
        assert _graphs() == graphs
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert all(m._compiled_call_impl is None for m in unet.modules())
    with compiled_regions(unet, enabled=False) as n:  # the setting off: nothing compiled
        assert n == 0


def test_tune_config_compile_routes_stage_2_through_compiled_regions(tiny_bundle, monkeypatch):
    from eym.models import load_components
    from eym.tuning import TuneConfig, TuningData, config_fingerprint, init_temporal_attention, train_stage

    monkeypatch.setattr(eym.compile, "BACKEND", "aot_eager")
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, 4, 4, 4, generator=gen)
    data = TuningData(lat, 0.5 * lat, torch.rand(4, 3, 32, 32, generator=gen), torch.randn(1, 77, 32, generator=gen),
                      torch.randn(1, 77, 32, generator=gen))
    results, seen = {}, {}
    for compile_ in (False, True):
        c = load_components(str(tiny_bundle), device="cpu")
        inflate(c.unet)
        init_temporal_attention(c.unet, 0)
        modules = [m for m in c.unet.modules() if isinstance(m, TemporalAttention)]
        cfg = TuneConfig(steps1=2, steps2=3, lr=1e-3, checkpoint_every=0, compile=compile_)
        flags = []
        for stage in (1, 2):
            train_stage(stage, c.unet, c.controlnet, c.scheduler, data, cfg, disable=True,
                        callback=lambda name, *_: flags.append((name, modules[0]._compiled_call_impl is not None)))
        results[compile_] = {n: p.detach().clone() for n, p in c.unet.named_parameters()}
        seen[compile_] = flags
        assert all(m._compiled_call_impl is None for m in modules)  # eager again after the stage
    assert seen[False] == [("stage1", False)] * 2 + [("stage2", False)] * 3
    assert seen[True] == [("stage1", False)] * 2 + [("stage2", True)] * 3  # stage 1 skips the zero module
    for name, value in results[False].items():
        torch.testing.assert_close(results[True][name], value, atol=1e-5, rtol=1e-4, msg=name)
    # the same tuned result either way: the cache key does not see the setting
    assert config_fingerprint(TuneConfig(compile=True)) == config_fingerprint(TuneConfig())
