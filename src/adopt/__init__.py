"""ADOPT optimizer for PyTorch (Taniguchi et al., NeurIPS 2024).

>>> from adopt import ADOPT
>>> optimizer = ADOPT(model.parameters(), lr=1e-3)
"""

from importlib.metadata import PackageNotFoundError, version

from .functional import adopt
from .info import environment_info
from .optimizer import ADOPT
from .schedules import DEFAULT_CLIP, PowerClip

try:
    __version__ = version("adopt-optim")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = ["ADOPT", "adopt", "PowerClip", "DEFAULT_CLIP", "environment_info", "__version__"]
