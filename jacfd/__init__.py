"""jacfd: finite-difference Jacobians that compose with ``torch.func``."""

import warnings

with warnings.catch_warnings():
    # Without numpy, `import torch` warns "Failed to initialize NumPy"; jacfd needs no
    # numpy, so importing torch on its behalf (as `python -m jacfd` does) stays quiet.
    # Only this message, only here: torch still raises if numpy is used without it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from ._src._adaptive import AdaptiveInfo, jacfd_adaptive
from ._src._differentiable import differentiable
from ._src._gradcheck import check_grad
from ._src._gradcheck_report import (
    GradCheckEntry,
    GradCheckError,
    GradCheckPair,
    GradCheckReport,
)
from ._src._jacfd import jacfd
from ._src._jvp import jvpfd
from ._src._noise import estimate_noise
from ._src._patterns import (
    SparsityReport,
    banded_pattern,
    block_diagonal_pattern,
    check_sparsity,
    diagonal_pattern,
)
from ._src._second import hessdiagfd, hessfd, laplacianfd
from ._src._second_error import hessfd_with_error
from ._src._strategy import Batched
from ._src._with_error import jacfd_with_error

__all__ = [
    "AdaptiveInfo",
    "Batched",
    "GradCheckEntry",
    "GradCheckError",
    "GradCheckPair",
    "GradCheckReport",
    "SparsityReport",
    "banded_pattern",
    "block_diagonal_pattern",
    "check_grad",
    "check_sparsity",
    "diagonal_pattern",
    "differentiable",
    "estimate_noise",
    "hessdiagfd",
    "hessfd",
    "hessfd_with_error",
    "jacfd",
    "jacfd_adaptive",
    "jacfd_with_error",
    "jvpfd",
    "laplacianfd",
]
__version__ = "0.1.0"

# Documented and shown as jacfd.<name>, as torch.func's transforms are (exposed_in).
for _name in __all__:
    globals()[_name].__module__ = "jacfd"
del _name
