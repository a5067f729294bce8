"""The exception hierarchy: declared by the compiled core, raised by it as the classes users import
from ``denselora.errors``, and usable like any Python exception (built-in bases, pickling)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from denselora import _core, errors
from denselora.errors import (
    ArgumentError,
    BasisMismatchError,
    ChecksumError,
    ConfigError,
    DenseLoRAError,
    DTypeError,
    FormatError,
    IncompatibleAdapterError,
    LayoutError,
    NonFiniteError,
    NotMergeableError,
    ShapeError,
)

# class -> its direct bases, as documented in denselora.errors
HIERARCHY = {
    DenseLoRAError: (Exception,),
    ConfigError: (DenseLoRAError, ValueError),
    FormatError: (DenseLoRAError, ValueError),
    ChecksumError: (FormatError,),
    IncompatibleAdapterError: (DenseLoRAError, ValueError),
    BasisMismatchError: (IncompatibleAdapterError,),
    NotMergeableError: (DenseLoRAError, ValueError),
    ArgumentError: (DenseLoRAError, ValueError),
    ShapeError: (ArgumentError,),
    DTypeError: (DenseLoRAError, TypeError),
    LayoutError: (ArgumentError,),
    NonFiniteError: (DenseLoRAError, ValueError),
}


def test_hierarchy_and_builtin_bases():
    assert set(HIERARCHY) == {getattr(errors, name) for name in errors.__all__}
    for cls, bases in HIERARCHY.items():
        assert cls.__bases__ == bases, cls
        assert cls.__module__ == "denselora.errors" and cls.__qualname__ == cls.__name__
        assert cls.__doc__ and cls.__doc__.strip()
        assert getattr(_core, cls.__name__) is cls
        assert issubclass(cls, Exception)
    for cls in (ConfigError, FormatError, ChecksumError, IncompatibleAdapterError, BasisMismatchError,
                NotMergeableError, ArgumentError, ShapeError, LayoutError, NonFiniteError):
        assert issubclass(cls, DenseLoRAError) and issubclass(cls, ValueError), cls
        assert not issubclass(cls, TypeError)
    assert issubclass(DTypeError, DenseLoRAError) and issubclass(DTypeError, TypeError)
    assert not issubclass(DTypeError, ValueError)
    assert ChecksumError.__mro__.index(FormatError) < ChecksumError.__mro__.index(ValueError)


def test_errors_raised_by_the_core_are_the_classes_users_catch(tmp_path):
    bad = tmp_path / "bad.dl"
    bad.write_bytes(b"not a bundle at all, just some bytes" * 4)
    with pytest.raises(FormatError, match="bad.dl") as caught:
        _core.Bundle(bad)
    assert type(caught.value) is FormatError and isinstance(caught.value, ValueError)
    with pytest.raises(ValueError):  # a generic handler catches it too
        _core.Bundle(bad)
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError):  # DTypeError, caught as the built-in
        _core.fused_branch(x.astype(np.float64), x, x, x, x, scale=1.0, encoder_activation="gelu",
                           decoder_activation="gelu", num_threads=1)
    with pytest.raises(ShapeError) as caught:
        _core.linear_assignment([[1.0, 2.0], [3.0]])
    assert isinstance(caught.value, ArgumentError) and str(caught.value).startswith("cost:")
    with pytest.raises(NonFiniteError):
        _core.linear_assignment([[float("nan")]])
    with pytest.raises(FileNotFoundError):
        _core.Bundle(tmp_path / "missing.dl")


@pytest.mark.parametrize("cls", list(HIERARCHY))
def test_errors_pickle_and_unpickle(cls):
    err = cls("adapter 'a': tensor 'x' is wrong")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and back.args == err.args and str(back) == str(err)


def test_a_raised_core_error_pickles(tmp_path):
    # A bundle whose two-byte catalog does not match the checksum in its footer.
    preamble = b"DLBUNDLE" + (1).to_bytes(4, "little") + bytes(52)
    footer = b"".join(v.to_bytes(8, "little") for v in (len(preamble), 2, 0)) + b"DLBNDEND"
    bad = tmp_path / "bad.dl"
    bad.write_bytes(preamble + b"{}" + footer)
    with pytest.raises(ChecksumError, match="checksum mismatch in the catalog") as caught:
        _core.Bundle(bad)
    back = pickle.loads(pickle.dumps(caught.value))
    assert type(back) is ChecksumError and str(back) == str(caught.value)
