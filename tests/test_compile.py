"""eym.compile: regional compilation of the UNet's and ControlNet's blocks, close to eager, no recompiles.

Inductor on CPU compiles C++ (gcc): one TemporalAttention forward + backward takes ~13 s cold
here, the tiny UNet's blocks far longer, so inductor runs on a single module and the
tiny-model tests (routing through ``train_stage``) use dynamo's ``aot_eager`` backend, which
traces the same graphs (forward and backward, same guards) without generating code. On a CUDA
device (``-m gpu``): inductor, both stages compiled and captured in CUDA graphs, against eager.
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
    with compiled_regions(module, kinds=(TemporalAttention,)) as n:
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
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

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

    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    transformers = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    eager = run()
    with compiled_regions(unet) as n:
        assert n == len(resnets) + len(transformers) > 0  # every block, each once
        assert all(m._compiled_call_impl is not None for m in resnets + transformers)
        # the temporal attention runs inside a compiled transformer block, not compiled on its own
        assert all(m._compiled_call_impl is None for m in unet.modules() if isinstance(m, TemporalAttention))
        compiled = run()
        graphs = _graphs()
        assert 1 <= graphs
        with torch._dynamo.config.patch(error_on_recompile=True):  # same shapes: the cached graphs
            run()
        assert _graphs() == graphs
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert all(m._compiled_call_impl is None for m in unet.modules())
    with compiled_regions(unet, enabled=False) as n:  # the setting off: nothing compiled
        assert n == 0


def test_a_parameter_swapped_in_place_is_guarded(monkeypatch):
    """Tuning swaps trained and norm tensors with ``p.data = ...``, which leaves the module's
    __dict__ as it was. With its tensor guards skipped on matching dict tags (dynamo's default),
    torch 2.11 on the H200 ran stage 1's graph on stage 2's bf16 tensor and faulted; once blocks
    are compiled those guards are on (for the process: concurrent jobs must not undo it), and a
    swapped tensor gets a graph of its own."""
    import torch._dynamo

    monkeypatch.setattr(eym.compile, "BACKEND", "aot_eager")
    config = torch._dynamo.config
    monkeypatch.setattr(config, "skip_tensor_guards_with_matching_dict_tags", True)  # dynamo's default, restored after
    block = torch.nn.Sequential(torch.nn.Linear(8, 8))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with compiled_regions(block, kinds=(torch.nn.Linear,)):
        assert config.skip_tensor_guards_with_matching_dict_tags is False
        block(x)
        graphs = _graphs()
        weight = block[0].weight
        weight.data = weight.data.t().contiguous().t()  # same values, another layout
        torch.testing.assert_close(block(x), torch.nn.functional.linear(x, weight, block[0].bias))
        assert _graphs() == graphs + 1  # the guard saw the new tensor and compiled for it
    assert config.skip_tensor_guards_with_matching_dict_tags is False  # still, for a job compiling beside this one


def test_tune_config_compile_routes_both_stages_through_compiled_regions(tiny_bundle, monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D

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
        blocks = [next(m for m in model.modules() if isinstance(m, ResnetBlock2D)) for model in (c.unet, c.controlnet)]
        cfg = TuneConfig(steps1=2, steps2=3, lr=1e-3, checkpoint_every=0, compile=compile_)
        flags = []
        for stage in (1, 2):
            train_stage(stage, c.unet, c.controlnet, c.scheduler, data, cfg, disable=True,
                        callback=lambda name, *_: flags.append((name, [b._compiled_call_impl is not None for b in blocks])))
        results[compile_] = {n: p.detach().clone() for n, p in c.unet.named_parameters()}
        seen[compile_] = flags
        assert all(m._compiled_call_impl is None for model in (c.unet, c.controlnet) for m in model.modules())
    assert seen[False] == [("stage1", [False, False])] * 2 + [("stage2", [False, False])] * 3
    assert seen[True] == [("stage1", [True, True])] * 2 + [("stage2", [True, True])] * 3  # UNet and ControlNet
    for name, value in results[False].items():
        torch.testing.assert_close(results[True][name], value, atol=1e-5, rtol=1e-4, msg=name)
    # the same tuned result either way: the cache key does not see the setting
    assert config_fingerprint(TuneConfig(compile=True)) == config_fingerprint(TuneConfig())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_graphed_stages_train_what_eager_trains_on_a_gpu(tiny_bundle, tmp_path, monkeypatch):
    """Both stages in one process, inductor inside the CUDA graphs, against eager: stage 2 reuses
    stage 1's graphs of the frozen ControlNet and meets the tensors stage 1 swapped back."""
    import dataclasses

    from eym.models import load_components
    from eym.tuning import TuneConfig, TuningData, init_temporal_attention, train_stage

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, 6, 8, 8, generator=g)
    data = TuningData(lat, 0.5 * lat, torch.rand(6, 3, 64, 64, generator=g), torch.randn(1, 77, 32, generator=g),
                      torch.randn(1, 77, 32, generator=g))
    data = TuningData(**{k: v.to("cuda", torch.bfloat16) for k, v in vars(data).items()})
    config = TuneConfig(steps1=16, steps2=16, checkpoint_every=0, gradient_checkpointing=False, compile=True)
    out = {}
    for compile_ in (False, True):
        c = load_components(str(tiny_bundle), device="cuda")
        inflate(c.unet)
        init_temporal_attention(c.unet, 0)
        start = {n: p.detach().float().cpu() for n, p in c.unet.named_parameters()}
        losses: list[float] = []
        for stage in (1, 2):
            train_stage(stage, c.unet, c.controlnet, c.scheduler, data, dataclasses.replace(config, compile=compile_),
                        log_fn=lambda r: losses.append(r["loss"]), disable=True)
        torch.cuda.synchronize()
        out[compile_] = ({n: p.detach().float().cpu() for n, p in c.unet.named_parameters()}, losses)
    (eager, eager_losses), (compiled, compiled_losses) = out[False], out[True]
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=2e-2, atol=1e-4)
    for name, value in eager.items():
        moved = (value - start[name]).norm()
        diff = (compiled[name] - value).norm()
        assert diff <= 0.1 * moved + 1e-6, f"{name}: compiled differs by {diff:.3g}, the update is {moved:.3g}"
