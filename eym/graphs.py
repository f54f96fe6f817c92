"""CUDA graphs of the model calls: tuning's forward + backward, inversion's and sampling's forward.

A step of eym launches thousands of small kernels (the UNet, the ControlNet, RC-Attn, the
temporal attention); on a fast card the host issuing them is a visible part of the step. A CUDA
graph records the kernels of one call once and replays them with a single launch. It replays
fixed kernels on fixed buffers, so it needs what both loops already have: one shape per job (one
clip, one t per step), no host sync inside the call, and the same Python decisions at every
call (processors, injection layers, the skipped zero temporal attention).

- Tuning: :func:`graph_training_call`, torch's ``make_graphed_callables`` over the model call,
  with the stage's trainables among its inputs, so their gradients come out of the backward
  graph and autograd accumulates them as usual; loss, clipping and AdamW stay eager (they are
  a handful of kernels).
- Inference: :class:`ForwardGraphs`, one forward graph per kind of call (with or without
  injection), all in one memory pool, built on the call's first use.

A graph captures the modules as they are at capture time: build it inside the block where
the job's processors are installed, and drop it with that block (both loops do).
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Hashable

import torch

logger = logging.getLogger(__name__)

# Capture refuses unsafe CUDA calls of this thread only, not of the app's other threads
# (make_graphed_callables takes the setting from torch 2.12; older ones capture in "global" mode).
_THREAD_LOCAL = (
    {"capture_error_mode": "thread_local"}
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {}
)
GRAPH_MIN_STEPS = 10  # a loop with fewer calls left than this runs eagerly: capture would cost more than it saves
# Cache of the cards where a capture failed in this process, keyed by device name: a failed
# capture can leave CUDA state behind (a private pool, the generator's capture mark), so the
# process does not try again there; every later call on that card runs eagerly.
_CAPTURE_FAILED: set[str] = set()


def capture_failed(device: torch.device) -> bool:
    """Whether a capture already failed on ``device`` in this process (then graphs are not tried)."""
    return str(device) in _CAPTURE_FAILED


def _record_failure(device: torch.device, error: Exception) -> None:
    _CAPTURE_FAILED.add(str(device))
    logger.warning("CUDA graph capture failed on %s; this process runs the model there without graphs: %s", device, error)


def can_graph_training(device: torch.device, *, checkpointing: bool, scaler, compiled: bool) -> bool:
    """Whether a tuning stage can replay its model call (forward and backward) as CUDA graphs.

    Not with gradient checkpointing (it recomputes inside backward), a GradScaler (fp16: its inf
    check reads the device) or a compiled region (dynamo's guards run on the host).
    """
    return device.type == "cuda" and not checkpointing and scaler is None and not compiled and not capture_failed(device)


def graph_training_call(fn: Callable, sample_args: tuple[torch.Tensor, ...], trainables: list[torch.Tensor]) -> Callable:
    """``fn(*args)`` replayed as one CUDA graph forward and one backward (``make_graphed_callables``).

    Call it under the autocast of the eager call, which must have no cast cache. The frozen
    weights are constants of the graphs; ``trainables`` join the inputs, so the backward graph
    returns their gradients. Each call copies its arguments into the captured buffers; the
    output is the graph's own buffer, overwritten by the next call.
    """
    device = sample_args[0].device
    torch.cuda.empty_cache()  # the eager steps' cached blocks: the graphs get a pool of their own
    # three warm-up calls on the capture's own stream, as torch advises: lazy initialisation
    # (cuBLAS workspaces, attention plans) must not happen inside the capture
    try:
        with torch.cuda.device(device):  # capture on the model's card, which need not be the current one
            graphed = torch.cuda.make_graphed_callables(fn, (*sample_args, *trainables), num_warmup_iters=3, **_THREAD_LOCAL)
    except RuntimeError as e:
        _record_failure(device, e)
        raise

    def call(*args: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(device):  # replay on the stream of the model's card (backward: autograd's thread for it)
            return graphed(*args, *trainables)

    return call


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
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                fn(*inputs)  # warm-up, off the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = fn(*inputs)
        return graph, inputs, output

    def __len__(self) -> int:
        return len(self._graphs)
