"""jacfd's predecessor, JacrevFinite, as the baseline of the per-call overhead section.

Source: the 2024 report and repository "JacrevFinite",
https://github.com/schrodingerslemur/jacrev_finite, file ``JacrevFinite.py`` at commit
``37e1988f49c36ebde8e49035ab159b727defa4f8`` (last change to that file: ``f02dda0``,
2024-07-19), with the report ``Jacrev.pdf`` and the timing script ``timetest.py``
beside it. The repository has no licence file, so this is not its text: it is a
re-implementation that performs the same tensor operations, in the same order, as
``JacrevFinite.__call__``, so that timing it times the predecessor's algorithm:

1. inputs to tensors: a single argument is cast to float64 (after ``unsqueeze(0)`` and
   ``list``, which leaves the same tensor shape); with several, non-tensors become
   float64 tensors and tensors are kept as they are;
2. the check that every input has as many dimensions as the first;
3. one call of ``function`` at the unperturbed inputs, only to learn the output shape;
4. the batch: a new axis 0 (or the size-1 axis ``dim``), the differentiated input
   repeated ``n`` times along it plus (or minus) ``delta * eye(n)``, concatenated after
   the unperturbed input, and every other input repeated to ``n + 1``;
5. ``wrapper``, then one call of ``function`` on the batch;
6. the output's batch axis found as the first axis of size ``n + 1``, then
   ``(f(x + delta e_i) - f(x)) / delta``, reshaped and permuted to jacrev's layout, and
   negated for ``method="minus"``.

Its defects (CONTEXT.md, section 1) are kept on purpose: this is a baseline, not a tool.
Only the per-call state that it keeps on ``self`` is held in locals here (same work).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class JacrevFinite:
    """``JacrevFinite(function=, num_args=, ...)(*args)``: the predecessor's interface."""

    def __init__(
        self,
        *,
        function: Callable[..., Tensor],
        num_args: int,
        wrapper: Callable[..., Sequence[Any]] | None = None,
        dim: int | None = None,
        delta: float = 1e-5,
        override_dim_constraint: bool = False,
        method: str = "plus",
    ) -> None:
        # The original validates with asserts; kept, since they are part of its cost.
        assert isinstance(num_args, int), "num_args must be int"
        assert isinstance(dim, int) or dim is None, "dim must be int or None"
        assert isinstance(override_dim_constraint, bool), "override_dim_constraint must be bool"
        assert method in ["plus", "minus"], "method must be 'plus' or 'minus'"
        self.function = function
        self.wrapper = wrapper
        self.num_args = num_args
        self.delta = delta
        self.dim = dim
        self.override = override_dim_constraint
        self.method = method

    def __call__(self, *args: Any) -> Tensor:
        assert self.num_args < len(args), "invalid num_args"
        inputs = self._to_tensors(args)
        if not self.override:
            rank = inputs[0].dim()
            for tensor in inputs:
                assert tensor.dim() == rank, "inputs differ in their numbers of dimensions"
        output_shape = list(self.function(*self._wrap(inputs)).shape)  # an extra call of f
        batch, batch_size = self._batch(inputs)
        output = self.function(*self._wrap(batch))
        return self._jacobian(output, list(inputs[self.num_args].shape), output_shape, batch_size)

    @staticmethod
    def _to_tensors(args: tuple[Any, ...]) -> list[Tensor]:
        if len(args) == 1:
            single = args[0] if isinstance(args[0], Tensor) else torch.tensor(args[0])
            # unsqueeze then list(): one tensor of the original shape, now float64.
            return list(single.unsqueeze(0).to(torch.float64))
        return [
            arg if isinstance(arg, Tensor) else torch.tensor(arg, dtype=torch.float64)
            for arg in args
        ]

    def _wrap(self, inputs: list[Tensor]) -> Sequence[Any]:
        return inputs if self.wrapper is None else self.wrapper(*inputs)

    def _batch(self, inputs: list[Tensor]) -> tuple[list[Tensor], int]:
        """The stacked inputs: the unperturbed point, then one point per element."""
        tensor = inputs[self.num_args]
        if self.dim is None:
            tensor = tensor.clone().unsqueeze(0)
            dim = 0
        else:
            dim = self.dim
        assert tensor.size(dim) == 1, "wrong dimension to append batch over, size must = 1"
        n = tensor.view(-1).size(0)
        rank = tensor.dim()
        repeats = torch.ones(rank, dtype=int).tolist()  # a tensor round trip, as in the original
        repeats[dim] = n
        # The identity's columns go to the last axis, which is then moved to ``dim``.
        eye_shape = list(tensor.shape)
        eye_shape.pop(dim)
        eye_shape.append(n)
        order = [axis if axis < dim else axis - 1 for axis in range(rank)]
        order[dim] = rank - 1
        repeated = tensor.repeat(repeats)
        steps = torch.eye(n, dtype=tensor.dtype, device=tensor.device) * self.delta
        steps = steps.reshape(eye_shape).permute(order)
        perturbed = repeated + steps if self.method == "plus" else repeated - steps
        stacked = torch.cat((tensor, perturbed), dim=dim)
        batch_size = stacked.size(dim)
        others = []
        for index, other in enumerate(inputs):
            if index == self.num_args:
                continue
            other = other.clone()
            if self.dim is None:
                other = other.unsqueeze(0)
            shape = [1] * other.dim()
            shape[dim] = batch_size
            others.append(other.repeat(*shape))
        others.insert(self.num_args, stacked)
        return others, batch_size

    def _jacobian(
        self, output: Tensor, input_shape: list[int], output_shape: list[int], batch_size: int
    ) -> Tensor:
        """Differences over the first output axis of the batch's size, in jacrev layout."""
        dim = list(output.shape).index(batch_size)
        reference = output.select(dim, 0)
        jacobian = (output.transpose(0, dim)[1:] - reference) / self.delta
        jacobian = jacobian.reshape(input_shape + output_shape)
        n_in, n_out = len(input_shape), len(output_shape)
        jacobian = jacobian.permute(*range(n_in, n_in + n_out), *range(n_in))
        if self.method == "minus":
            jacobian = torch.neg(jacobian)
        return jacobian
