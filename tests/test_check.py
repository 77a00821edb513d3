"""check_grad: planted bugs in classic autograd.Functions, compared with
torch.autograd.gradcheck."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from test_reference import ZOO

from jacfd import Batched, GradCheckError, check_grad, jacfd
from jacfd._src._gradcheck import DIRECTIONS


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


def _gradcheck(f: Any, *args: torch.Tensor, argnums: tuple[int, ...] | None = None) -> bool:
    """torch.autograd.gradcheck with default settings, differentiating ``argnums``
    (default: every argument)."""
    inputs = tuple(
        a.detach().clone().requires_grad_(argnums is None or i in argnums)
        for i, a in enumerate(args)
    )
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
    assert check_grad(fn.apply, w, x, argnums=(0, 1)).passed == ok == _gradcheck(fn.apply, w, x)
    report = check_grad(fn.apply, w, x, argnums=(0, 1), exhaustive=True)
    assert report.passed == ok
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


class TanhMatVec(torch.autograd.Function):
    """y = A @ tanh(x): a wide Jacobian whose rows are sums of cancelling terms."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        ctx.save_for_backward(t, a)
        return a @ t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        t, a = ctx.saved_tensors
        return (a.T @ grad) * (1 - t * t), None


def _one_wrong_entry(i: int, k: int, error: float) -> Any:
    """TanhMatVec whose backward has d y[i] / d x[k] off by ``error``."""

    class Wrong(TanhMatVec):
        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            t, a = ctx.saved_tensors
            result = (a.T @ grad) * (1 - t * t)
            result[k] += error * grad[i]
            return result, None

    return Wrong


def _wide(n: int = 256, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(32, n, generator=generator, dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=generator, dtype=torch.float64)
    return x.to(dtype), a.to(dtype)


def test_directions_decide_a_pass() -> None:
    """A correct gradient passes on J @ u alone; exhaustive=True compares every entry."""
    x, a = _wide()
    report = check_grad(TanhMatVec.apply, x, a)
    assert report.passed and report.directions == DIRECTIONS
    (pair,) = report.pairs
    assert pair.shape == (32, DIRECTIONS)
    assert all(entry.input_index[0] < DIRECTIONS for entry in pair.worst)
    assert "J @ u agrees along 2 random directions" in str(report)
    assert "direction" in str(report).splitlines()[-6]
    full = check_grad(TanhMatVec.apply, x, a, exhaustive=True)
    assert full.passed and full.directions == 0 and full.pairs[0].shape == (32, 256)
    # Forward mode and a jacfd-made function (its noise level sets the step) too.
    with pytest.raises(NotImplementedError, match="jvp"):  # torch's own message
        check_grad(TanhMatVec.apply, x, a, mode="forward")
    forward = check_grad(lambda v: a @ torch.tanh(v), x, mode="forward")
    assert forward.passed and forward.directions == DIRECTIONS
    nested = check_grad(jacfd(torch.sin), _x())
    assert nested.passed and nested.directions == DIRECTIONS


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_wrong_entry_of_a_wide_jacobian(dtype: torch.dtype) -> None:
    """One entry of a 32 x 256 Jacobian (entries up to 0.1) off by 0.01: J @ u
    disagrees, and the entry-wise check that follows names the entry."""
    x, a = _wide(dtype=dtype)
    wrong = _one_wrong_entry(3, 5, 0.01)
    report = check_grad(wrong.apply, x, a)
    assert not report.passed and report.directions == 0
    (pair,) = report.pairs
    assert pair.failures == 1
    assert (pair.worst[0].output_index, pair.worst[0].input_index) == ((3,), (5,))
    if dtype == torch.float64:
        assert _gradcheck(TanhMatVec.apply, x, a, argnums=(0,))
        assert not _gradcheck(wrong.apply, x, a, argnums=(0,))


@pytest.mark.parametrize("error", [1e-2, 1e-4, 1e-6, 1e-12])
def test_directions_and_entries_agree(error: float) -> None:
    """Same verdicts with and without exhaustive=True for single wrong entries
    of decreasing size, at several places. The float64 tolerances are ~3e-9
    per entry, so 1e-12 passes both and the others fail both."""
    x, a = _wide()
    for i, k in [(0, 0), (3, 5), (17, 200), (31, 255)]:
        wrong = _one_wrong_entry(i, k, error).apply
        fast = check_grad(wrong, x, a).passed
        assert fast == check_grad(wrong, x, a, exhaustive=True).passed == (error < 1e-9)


def _planted(func: Any, i: int, k: int, error: float) -> Any:
    """A custom Function computing ``func`` whose backward is autograd's, but
    with ``d out[i] / d x[k]`` (flat indices) off by ``error``."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            out: torch.Tensor = func(x)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            (result,) = torch.func.vjp(func, x)[1](grad)
            result = result.clone()
            result.reshape(-1)[k] += error * grad.reshape(-1)[i]
            return result

    return Planted.apply


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_directions_agree_with_entries_on_the_zoo(dtype: torch.dtype) -> None:
    """Every single-input function of the reference zoo, with one wrong entry at
    four random places, from 1e-1 to 1e-9 of max|J|: the default check (J @ u
    first) reaches the entry-wise verdict every time, small wrong entries next
    to large ones included (at the full safety, J @ u missed two in float32)."""
    verdicts = []
    for name, make in ZOO.items():
        func, args, argnums = make(dtype)
        if len(args) != 1 or argnums != 0:
            continue
        (x,) = args
        jac = torch.func.jacrev(func)(x).reshape(-1, x.numel())
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            i = int(torch.randint(jac.shape[0], (), generator=generator))
            k = int(torch.randint(jac.shape[1], (), generator=generator))
            for size in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9):
                wrong = _planted(func, i, k, size * jac.abs().max().item())
                fast = check_grad(wrong, x).passed
                assert fast == check_grad(wrong, x, exhaustive=True).passed, (name, i, k, size)
                verdicts.append(fast)
    assert len(verdicts) >= 100 and any(verdicts) and not all(verdicts)  # both verdicts met


def test_more_sensitive_than_gradcheck() -> None:
    """An entry off by 1e-6: within gradcheck's 1e-5 + 1e-3 |J_ik|, far outside
    check_grad's float64 tolerance (docs/checking.md quotes both)."""
    x, a = _wide()
    wrong = _one_wrong_entry(3, 5, 1e-6).apply
    assert _gradcheck(wrong, x, a, argnums=(0,))
    assert not check_grad(wrong, x, a).passed


def test_batched_strategy_compares_every_entry() -> None:
    report = check_grad(lambda v: torch.sin(v) * 2, _x(), strategy=Batched())
    assert report.passed and report.directions == 0


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

    assert check_grad(f, params, x, argnums=(0, 1), kwargs={"scale": 2.0}).passed
    report = check_grad(f, params, x, argnums=(0, 1), kwargs={"scale": 2.0}, exhaustive=True)
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

    def moody(v: torch.Tensor) -> Any:  # two outputs under autograd, one under no_grad
        return (v.sin(), v.cos()) if torch.is_grad_enabled() else v.sin()

    for exhaustive in (False, True):
        for mode in ("reverse", "forward"):
            with pytest.raises(ValueError, match=r"^check_grad\(func\): .* \(2 vs 1 Jacobian"):
                check_grad(moody, x, mode=mode, exhaustive=exhaustive)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^check_grad\(func, exhaustive\): expected a bool"):
        check_grad(Square.apply, x, exhaustive=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^check_grad\(func, raise_error\): expected a bool"):
        check_grad(Square.apply, x, raise_error="yes")  # type: ignore[arg-type]


# Issue 12: each test below failed before its fix.


def test_complex_scheme_in_the_directions_stage() -> None:
    """The complex step works in both stages and never blames a correct function."""
    x = _x()
    report = check_grad(torch.sin, x, scheme="complex")
    assert report.passed and report.directions == DIRECTIONS
    assert check_grad(Square.apply, x, scheme="complex").passed
    assert not check_grad(SquareOneElementWrong.apply, x, scheme="complex").passed
    assert not check_grad(SquareMissingFactor.apply, x, scheme="complex").passed


def test_inside_inference_mode() -> None:
    """A correct backward passes inside torch.inference_mode (a wrong one fails)."""
    x, a = _wide(64)
    with torch.inference_mode():
        x, a = x.clone(), a.clone()
        assert check_grad(TanhMatVec.apply, x, a).passed
        assert check_grad(Square.apply, _x(), exhaustive=True).passed
        assert check_grad(torch.sin, _x(), mode="forward").passed
        assert not check_grad(_one_wrong_entry(3, 5, 0.01).apply, x, a).passed


def _hooked(scale: float) -> Any:
    def f(v: torch.Tensor) -> torch.Tensor:
        if v.requires_grad:  # a tensor hook, as torch's gradcheck tests plant a wrong backward
            v.register_hook(lambda g: None if g is None else g * scale)  # gradcheck passes None
        return torch.sin(v)

    return f


def _hooked_always(v: torch.Tensor) -> torch.Tensor:
    v.register_hook(lambda g: None if g is None else g * 2)
    return torch.sin(v)


@pytest.mark.parametrize("func", [_hooked(1.0), _hooked(2.0), _hooked_always])
def test_tensor_hooks_get_gradchecks_verdict(func: Any) -> None:
    x = _x()
    expected = _gradcheck(func, x)
    assert check_grad(func, x).passed == expected
    assert check_grad(func, x, exhaustive=True).passed == expected


class Mul(torch.autograd.Function):
    """x * y with a jvp that records which tangents it was given."""

    seen: list[tuple[bool, bool]] = []  # noqa: RUF012

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_forward(x, y)
        return x * y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise NotImplementedError

    @staticmethod
    def jvp(ctx: Any, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        x, y = ctx.saved_tensors
        Mul.seen.append((bool(tx.abs().sum() > 0), bool(ty.abs().sum() > 0)))
        return tx * y + x * ty


class MulWrong(Mul):
    @staticmethod
    def jvp(ctx: Any, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        x, y = ctx.saved_tensors
        return tx * y + x * ty * 1.001


def test_forward_mode_makes_every_input_dual() -> None:
    """Along a direction every differentiated input is dual at once, as in
    torch.func.jvp: jvp sees both tangents non-zero."""
    x, y = _x(), _x().flip(0) + 3
    Mul.seen.clear()
    report = check_grad(Mul.apply, x, y, argnums=(0, 1), mode="forward")
    assert report.passed and report.directions == DIRECTIONS
    assert (True, True) in Mul.seen
    assert len(report.pairs) == 1 and report.pairs[0].input == "all inputs"
    assert not check_grad(MulWrong.apply, x, y, argnums=(0, 1), mode="forward").passed


@pytest.mark.parametrize("output", [(), {}, None, [()]])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_no_outputs(output: Any, mode: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=r"^check_grad\(func\): func returned no"):
        check_grad(lambda v: output, _x(), mode=mode)


def _numpy_sin(v: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sin(v.numpy()))


def _in_place(v: torch.Tensor) -> torch.Tensor:
    return v.mul_(2)


@pytest.mark.parametrize("func", [_numpy_sin, _in_place])
def test_autograd_errors_are_explained(func: Any) -> None:
    x = _x()
    with pytest.raises(RuntimeError, match=r"^check_grad\(func\): autograd could not") as info:
        check_grad(func, x)
    assert "compares autograd" in str(info.value) and info.value.__cause__ is not None
    assert torch.equal(x, _x())  # the caller's tensor is untouched
    # Forward mode runs both: numpy drops the tangent (autograd says 0), and
    # forward-mode AD follows in-place writes.
    assert check_grad(func, x, mode="forward").passed == (func is _in_place)
    assert torch.equal(x, _x())


class CubeSignFlipped(torch.autograd.Function):
    """f(x) = x0 * x1**2 with d f / d x0 of the wrong sign."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x[0] * x[1] ** 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.stack([-(x[1] ** 2), 2 * x[0] * x[1]])


def test_directions_with_a_large_tolerance_are_inconclusive() -> None:
    """At x ~ 1e-6, J @ u (~1e-12) is far below its tolerance (the truncation
    error of the mixed third derivative along u): the directions cannot tell
    the signs apart, so the entry-wise check decides, and catches the flip."""
    x = torch.tensor([1e-6, 2e-6], dtype=torch.float64)
    report = check_grad(CubeSignFlipped.apply, x)
    assert not report.passed and report.directions == 0
    assert report.pairs[0].worst[0].input_index == (0,)
    assert not _gradcheck(CubeSignFlipped.apply, x * 1e6)  # the same bug at x ~ 1


def test_func_error_at_a_perturbed_point() -> None:
    """A func refusing some points: the directions stage falls back to the
    entry-wise check; a failure there names check_grad and the point."""
    x = _x()

    def one_at_a_time(v: torch.Tensor) -> torch.Tensor:
        if int((v != x).sum()) > 1:
            raise ValueError("func: only one coordinate may change")
        return torch.sin(v)

    report = check_grad(one_at_a_time, x, strategy="loop")
    assert report.passed and report.directions == 0

    def nowhere_else(v: torch.Tensor) -> torch.Tensor:
        if not torch.equal(v, x):
            raise ValueError("func: refusing this point")
        return torch.sin(v)

    with pytest.raises(
        ValueError, match=r"^check_grad\(func\): func raised .*\(args\[0\]\["
    ) as info:
        check_grad(nowhere_else, x, strategy="loop")
    assert isinstance(info.value.__cause__, ValueError)


def test_delta() -> None:
    """A kink 1e-7 from x: the automatic step crosses it (a false alarm), a
    smaller delta does not; tensors and pytrees as in jacfd."""
    x = _x()
    kink = x + 1e-7

    def f(v: torch.Tensor) -> torch.Tensor:
        return (v - kink).abs()

    assert not check_grad(f, x).passed
    assert not check_grad(f, x, exhaustive=True).passed
    for delta in (1e-9, torch.full_like(x, 1e-9), torch.tensor(1e-9, dtype=torch.float64)):
        assert check_grad(f, x, delta=delta).passed
        assert check_grad(f, x, delta=delta, exhaustive=True).passed
    assert check_grad(lambda v, w: (v - kink).abs() * w, x, x, argnums=(0, 1),
                      delta=(1e-9, 1e-9)).passed  # fmt: skip
    assert not check_grad(SquareOneElementWrong.apply, x, delta=1e-9).passed
    for bad, kind in ((-1.0, ValueError), ("1e-9", TypeError), (torch.ones(2), ValueError)):
        with pytest.raises(kind, match=r"^check_grad\(func, delta"):
            check_grad(f, x, delta=bad)


def test_a_step_beyond_the_taylor_region_fails() -> None:
    """b0 = 1e-5 with t up to 2e5: the automatic step is 0.6 of b0, and
    jacfd_with_error marks that column's error inf. Its entries cannot pass (the
    tolerance is NaN, not inf); a step relative to b0 checks them."""
    t = torch.linspace(0, 2e5, 50, dtype=torch.float64)
    b = torch.tensor([1e-5, 1e3], dtype=torch.float64)

    def decay(b: torch.Tensor) -> torch.Tensor:
        return b[1] * torch.exp(-b[0] * t)

    report = check_grad(decay, b)
    assert not report.passed
    assert report.pairs[0].failures == 50 and report.pairs[0].max_rel_error > 1e-4
    assert all(math.isnan(entry.tolerance) for entry in report.pairs[0].worst)
    assert "tolerance nan: the finite difference's step reaches beyond" in str(report)
    assert "delta=x.abs() * 1e-6" in str(report) and "a kink (relu" in str(report)
    assert check_grad(decay, b, delta=b.abs() * 1e-6).passed


def test_relative_error_of_zero_entries() -> None:
    """Entries that are exactly zero (autograd) and rounding noise (finite
    differences) have no relative error to speak of: the report says 0."""

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.stack([v[0] ** 2, v[1] * 0 + 1.0, torch.sin(v[2])])

    for exhaustive in (False, True):
        report = check_grad(f, _x(), exhaustive=exhaustive)
        assert report.passed
        assert report.pairs[0].max_rel_error < 1e-6
        row = str(report).splitlines()[3]
        assert "1.000e+00" not in row and "1.98" not in row


def test_bad_input_names_check_grad() -> None:
    x = _x()
    type_errors: list[dict[str, Any]] = [
        {"atol": "1"},
        {"rtol": None},
        {"safety": True},
        {"kwargs": {1: 2}},
        {"kwargs": [("a", 1)]},
        {"argnums": 0.0},
        {"mode": ["reverse"]},
    ]
    for options in type_errors:
        with pytest.raises(TypeError, match=r"^check_grad\(func"):
            check_grad(torch.sin, x, **options)
    value_errors: list[dict[str, Any]] = [
        {"atol": -1.0},
        {"safety": math.nan},
        {"argnums": 3},
        {"argnums": ()},
        {"strategy": "fast"},
        {"order": 3},
        {"order": "2"},
    ]
    for options in value_errors:
        with pytest.raises(ValueError, match=r"^check_grad\(func"):
            check_grad(torch.sin, x, **options)
    with pytest.raises(TypeError, match=r"^check_grad\(func\): func must be callable"):
        check_grad(3, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^check_grad\(func, \*args\)"):
        check_grad(torch.sin, [1.0, 2.0])
    with pytest.raises(TypeError, match=r"^check_grad\(func, \*args, kwargs\)"):
        check_grad(lambda v: v, x, kwargs={"unexpected": 1})


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("exhaustive", [False, True])
def test_zero_size_inputs_and_outputs(mode: Any, exhaustive: bool) -> None:
    empty = torch.zeros(0, 3, dtype=torch.float64)
    assert check_grad(torch.sin, empty, mode=mode, exhaustive=exhaustive).passed
    assert check_grad(lambda v: v[:0] * 2, _x(), mode=mode, exhaustive=exhaustive).passed
    assert check_grad(
        lambda v, w: (v.sum() * w).sin(), empty, _x(), argnums=(0, 1), mode=mode,
        exhaustive=exhaustive,
    ).passed  # fmt: skip
