"""Edit-Your-Motion: one-shot video motion editing (SD 1.5 + ControlNet-openpose).

Importing ``eym`` loads no weights, reads no argv and touches no GPU or network. It only sets
the telemetry switches of the libraries it uses to "off" (see :mod:`eym.env`).
"""

from eym.env import apply_offline_hygiene as _apply_offline_hygiene
from eym.errors import EymError

_apply_offline_hygiene()

__version__ = "0.1.0"
__all__ = ["EymError", "__version__"]
