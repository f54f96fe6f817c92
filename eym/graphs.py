"""CUDA graphs of the model calls: tuning's forward + backward, inversion's and sampling's forward.

A step of eym launches thousands of small kernels (the UNet, the ControlNet, RC-Attn, the
temporal attention); on a fast card the host issuing them is a visible part of the step. A CUDA
graph records the kernels of one call once and replays them with a single launch. It replays
fixed kernels on fixed buffers, so it needs what both loops already have: one shape per job (one
clip, one t per step), no host sync inside the call, and the same Python decisions at every
call (processors, injection layers, the skipped zero temporal attention).

- Tuning: :func:`graph_training_call`, a forward and a backward graph of the model call behind
  one autograd Function (what torch's ``make_graphed_callables`` does), with the stage's
  trainables among its inputs, so their gradients come out of the backward graph and autograd
  accumulates them as usual; loss, clipping and AdamW stay eager (a handful of kernels).
- Inference: :class:`ForwardGraphs`, one forward graph per kind of call (with or without
  injection), all in one memory pool, built on the call's first use.

A graph captures the modules as they are at capture time: build it inside the block where
the job's processors are installed, and drop it with that block (both loops do).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable, Hashable, Iterator

import torch

logger = logging.getLogger(__name__)

GRAPH_MIN_STEPS = 10  # a loop with fewer calls left than this runs eagerly: capture would cost more than it saves
# Cache of the cards where a capture failed in this process, keyed by device name: a failed
# capture can leave CUDA state behind (a private pool, the generator's capture mark), so the
# process does not try again there; every later call on that card runs eagerly.
_CAPTURE_FAILED: set[str] = set()
# Cache of the capture streams not in use, keyed by device name: see _capture_stream.
_STREAMS: dict[str, list[torch.cuda.Stream]] = {}
_STREAMS_LOCK = threading.Lock()


def capture_failed(device: torch.device) -> bool:
    """Whether a capture already failed on ``device`` in this process (then graphs are not tried)."""
    return str(device) in _CAPTURE_FAILED


def _record_failure(device: torch.device, error: Exception) -> None:
    _CAPTURE_FAILED.add(str(device))
    logger.warning("CUDA graph capture failed on %s; this process runs the model there without graphs: %s", device, error)


def can_graph_training(device: torch.device, *, checkpointing: bool, scaler) -> bool:
    """Whether a tuning stage can replay its model call (forward and backward) as CUDA graphs.

    Not with gradient checkpointing (it recomputes inside backward) or a GradScaler (fp16: its
    inf check reads the device). Compiled regions are captured like eager modules: their
    guards run at capture, and the replayed shapes, dtypes and processors are the captured ones.
    """
    return device.type == "cuda" and not checkpointing and scaler is None and not capture_failed(device)


@contextlib.contextmanager
def _capture_stream(device: torch.device) -> Iterator[torch.cuda.Stream]:
    """A side stream of ``device`` for one warm-up and capture, taken from the cache and given back.

    cuBLAS keeps a workspace per stream for the life of the process: a new stream per capture
    (as ``make_graphed_callables`` makes) would keep 64 MiB more per graphed job. So streams are
    reused: the cache holds as many per card as captures ever ran there at once (one per worker
    at most), and no two concurrent captures share one.
    """
    with _STREAMS_LOCK:
        free = _STREAMS.setdefault(str(device), [])
        stream = free.pop() if free else torch.cuda.Stream(device)
    try:
        yield stream
    finally:
        with _STREAMS_LOCK:
            free.append(stream)


def _warm_up(fn: Callable[[], object], stream: torch.cuda.Stream, calls: int) -> None:
    """Run ``fn`` ``calls`` times on ``stream``, off any capture: lazy initialisation (cuBLAS
    workspaces, attention plans, cuDNN's choices) must not happen inside one."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


def graph_training_call(fn: Callable, sample_args: tuple[torch.Tensor, ...], trainables: list[torch.Tensor]) -> Callable:
    """``fn(*args)`` replayed as one CUDA graph forward and one backward.

    Call it under the autocast of the eager call, which must have no cast cache. The frozen
    weights are constants of the graphs; ``trainables`` are inputs of the backward graph, which
    returns their gradients, and autograd accumulates them as usual. Each call copies its
    arguments into the captured buffers; the output is the graph's own buffer, overwritten by
    the next call. (torch's ``make_graphed_callables`` does the same but warms up on a new stream
    each time, see :func:`_capture_stream`.)
    """
    device = sample_args[0].device
    torch.cuda.empty_cache()  # the eager steps' cached blocks: the graphs get a pool of their own
    try:
        with torch.cuda.device(device):  # capture on the model's card, which need not be the current one
            graphed = _capture_training(fn, sample_args, tuple(trainables))
    except RuntimeError as e:
        _record_failure(device, e)
        raise

    def call(*args: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(device):  # replay on the stream of the model's card (backward: autograd's thread for it)
            return graphed.apply(*args, *trainables)

    return call


def _capture_training(fn: Callable, sample_args: tuple[torch.Tensor, ...], trainables: tuple[torch.Tensor, ...]):
    """The autograd Function that replays ``fn``'s forward graph and its backward graph."""
    inputs = tuple(a.detach().clone() for a in sample_args)  # the captured buffers; outside the pool

    def forward_backward() -> None:
        out = fn(*inputs, *trainables)
        torch.autograd.grad(out, trainables, torch.empty_like(out), allow_unused=True)

    pool = torch.cuda.graph_pool_handle()
    fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with _capture_stream(sample_args[0].device) as stream:
        _warm_up(forward_backward, stream, calls=3)
        with torch.cuda.graph(fwd, pool=pool, stream=stream, capture_error_mode="thread_local"):
            output = fn(*inputs, *trainables)
        grad_output = torch.empty_like(output)
        with torch.cuda.graph(bwd, pool=pool, stream=stream, capture_error_mode="thread_local"):
            grads = torch.autograd.grad(output, trainables, grad_output, allow_unused=True)
    output = output.detach()  # the forward's autograd graph is not needed again: the backward graph replays it

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args: torch.Tensor) -> torch.Tensor:
            for buffer, value in zip(inputs, args):  # the trainables are the captured tensors themselves
                buffer.copy_(value)
            fwd.replay()
            return output.detach()  # a new view of the buffer each call: autograd sets its grad_fn

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad: torch.Tensor):
            grad_output.copy_(grad)
            bwd.replay()
            return (*(None for _ in inputs), *(None if g is None else g.detach() for g in grads))

    return Graphed  # its methods hold the graphs, the buffers and the pool: dropped with it


class ForwardGraphs:
    """Forward-only CUDA graphs of a model call, one per ``key``, sharing one memory pool.

    ``graphs(key, fn, *args)`` runs ``fn(*args)``: the first time for a key eagerly (a warm-up
    that settles lazy initialisation) and then captured; every later time by copying ``args``
    into the captured inputs and replaying. The returned tensor is the graph's output buffer:
    use it before the next call. The graphs run one at a time, so one pool serves them all.
    """

    def __init__(self) -> None:
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self._pool = None
        self.failed = False  # a capture failed: every call runs eagerly from then on

    def __call__(self, key: Hashable, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        if self.failed or capture_failed(args[0].device):
            return fn(*args)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(fn, args)
            except RuntimeError as e:  # a driver or an op that cannot be captured
                _record_failure(args[0].device, e)
                self.failed = True
                return fn(*args)
        graph, inputs, output = self._graphs[key]
        for buffer, value in zip(inputs, args):
            buffer.copy_(value)
        with torch.cuda.device(inputs[0].device):  # replay on the stream of the model's card
            graph.replay()
        return output

    def _capture(self, fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]):
        with torch.cuda.device(args[0].device):  # the model's card, which need not be the current one
            inputs = [a.clone() for a in args]  # outside the pool: never reused by a graph's temporaries
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with _capture_stream(args[0].device) as stream, torch.no_grad():
                _warm_up(lambda: fn(*inputs), stream, calls=1)
                with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                    output = fn(*inputs)
        return graph, inputs, output

    def __len__(self) -> int:
        return len(self._graphs)
