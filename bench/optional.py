"""Stand-ins for optional modules that a GPU bench box lacks (no OpenCV wheel there).

eym.editor imports OpenCV at module level (through eym.preprocess), but the benches never call
it (frames are synthetic arrays, skeletons drawn beforehand). ``stub_if_missing("cv2")`` before
importing eym.editor makes the import work; any use of the stand-in fails loudly.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


def placeholder_module(name: str) -> types.ModuleType:
    """A module whose every attribute lookup raises ImportError (dunders: AttributeError, so
    tools that scan ``sys.modules`` pass over it)."""
    module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, loader=None))

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ImportError(f"{name} is not installed here; this bench should not need {name}.{attr}")

    module.__getattr__ = missing  # type: ignore[method-assign]
    return module


def stub_if_missing(name: str) -> bool:
    """Install :func:`placeholder_module` as ``name`` if it is not installed; whether it did."""
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return False
    if name == "cv2":
        import diffusers.utils.import_utils  # noqa: F401  records "no OpenCV" before the stand-in exists
    sys.modules[name] = placeholder_module(name)
    return True
