"""check_grad: planted bugs in classic autograd.Functions, compared with
torch.autograd.gradcheck."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from jacfd import GradCheckError, check_grad


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class SquareWrongSign(Square):
    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        return -2 * x * grad


class SquareMissingFactor(Square):
    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        return x * grad


class SquareOneElementWrong(Square):
    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        result = 2 * x * grad
        result[2] = result[2] * 1.01
        return result


class MatVec(torch.autograd.Function):
    """y = W @ x, differentiated in both W and x."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, x)
        return w @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, x = ctx.saved_tensors
        return torch.outer(grad, x), w.T @ grad


class MatVecSwapped(MatVec):
    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, x = ctx.saved_tensors
        return torch.outer(grad, x), w @ grad  # bug: W instead of W.T


class Cube(torch.autograd.Function):
    """With forward-mode support (jvp), classic style."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.x = x
        return x**3

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> Any:
        return 3 * ctx.x * tangent  # bug: 3 x^2


def _x(n: int = 5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.linspace(-1.5, 2.0, n, dtype=dtype)


def _gradcheck(f: Any, *args: torch.Tensor) -> bool:
    inputs = tuple(a.detach().clone().requires_grad_() for a in args)
    return bool(torch.autograd.gradcheck(f, inputs, raise_exception=False))


SQUARE_CASES = [
    (Square, set()),
    (SquareWrongSign, {0, 1, 2, 3, 4}),
    (SquareMissingFactor, {0, 1, 2, 3, 4}),
    (SquareOneElementWrong, {2}),
]


@pytest.mark.parametrize(("fn", "wrong"), SQUARE_CASES)
def test_planted_bugs_elementwise(fn: Any, wrong: set[int]) -> None:
    x = _x()
    report = check_grad(fn.apply, x)
    assert report.passed == (not wrong) == _gradcheck(fn.apply, x)
    (pair,) = report.pairs
    assert pair.failures == len(wrong)
    failing = {e.output_index[0] for e in pair.worst if e.failed}
    assert failing == wrong
    for e in pair.worst:
        if e.failed:
            assert e.output_index == e.input_index  # diagonal entries
            assert e.finite_difference == pytest.approx(2 * x[e.input_index].item(), rel=1e-8)


@pytest.mark.parametrize(("fn", "ok"), [(MatVec, True), (MatVecSwapped, False)])
def test_planted_bug_swapped_indices(fn: Any, ok: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64)
    report = check_grad(fn.apply, w, x, argnums=(0, 1))
    assert report.passed == ok == _gradcheck(fn.apply, w, x)
    by_input = {pair.input: pair for pair in report.pairs}
    assert set(by_input) == {"args[0]", "args[1]"}
    assert by_input["args[0]"].passed
    if not ok:
        bad = by_input["args[1]"]
        assert bad.failures == 12  # every off-diagonal entry of W vs W.T
        worst = bad.worst[0]
        i, j = worst.output_index[0], worst.input_index[0]
        assert worst.autograd == pytest.approx(w[j, i].item())
        assert worst.finite_difference == pytest.approx(w[i, j].item(), rel=1e-8)


def test_pytree_inputs_and_outputs() -> None:
    torch.manual_seed(0)
    params = {
        "w": torch.randn(3, 4, dtype=torch.float64),
        "b": torch.randn(3, dtype=torch.float64),
    }
    x = torch.randn(4, dtype=torch.float64)

    def f(p: dict[str, torch.Tensor], x: torch.Tensor, *, scale: float) -> dict[str, Any]:
        y = torch.tanh(p["w"] @ x + p["b"]) * scale
        return {"y": y, "parts": (y.sum(), Square.apply(x))}  # type: ignore[no-untyped-call]

    report = check_grad(f, params, x, argnums=(0, 1), kwargs={"scale": 2.0})
    assert report.passed
    names = {(pair.output, pair.input) for pair in report.pairs}
    assert ("out['y']", "args[0]['w']") in names
    assert ("out['parts'][1]", "args[1]") in names
    assert len(report.pairs) == 3 * 3


def test_float32_correct_function_passes() -> None:
    x = _x(8, torch.float32)
    assert check_grad(Square.apply, x).passed
    assert check_grad(lambda v: torch.sin(v).cumsum(0) * v.exp(), x).passed
    assert not check_grad(SquareOneElementWrong.apply, x).passed


def test_forward_mode() -> None:
    x = _x()
    assert check_grad(lambda v: torch.sin(v) * v.sum(), x, mode="forward").passed
    report = check_grad(Cube.apply, x, mode="forward")
    assert not report.passed
    assert check_grad(Cube.apply, x).passed  # backward is right, jvp is not


def test_raise_error_and_report_text() -> None:
    x = _x()
    with pytest.raises(GradCheckError) as info:
        check_grad(SquareOneElementWrong.apply, x, raise_error=True)
    assert isinstance(info.value, AssertionError)
    text = str(info.value)
    assert text == str(info.value.report)
    assert "FAILED" in text and "(2,)" in text and "FAIL" in text.splitlines()[-5]
    check_grad(Square.apply, x, raise_error=True)


def test_report_str_has_worst_entries() -> None:
    report = check_grad(SquareMissingFactor.apply, _x())
    text = str(report)
    assert "worst entries of d out / d args[0]" in text
    assert text.count("FAIL") >= 5
    assert str(check_grad(Square.apply, _x())).startswith("check_grad passed")


def test_overrides() -> None:
    # A huge atol lets the planted bug pass: the overrides are honoured.
    assert check_grad(SquareMissingFactor.apply, _x(), atol=10.0).passed
    assert not check_grad(SquareMissingFactor.apply, _x(), rtol=0.1).passed


def test_bad_input() -> None:
    x = _x()
    with pytest.raises(ValueError, match=r"^check_grad"):
        check_grad(Square.apply, x, mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^check_grad"):
        check_grad(Square.apply, x, argnums=[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^check_grad"):
        check_grad(Square.apply, torch.arange(3))
    with pytest.raises(ValueError, match=r"^check_grad"):
        check_grad(Square.apply, x, safety=-1.0)
    with pytest.raises(TypeError, match=r"^check_grad"):
        check_grad(Square.apply)
    with pytest.raises(ValueError, match=r"^check_grad"):
        check_grad(Square.apply, x, scheme="sideways")  # type: ignore[arg-type]
