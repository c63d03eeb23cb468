"""timm_ensembles.utils.checks: what a whole number and a number are, their bounds, and the lines that refuse a
value."""
import math

import numpy as np
import pytest

from timm_ensembles.utils.checks import (
    check_number,
    check_option,
    check_range,
    check_whole,
    flag_message,
    is_number,
    is_whole,
)


def test_a_bool_is_never_a_number_and_numpy_scalars_only_when_asked():
    assert is_whole(3) and not is_whole(True) and not is_whole(3.0) and not is_whole('3')
    assert not is_whole(np.int64(3)) and is_whole(np.int64(3), numpy=True) and not is_whole(np.True_, numpy=True)
    assert is_number(0.5) and is_number(2) and not is_number(False) and not is_number('0.5')
    assert not is_number(np.float32(0.5)) and is_number(np.float32(0.5), numpy=True)
    assert not is_number(math.inf) and not is_number(math.nan)
    assert is_number(math.inf, finite=False) and is_number(math.nan, finite=False)


def test_bounds_inclusive_and_exclusive_and_nan_in_none():
    assert [is_number(v, ge=0, lt=1) for v in (-0.1, 0, 0.5, 1)] == [False, True, True, False]
    assert [is_number(v, gt=0, le=1) for v in (0, 1e-9, 1, 1.5)] == [False, True, True, False]
    assert [is_whole(v, ge=1, le=5) for v in (0, 1, 5, 6)] == [False, True, True, False]
    assert not is_number(math.nan, gt=0, finite=False)
    with pytest.raises(ValueError, match=r'^x must be in \[0, 1\), got nan\.$'):
        check_range('x', math.nan, 'in [0, 1)', ge=0, lt=1)


def test_the_messages_and_what_is_returned():
    assert check_whole('n', 3, 'a positive integer', ge=1) == 3 and check_whole('n', None, '-', optional=True) is None
    with pytest.raises(ValueError, match=r"^n must be a positive integer, got True\.$"):
        check_whole('n', True, 'a positive integer', ge=1)
    with pytest.raises(KeyError, match=r"n must be None or a positive integer, got '2'\."):
        check_whole('n', '2', 'None or a positive integer', ge=1, optional=True, error=KeyError)
    with pytest.raises(ValueError, match=r'^t must be a finite number > 0, got inf\.$'):
        check_number('t', math.inf, 'a finite number > 0', gt=0)
    # a range check shows the number as str(): numpy's repr would say np.float64(2.0)
    with pytest.raises(ValueError, match=r'^m must be in \[0, 1\), got 2\.0\.$'):
        check_range('m', np.float64(2.0), 'in [0, 1)', lt=1)
    assert flag_message('decay_milestones', [10, 0], 'one or more epochs >= 1') == \
        '--decay-milestones 10 0: must be one or more epochs >= 1.'


def test_check_option_takes_nan_as_a_number_and_refuses_below_low():
    check_option('w', math.nan, float, low=0)  # a NaN is a number here: the task's own range check refuses it
    with pytest.raises(ValueError, match=r"^k must be an integer, got 1\.0\.$"):
        check_option('k', 1.0, int)
    with pytest.raises(ValueError, match=r'^w must be >= 0, got -1\.$'):
        check_option('w', -1, float, low=0)
