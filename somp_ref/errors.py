"""Errors a user can fix, as opposed to bugs.

The ``somp-ref`` command prints an expected error as one line and exits with status 2; a
bug keeps its traceback. Besides the built-in classes the command treats as expected (see
:data:`somp_ref.cli.EXPECTED_ERRORS`), any class deriving from :class:`UserError` is
expected: that is how modules the core never imports (``adapters``' ``ModelLoadError``)
declare theirs.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of errors caused by what the user passed or by their environment (a missing
    file, a model that cannot be loaded); the message says what is wrong and what to do."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message gives the line that installs it
    (an ImportError, so callers catching ImportError still do)."""


class InputTypeError(UserError, TypeError):
    """An argument of the wrong type, found by the boundary checks of
    :mod:`somp_ref.validation` (a TypeError, so callers catching TypeError still do)."""
