"""Regional compilation: ``torch.compile`` on the repeated blocks only, never the whole UNet.

The regions are diffusers' ``ResnetBlock2D`` and ``Transformer2DModel`` (with its transformer
blocks, the installed attention processors and the temporal attention hooked into them) in the
UNet and the ControlNet. Eager, a step spends a quarter of its GPU time on memory-bound
glue between the matmuls and convolutions (norms up-cast by autocast, SiLU, GEGLU, residual
adds, layout copies); compiled, inductor fuses it: 26-28% faster tuning steps at 8 frames on
an H200, and 2-3 GB less memory (docs/PERFORMANCE.md). Shapes are static: a job's frame count
and size are fixed, each block configuration gets one graph per shape, grad mode and set of
trained tensors, and nothing recompiles after the first step of a stage. Naive compilation of
the whole UNet recompiled on shape changes and was slower.

Compiling costs minutes on a cold cache (about 6 at 8 frames on the H200) and tens of seconds
on a warm one, paid by the first job of each frame count in a process: it pays in a long-lived
process (an app) that runs several jobs, not in a one-shot edit, so it is opt-in. Compiled
graphs are kept across processes in inductor's on-disk cache under ``eym_home()/"inductor"``
(``TORCHINDUCTOR_CACHE_DIR``; an explicit setting wins), so a Space whose ``EYM_HOME`` lies on
its persistent storage (``/data``) or the HF cache volume pays the cold compile once, not on
every restart (docs/DEPLOY.md).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from eym.env import eym_home

__all__ = ["BACKEND", "compiled_regions", "configure_dynamo", "inductor_cache_dir", "region_kinds", "use_persistent_compile_cache"]

BACKEND = "inductor"  # what compiled_regions uses by default (tests swap in a cheaper one)
RECOMPILE_LIMIT = 256  # graphs per block class a process may hold: several frame counts and sizes


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


def configure_dynamo() -> None:
    """Set, for the process (idempotent, never undone), what compiled blocks need of dynamo.

    Process-wide like the compile cache, not patched per block: two jobs compiling at once on
    two model copies would otherwise restore each other's settings mid-stage.
    """
    import torch._dynamo

    config = torch._dynamo.config
    # The blocks of a kind share one code object (their class's forward), whose cache holds one
    # entry per block configuration, shape, grad mode and set of trained tensors (dozens for SD
    # 1.5's two stages at one frame count); dynamo's default of 8 would send the rest, or a
    # process's next frame count, back to eager without a word.
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(RECOMPILE_LIMIT, getattr(config, limit)))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(4 * RECOMPILE_LIMIT, config.accumulated_recompile_limit)
    # Tuning swaps parameters' storage and dtype in place (``p.data = ...``: fp32 while trained,
    # float32 norms); by default dynamo skips the tensor guards of a module whose __dict__ did not
    # change, and would replay a graph built for the old dtype on the new storage.
    if hasattr(config, "skip_tensor_guards_with_matching_dict_tags"):
        config.skip_tensor_guards_with_matching_dict_tags = False


def region_kinds() -> tuple[type[nn.Module], ...]:
    """The module classes :func:`compiled_regions` compiles: the UNet's and ControlNet's repeated blocks."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return (ResnetBlock2D, Transformer2DModel)


def _regions(models: tuple[nn.Module, ...], kinds: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """The outermost modules of ``kinds`` in ``models`` (a compiled block traces what it holds)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for model in models:
        for module in model.modules():
            if id(module) in inside:
                continue
            if isinstance(module, kinds):
                found.append(module)
                inside.update(id(m) for m in module.modules())
    return found


@contextlib.contextmanager
def compiled_regions(
    *models: nn.Module,
    enabled: bool = True,
    fullgraph: bool = False,
    backend: str | None = None,
    kinds: tuple[type[nn.Module], ...] | None = None,
) -> Iterator[int]:
    """Compile the repeated blocks of ``models`` for the duration; eager again after.

    Args:
        models: the inflated UNet, the ControlNet (any modules holding the blocks).
        enabled: ``False`` makes this a no-op (one code path for both settings).
        fullgraph: refuse graph breaks. Off by default: the temporal attention's zero check
            (``TemporalAttention.is_zero``) reads the host, a graph break that runs eagerly
            (inside a CUDA graph capture too: its answer is cached, it reads the GPU only after
            the weights changed).
        backend: the torch.compile backend; ``None``: :data:`BACKEND`.
        kinds: the module classes to compile; ``None``: :func:`region_kinds`.

    Yields:
        How many modules run compiled.
    """
    modules = _regions(models, kinds or region_kinds()) if enabled else []
    if modules:
        use_persistent_compile_cache()
        configure_dynamo()
    try:
        for module in modules:
            # static shapes: one graph per shape, none of dynamo's "automatic dynamic" second
            # compile that a changed shape would trigger
            module.compile(dynamic=False, fullgraph=fullgraph, backend=backend or BACKEND)
        yield len(modules)
    finally:
        for module in modules:
            # nn.Module.compile keeps its compiled wrapper here; dropping it restores eager calls.
            # The compiled code stays in dynamo's cache, so the next job with these shapes reuses it.
            module._compiled_call_impl = None
