"""User-facing errors.

Every error a user can cause (a bad file, a bad parameter, a corrupt bundle, an unknown id)
is raised as a subclass of :class:`DmpError` whose message names the file, row, field or
parameter and says what to do. Entry points (``train.py``, ``serve.py``, ``python -m ...``)
print the message and exit with status 2 instead of showing a stack trace.
"""

from __future__ import annotations


class DmpError(Exception):
    """Base class of errors caused by input, configuration or artifacts (not by a bug)."""


class DataError(DmpError, ValueError):
    """An input file or table is missing, unreadable or lacks what is required."""


class InsufficientDataError(DataError):
    """The data cannot support an optional step (a time span shorter than the label window, too few
    positives, no event times, too few users for the segments). The training job skips that stage
    with this message as its reason, unless ``<stage>.required=true``, which makes it an error."""


class ConfigError(DmpError, ValueError):
    """A configuration value is invalid."""


class NonFiniteError(DmpError, ValueError):
    """Training diverged (a NaN or infinite loss) or produced vectors that are not finite."""


class BundleError(DmpError):
    """An artifact bundle is missing, corrupt or incompatible."""


class UnknownIdError(DmpError, KeyError):
    """A user or item id is not known to the model.

    Subclasses :class:`KeyError` so ``except KeyError`` keeps working; ``str()`` gives the
    plain message instead of KeyError's quoted repr.
    """

    def __init__(self, kind: str, ids: object):
        self.kind = kind
        self.ids = ids
        super().__init__(f"unknown {kind} id: {ids!r}")

    def __str__(self) -> str:
        return str(self.args[0])
