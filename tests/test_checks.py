"""k2mini.checks: ints that are not bools, finite reals, bools; errors name the argument and the value."""

import math

import pytest

from k2mini.checks import ArgumentTypeError, check_bool, check_int, check_real


def test_check_int_returns_the_value_within_bounds():
    assert check_int(3, "n") == 3
    assert check_int(1, "n", low=1, high=1) == 1
    assert check_int(-5, "n", high=0) == -5


@pytest.mark.parametrize("bad", [True, False, 1.0, "1", None])
def test_check_int_refuses_bools_and_non_ints_with_type_error(bad):
    with pytest.raises(TypeError, match=r"steps must be an int, got \w+ " + repr(bad).replace(".", r"\.")):
        check_int(bad, "steps")


def test_check_int_range_errors_name_the_bound_the_value_and_where():
    with pytest.raises(ValueError, match=r"^train: steps must be >= 1, got 0$"):
        check_int(0, "steps", low=1, where="train")
    with pytest.raises(ValueError, match=r"^bits must be in \[1, 8\], got 9$"):
        check_int(9, "bits", low=1, high=8)
    with pytest.raises(ValueError, match=r"^k must be <= 4, got 5$"):
        check_int(5, "k", high=4)


def test_check_real_accepts_ints_and_floats_and_returns_a_float():
    out = check_real(2, "lr", low=0)
    assert out == 2.0 and type(out) is float
    assert check_real(0.0, "lr", low=0.0) == 0.0
    assert check_real(1.0, "p", low=0.0, high=1.0) == 1.0


@pytest.mark.parametrize("bad", [True, "0.1", None, [0.1]])
def test_check_real_refuses_bools_and_non_numbers_with_type_error(bad):
    with pytest.raises(TypeError, match="lr must be a real number"):
        check_real(bad, "lr")


def test_check_real_refuses_nan_always_and_inf_unless_allowed():
    with pytest.raises(ValueError, match="lr must be finite, got nan"):
        check_real(math.nan, "lr")
    with pytest.raises(ValueError, match="lr must be finite, got inf"):
        check_real(math.inf, "lr")
    with pytest.raises(ValueError, match="lr must be a number, got nan"):
        check_real(math.nan, "lr", finite=False)
    assert check_real(math.inf, "tau", low=0, finite=False) == math.inf
    with pytest.raises(ValueError, match="must be <= 1"):
        check_real(math.inf, "p", high=1, finite=False)


def test_check_real_open_and_closed_lower_bounds():
    assert check_real(0.0, "x", low=0.0) == 0.0
    with pytest.raises(ValueError, match=r"^qk_clip: tau must be > 0, got 0\.0$"):
        check_real(0, "tau", low=0, low_open=True, where="qk_clip")
    with pytest.raises(ValueError, match=r"^p must be in \(0, 1\], got 0\.0$"):
        check_real(0.0, "p", low=0, high=1, low_open=True)
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\], got 1\.5$"):
        check_real(1.5, "p", low=0, high=1)


def test_check_bool_accepts_only_bools():
    assert check_bool(True, "flag") is True
    assert check_bool(False, "flag") is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(TypeError, match=r"^K2Config: flag must be a bool, got"):
            check_bool(bad, "flag", where="K2Config")


def test_a_wrong_type_is_a_type_error_and_a_value_error_but_a_wrong_range_only_a_value_error():
    for call in (lambda: check_int("3", "n"), lambda: check_real(None, "x"), lambda: check_bool(1, "b")):
        with pytest.raises(ArgumentTypeError) as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError) as info:
        check_int(0, "n", low=1)
    assert not isinstance(info.value, TypeError)
