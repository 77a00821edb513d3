"""jacfd: finite-difference Jacobians that compose with ``torch.func``."""

from ._src._jacfd import jacfd

__all__ = ["jacfd"]
__version__ = "0.1.0"

jacfd.__module__ = "jacfd"
