"""jacfd: finite-difference Jacobians that compose with ``torch.func``."""

from ._src._jacfd import jacfd, jacfd_with_error

__all__ = ["jacfd", "jacfd_with_error"]
__version__ = "0.1.0"

for _public in (jacfd, jacfd_with_error):
    _public.__module__ = "jacfd"
del _public
