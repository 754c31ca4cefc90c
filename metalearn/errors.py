"""Error types whose message is shown to the user as one line (exit code 2)."""

import argparse


class MetalearnError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits with code 2."""

    exit_code = 2


class ConfigError(MetalearnError):
    """A config key has a bad value. The message names the key and what is valid."""


class DataError(MetalearnError):
    """Data files are missing, corrupt, or cannot hold the requested episodes."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for `metalearn report` and `reproduce`: a bad argument is one line on stderr
    (``metalearn <command>: error: ...``, exit 2) instead of the usage block and the error."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
