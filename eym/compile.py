"""Regional compilation: ``torch.compile`` on the repeated small blocks only, never the whole UNet.

The temporal attention (:class:`eym.spacetime.TemporalAttention`) attends over F = 8-24 tokens
at each of h*w positions; eager, it is a dozen small kernels per call and launch-bound
(docs/PERFORMANCE.md). Compiled, inductor fuses its norm, permutes and projections. Only these
modules are compiled, with static shapes: SD 1.5 has four token shapes (one per resolution
level), every block of a level shares one graph (dynamo guards on shapes, not on the module
instance), and a job's frame count is fixed, so after the first step nothing recompiles. Naive
compilation of the whole UNet recompiled on shape changes and was slower.

Compiled graphs are kept across processes in inductor's on-disk cache under
``eym_home()/"inductor"`` (``TORCHINDUCTOR_CACHE_DIR``; an explicit setting wins), so a Space
whose ``EYM_HOME`` lies on its persistent storage (``/data``) or the HF cache volume pays the
compile time once, not on every restart (docs/DEPLOY.md, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from eym.env import eym_home

__all__ = ["BACKEND", "compiled_regions", "inductor_cache_dir", "use_persistent_compile_cache"]

BACKEND = "inductor"  # what compiled_regions uses by default (tests swap in a cheaper one)


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs: ``$TORCHINDUCTOR_CACHE_DIR``, else ``eym_home()/"inductor"``."""
    explicit = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(explicit) if explicit else eym_home() / "inductor"


def use_persistent_compile_cache() -> Path:
    """Point inductor's caches at :func:`inductor_cache_dir` (idempotent) and switch them on.

    Sets ``TORCHINDUCTOR_CACHE_DIR`` unless the user set it (inductor reads it when it looks a
    graph up, so this works before the first compile), and turns on the FX graph cache and the
    AOT-autograd cache, which hold the forward and backward graphs on disk.
    """
    path = inductor_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return path


def _regions(model: nn.Module) -> list[nn.Module]:
    from eym.spacetime import TemporalAttention

    return [m for m in model.modules() if isinstance(m, TemporalAttention)]


@contextlib.contextmanager
def compiled_regions(
    model: nn.Module, *, enabled: bool = True, fullgraph: bool = True, backend: str | None = None
) -> Iterator[int]:
    """Compile the temporal attention modules of ``model`` for the duration; eager again after.

    Args:
        model: an inflated UNet (or anything holding ``TemporalAttention`` modules).
        enabled: ``False`` makes this a no-op (one code path for both settings).
        fullgraph: refuse graph breaks (the module is written to have none).
        backend: the torch.compile backend; ``None``: :data:`BACKEND`.

    Yields:
        How many modules run compiled.
    """
    modules = _regions(model) if enabled else []
    stack = contextlib.ExitStack()
    if modules:
        use_persistent_compile_cache()
        import torch._dynamo

        # All compiled modules share one code object (nn.Module's call), whose cache holds one
        # entry per token shape and frame count; dynamo's default of 8 would send a process
        # that tunes 8- and then 24-frame jobs, or a bigger model, back to eager without a word.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        stack.enter_context(torch._dynamo.config.patch(**{limit: max(64, getattr(torch._dynamo.config, limit))}))
    try:
        for module in modules:
            # static shapes: one graph per token shape, none of dynamo's "automatic dynamic"
            # second compile that a changed shape would trigger
            module.compile(dynamic=False, fullgraph=fullgraph, backend=backend or BACKEND)
        yield len(modules)
    finally:
        for module in modules:
            # nn.Module.compile keeps its compiled wrapper here; dropping it restores eager calls.
            # The compiled code stays in dynamo's cache, so the next job with these shapes reuses it.
            module._compiled_call_impl = None
        stack.close()
