"""Errors a user can act on.

Anything raised as :class:`UserError` (or a subclass) is caught at the command-line edge
(``pipeline/_stage.py``, ``aigc/cli.py``) and printed as one line with a non-zero exit, no
traceback: it means "your input is wrong, here is what to change", not "aigc has a bug".
"""


class UserError(Exception):
    """Bad input from the user: config, data files, paths, an unreachable service."""


class ConfigError(UserError):
    """params.yaml holds an unknown key, a wrong type or an out-of-range value."""


class DataError(UserError):
    """A data source is unreadable, empty, or inconsistent (shapes, dtypes)."""
