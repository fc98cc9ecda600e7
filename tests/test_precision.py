import pytest

from keras_matquant import active_precision
from keras_matquant import precision


def test_default_outside_scope():
    assert active_precision(default=8) == 8


def test_scope_sets_and_restores():
    with precision(4):
        assert active_precision(default=8) == 4
    assert active_precision(default=8) == 8


def test_nested_scopes_innermost_wins():
    with precision(4):
        with precision(2):
            assert active_precision(default=8) == 2
        assert active_precision(default=8) == 4


def test_none_means_float():
    with precision(None):
        assert active_precision(default=8) is None


def test_scope_restored_after_error():
    with pytest.raises(RuntimeError):
        with precision(2):
            raise RuntimeError("inside the scope")
    assert active_precision(default=8) == 8


@pytest.mark.parametrize("bits", [0, 9, 3.5, "4", True])
def test_invalid_precision_rejected(bits):
    with pytest.raises(ValueError, match="precision"):
        with precision(bits):
            pass
