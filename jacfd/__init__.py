"""jacfd: finite-difference Jacobians that compose with ``torch.func``."""

from ._src._gradcheck import check_grad
from ._src._gradcheck_report import (
    GradCheckEntry,
    GradCheckError,
    GradCheckPair,
    GradCheckReport,
)
from ._src._jacfd import jacfd, jacfd_with_error
from ._src._jvp import jvpfd
from ._src._patterns import (
    SparsityReport,
    banded_pattern,
    block_diagonal_pattern,
    check_sparsity,
    diagonal_pattern,
)
from ._src._second import hessdiagfd, hessfd, laplacianfd
from ._src._strategy import Batched

__all__ = [
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
    "hessdiagfd",
    "hessfd",
    "jacfd",
    "jacfd_with_error",
    "jvpfd",
    "laplacianfd",
]
__version__ = "0.1.0"

for _public in (
    Batched,
    GradCheckEntry,
    GradCheckError,
    GradCheckPair,
    GradCheckReport,
    SparsityReport,
    banded_pattern,
    block_diagonal_pattern,
    check_grad,
    check_sparsity,
    diagonal_pattern,
    hessdiagfd,
    hessfd,
    jacfd,
    jacfd_with_error,
    jvpfd,
    laplacianfd,
):
    _public.__module__ = "jacfd"
del _public
