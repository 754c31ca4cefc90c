"""Error types whose message is shown to the user as one line (exit code 2)."""


class MetalearnError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits with code 2."""

    exit_code = 2


class ConfigError(MetalearnError):
    """A config key has a bad value. The message names the key and what is valid."""


class DataError(MetalearnError):
    """Data files are missing, corrupt, or cannot hold the requested episodes."""
