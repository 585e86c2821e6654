"""The one exception type the CLI turns into a clean message (no traceback): errors a user can cause."""


class UserError(Exception):
    """Bad input or state the user can fix: the message names the value and what would be valid."""


class ConfigError(UserError, ValueError):
    """A flag value that is not valid."""
