"""``check_grad``'s report: :class:`GradCheckReport`, its pairs and entries, and
:class:`GradCheckError`."""

from __future__ import annotations

import math
from dataclasses import dataclass

WORST = 5
"""Entries kept per pair in the report: the largest ratios of error to tolerance."""

DIRECTIONS = 2
"""Random directions (every input moving at once) along which ``check_grad`` first compares
``J @ u``: each costs a few evaluations of func where the entry-wise check costs
a few per input element. One direction already sees a wrong entry anywhere; a
second guards against two wrong entries of one row cancelling by coincidence."""

DIRECTIONS_TIGHTER = 4.0
"""``J @ u`` is compared with ``safety / DIRECTIONS_TIGHTER``: a false alarm there
only costs the entry-wise check, while a miss would change the verdict. The
measurements behind the value are in ``docs/checking.md`` (How the tolerance is
set) and ``tests/test_check.py::test_directions_agree_with_entries_on_the_zoo``."""


UNKNOWN_TOLERANCE = (
    "tolerance nan: the finite difference's step reaches beyond the region where func "
    "is close to its Taylor polynomial, so it cannot check these entries: an input much "
    "smaller than 1 that func scales up (pass steps on the inputs' own scale, e.g. "
    "delta=x.abs() * 1e-6, a tensor or a pytree like the inputs), or a kink (relu, "
    "max-pool) within a step of x (check in float64, where the steps are smaller, or "
    "at another x)."
)


class GradCheckError(AssertionError):
    """Raised by ``check_grad(..., raise_error=True)`` when an entry fails.

    An ``AssertionError``, so test runners report it as a failed assertion; the
    message is the report's table and :attr:`report` the report itself.
    """

    def __init__(self, report: GradCheckReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass(frozen=True)
class GradCheckEntry:
    """One Jacobian entry, ``d output[output_index] / d input[input_index]``, as
    both sides computed it.

    In a report decided along random directions (``report.directions > 0``) it
    is entry ``output_index`` of ``J @ u`` instead, ``u`` being direction
    ``input_index[0]``.

    Attributes:
        output_index: The index into the output leaf.
        input_index: The index into the input leaf (or the direction).
        autograd: Autograd's value.
        finite_difference: jacfd's value.
        tolerance: What the two may differ by (see :func:`check_grad`).
    """

    output_index: tuple[int, ...]
    input_index: tuple[int, ...]
    autograd: float
    finite_difference: float
    tolerance: float

    @property
    def error(self) -> float:
        """``|autograd - finite_difference|``."""
        return abs(self.autograd - self.finite_difference)

    @property
    def failed(self) -> bool:
        """``error > tolerance``, or either value NaN."""
        return not self.error <= self.tolerance

    @property
    def ratio(self) -> float:
        """``error / tolerance``: above 1 fails."""
        return self.error / self.tolerance if self.tolerance > 0 else math.inf * (self.error > 0)


@dataclass(frozen=True)
class GradCheckPair:
    """The comparison for one output leaf and one differentiated input leaf.

    Attributes:
        output: The output leaf's pytree key path: ``out`` for a tensor result,
            ``out[1]`` or ``out['loss']`` inside a pytree.
        input: The input leaf's: ``args[0]`` for a differentiated tensor
            argument, ``args[0]['weight']`` inside one. Along random directions,
            where every input moves at once, ``all inputs`` if there are several.
        shape: The Jacobian block's shape, ``output.shape + input.shape`` (or
            ``output.shape + (directions,)`` for ``J @ u``).
        max_abs_error: The largest ``|autograd - finite difference|``.
        max_rel_error: The largest of the same divided by
            ``max(|autograd|, |finite difference|)``, over the entries larger
            than their tolerance (0 if there are none: an entry that is zero or
            rounding noise on both sides has no relative error to speak of).
        failures: How many entries exceed their tolerance.
        worst: The entries with the largest error-to-tolerance ratios, worst
            first (at most five).
    """

    output: str
    input: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    failures: int
    worst: tuple[GradCheckEntry, ...]

    @property
    def passed(self) -> bool:
        """No entry exceeds its tolerance."""
        return self.failures == 0


@dataclass(frozen=True)
class GradCheckReport:
    """The result of :func:`check_grad`.

    ``str(report)`` is a table of the pairs followed by the worst entries of the
    failing pairs (or of the pair closest to failing, if every entry passed).

    Attributes:
        pairs: One :class:`GradCheckPair` per output/input leaf pair, in
            ``torch.func.jacrev``'s order (output-major).
        mode: The autograd mode checked, ``"reverse"`` or ``"forward"``.
        scheme: The finite-difference scheme.
        safety: The multiple of the error estimate allowed.
        directions: 0 when every entry was compared. Otherwise ``J @ u`` agreed
            along this many random directions ``u``, within
            ``safety / 4``, and each pair's errors and entries are those of
            ``J @ u``: an entry's ``input_index`` is ``(direction,)``. (When
            ``J @ u`` disagrees, every entry is compared.)
    """

    pairs: tuple[GradCheckPair, ...]
    mode: str
    scheme: str
    safety: float
    directions: int = 0

    @property
    def passed(self) -> bool:
        """True when every entry of every pair is within its tolerance."""
        return all(pair.passed for pair in self.pairs)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        failures = sum(pair.failures for pair in self.pairs)
        settings = f"autograd mode={self.mode!r} vs jacfd scheme={self.scheme!r}"
        settings += f", safety={self.safety:g}"
        if self.directions:
            summary = (
                f"J @ u agrees along {self.directions} random directions u, "
                f"within safety/{DIRECTIONS_TIGHTER:g} ({settings}); exhaustive=True "
                "compares every entry"
            )
        else:
            summary = f"{failures} failing entries ({settings})"
        shape, index, of = (
            ("J @ u shape", "direction", "({}) @ u")
            if self.directions
            else ("shape", "input index", "{}")
        )
        lines = [
            f"check_grad {verdict}: {summary}",
            "",
            (
                f"{'output':<16} {'input':<20} {shape:<14} {'max abs err':>12} "
                f"{'max rel err':>12} {'failing':>10}"
            ),
        ]
        for pair in self.pairs:
            total = math.prod(pair.shape)
            lines.append(
                f"{pair.output:<16} {pair.input:<20} {pair.shape!s:<14} "
                f"{pair.max_abs_error:>12.3e} {pair.max_rel_error:>12.3e} "
                f"{f'{pair.failures}/{total}':>10}"
            )
        shown = [pair for pair in self.pairs if not pair.passed]
        if not shown and self.pairs:  # the pair closest to failing
            shown = [max(self.pairs, key=lambda p: p.worst[0].ratio if p.worst else 0.0)]
        for pair in shown:
            if not pair.worst:
                continue
            lines += [
                "",
                f"worst entries of {of.format(f'd {pair.output} / d {pair.input}')}:",
                (
                    f"  {'output index':<16} {index:<16} {'autograd':>14} "
                    f"{'finite diff':>14} {'|difference|':>12} {'tolerance':>10}"
                ),
            ]
            for e in pair.worst:
                mark = "  FAIL" if e.failed else ""
                lines.append(
                    f"  {e.output_index!s:<16} {e.input_index!s:<16} {e.autograd:>14.6e} "
                    f"{e.finite_difference:>14.6e} {e.error:>12.3e} {e.tolerance:>10.3e}{mark}"
                )
        if any(math.isnan(e.tolerance) for pair in shown for e in pair.worst):
            lines += ["", UNKNOWN_TOLERANCE]
        return "\n".join(lines)
