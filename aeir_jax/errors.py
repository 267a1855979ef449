"""User-facing errors.

Anything a user can fix (a config field, a data file, a workdir) raises a subclass of
`UserError` with a one-line message saying what is wrong, where, and how to fix it. The CLI
(`launch.py`, `python -m aeir_jax...`) prints the message and exits with code 2; no traceback.
"""


class UserError(Exception):
  """An error caused by the user's input, reported as one line and exit code 2."""


class ConfigError(UserError):
  """A config field is missing, misspelt or has an invalid value."""


class DataError(UserError):
  """A data file is missing, unreadable or malformed."""


class WorkdirError(UserError):
  """The workdir cannot be used (unwritable, or holds an incompatible run)."""
