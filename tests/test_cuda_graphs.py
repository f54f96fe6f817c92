"""CUDA graphs of the tuning step's model call (eym.tuning.graph_model_call).

On the CPU: when a stage may replay graphs, and that what capture needs (an autocast without a
cast cache) is what the loop runs with. On a CUDA device (``-m gpu``, run on the GPU machine):
a graphed stage trains the same tensors as the eager one, the graph is really used, and its
memory goes back when the stage ends.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eym.graphs import GRAPH_MIN_STEPS, ForwardGraphs, can_graph_training
from eym.tuning import TuneConfig, TuningData, _accelerator, init_temporal_attention, train_stage

CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "device, checkpointing, scaler, expected",
    [
        (CUDA, False, None, True),
        (torch.device("cpu"), False, None, False),
        (CUDA, True, None, False),  # checkpointing recomputes inside backward
        (CUDA, False, object(), False),  # fp16's GradScaler reads the device for infs
    ],
)
def test_when_a_stage_may_replay_graphs(device, checkpointing, scaler, expected):
    assert can_graph_training(device, checkpointing=checkpointing, scaler=scaler) is expected


def test_graphs_do_not_change_the_cache_key():
    assert TuneConfig(cuda_graphs=True).result_key() == TuneConfig(cuda_graphs=False).result_key()


def test_the_loop_autocast_has_no_cast_cache():
    # a capture under a cast cache would bake in casts made before it, freed when autocast exits
    accelerator = _accelerator("bf16", torch.device("cpu"))
    with accelerator.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_cache_enabled()


# ---------------------------------------------------------------------------------------------
# on a CUDA device
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_data(F: int = 6, size: int = 64, seed: int = 0) -> TuningData:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, F, size // 8, size // 8, generator=g)
    data = TuningData(
        latents=latents,
        masked_latents=0.5 * latents,
        control_images=torch.rand(F, 3, size, size, generator=g),
        content_embeds=torch.randn(1, 77, 32, generator=g),
        source_embeds=torch.randn(1, 77, 32, generator=g),
    )
    return TuningData(**{k: v.to("cuda", torch.bfloat16) for k, v in vars(data).items()})


@pytest.fixture
def cuda_components(tiny_bundle):
    from eym.models import load_components
    from eym.spacetime import inflate

    c = load_components(str(tiny_bundle), device="cuda")
    inflate(c.unet)
    return c


def _run_stage(c, stage: int, data: TuningData, config: TuneConfig, start: dict, monkeypatch) -> tuple[dict, list, int]:
    """Train one stage from ``start``; returns (trained tensors, losses, successful graph captures)."""
    import eym.tuning as tuning

    captured = []
    real = tuning.graph_training_call

    def spy(*args, **kwargs):
        graphed = real(*args, **kwargs)  # a failed capture raises (tuning then goes on eagerly): not counted
        captured.append(1)
        return graphed

    monkeypatch.setattr(tuning, "graph_training_call", spy)
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if name in start:
                p.copy_(start[name])
    history: list = []
    tensors = train_stage(stage, c.unet, c.controlnet, c.scheduler, data, config, log_fn=history.append, disable=True)
    return tensors, [r["loss"] for r in history], len(captured)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("stage", [1, 2])
def test_a_graphed_stage_trains_what_the_eager_one_trains(cuda_components, stage, monkeypatch):
    c = cuda_components
    init_temporal_attention(c.unet, 0)
    start = {n: p.detach().clone() for n, p in c.unet.named_parameters()}
    data = _cuda_data()
    steps = GRAPH_MIN_STEPS + 6
    config = TuneConfig(steps1=steps, steps2=steps, checkpoint_every=0, gradient_checkpointing=False, cuda_graphs=True)
    eager, eager_losses, n_eager = _run_stage(c, stage, data, dataclasses.replace(config, cuda_graphs=False), start, monkeypatch)
    graphed, graphed_losses, n_graphed = _run_stage(c, stage, data, config, start, monkeypatch)
    torch.cuda.synchronize()
    # the first graphed stage may keep what any new stream keeps (cuBLAS workspaces of the capture
    # stream: 76 -> 204 MiB reserved on an H200); a second one must add nothing, or each job leaks
    reserved_before = torch.cuda.memory_reserved()
    again, _, n_again = _run_stage(c, stage, data, config, start, monkeypatch)
    torch.cuda.synchronize()
    assert (n_eager, n_graphed, n_again) == (0, 1, 1)
    assert len(graphed_losses) == len(eager_losses) == steps
    # the same kernels on the same numbers: equal to bf16 rounding at most
    torch.testing.assert_close(torch.tensor(graphed_losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-5)
    for name in eager:
        moved = (eager[name].float() - start[name].cpu().float()).norm()
        diff = (graphed[name].float() - eager[name].float()).norm()
        assert diff <= 1e-2 * moved + 1e-6, f"{name}: graphed differs by {diff:.3g}, the update is {moved:.3g}"
    for name in graphed:  # replaying is deterministic up to the attention backward's own spread
        torch.testing.assert_close(again[name], graphed[name], rtol=0, atol=1e-2 * float(graphed[name].abs().max()) + 1e-6)
    # the graphs' pool went back when the stage ended
    reserved_after = torch.cuda.memory_reserved()
    assert reserved_after <= reserved_before + 64 * 2**20, f"reserved {reserved_before / 2**20:.0f} -> {reserved_after / 2**20:.0f} MiB"


@pytest.mark.gpu
@gpu
def test_a_short_stage_is_not_graphed(cuda_components, monkeypatch):
    c = cuda_components
    start = {n: p.detach().clone() for n, p in c.unet.named_parameters()}
    config = TuneConfig(steps1=GRAPH_MIN_STEPS, steps2=GRAPH_MIN_STEPS, checkpoint_every=0, gradient_checkpointing=False,
                        cuda_graphs=True)
    _, losses, captured = _run_stage(c, 1, _cuda_data(), config, start, monkeypatch)
    assert captured == 0 and len(losses) == GRAPH_MIN_STEPS


@pytest.mark.gpu
@gpu
def test_forward_graphs_replay_the_call_per_key():
    g = torch.Generator().manual_seed(0)  # CPU draws: the test needs no CUDA generator
    w = torch.randn(64, 64, generator=g).cuda()
    calls = []

    def fn(x, scale):
        calls.append(1)  # runs on the host only while warming up and capturing
        return torch.tanh(x @ w) * scale

    graphs = ForwardGraphs()
    for i in range(4):
        x, scale = torch.randn(8, 64, generator=g).cuda(), torch.full((), float(i), device="cuda")
        key = "double" if i % 2 else "plain"
        out = graphs(key, fn, x, scale * (2 if key == "double" else 1))
        torch.testing.assert_close(out, torch.tanh(x @ w) * scale * (2 if key == "double" else 1))
    assert len(graphs) == 2 and len(calls) == 4  # two keys: one warm-up and one capture each, then replays


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_forward_graphs_on_a_card_that_is_not_the_current_one():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g).to("cuda:1")
    graphs = ForwardGraphs()
    assert torch.cuda.current_device() == 0
    for _ in range(3):
        x = torch.randn(4, 32, generator=g).to("cuda:1")
        torch.testing.assert_close(graphs("k", lambda a: a @ w, x), x @ w)


def test_a_failed_capture_runs_eagerly_and_is_not_tried_again_on_that_card(monkeypatch):
    import eym.graphs as graphs_module

    monkeypatch.setattr(graphs_module, "_CAPTURE_FAILED", set())
    attempts = []

    def failing_capture(self, fn, args):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ForwardGraphs, "_capture", failing_capture)
    x = torch.arange(6.0).reshape(2, 3)
    first = ForwardGraphs()
    torch.testing.assert_close(first("k", lambda a: a * 2, x), x * 2)  # the eager result, no exception
    assert first.failed and graphs_module.capture_failed(x.device)
    # a later job on the same card (a new ForwardGraphs, a tuning stage) does not try again
    torch.testing.assert_close(ForwardGraphs()("k", lambda a: a + 1, x), x + 1)
    assert len(attempts) == 1
    assert not can_graph_training(x.device, checkpointing=False, scaler=None)
    assert not graphs_module.capture_failed(torch.device("cuda:7"))


def test_capture_streams_are_reused_and_never_shared_by_concurrent_captures(monkeypatch):
    import eym.graphs as graphs_module

    made = []

    class FakeStream:  # torch.cuda.Stream needs a card; the cache's logic does not
        def __init__(self, device):
            made.append(self)

    monkeypatch.setattr(graphs_module.torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(graphs_module, "_STREAMS", {})
    card = torch.device("cuda:0")
    for _ in range(5):  # one job after another: one stream, made once
        with graphs_module._capture_stream(card) as s:
            first = s
    assert len(made) == 1 and first is made[0]
    with graphs_module._capture_stream(card) as a, graphs_module._capture_stream(card) as b:
        assert a is not b  # two captures at once (two workers) get their own streams
    assert len(made) == 2
    with graphs_module._capture_stream(torch.device("cuda:1")) as c:
        assert c not in (a, b)  # another card, another stream
    for _ in range(3):
        with graphs_module._capture_stream(card) as a2, graphs_module._capture_stream(card) as b2:
            assert {a2, b2} == {a, b}  # both reused: the cache is as large as the most concurrent captures
    assert len(made) == 3
