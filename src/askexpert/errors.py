"""The errors askexpert raises on bad input: each message names the file or value at fault.

The CLI prints these as one line (no traceback). A ValueError or FloatingPointError
that escapes a stage (a number out of range, a diverging loss) is printed as one line
too, naming its type; any other exception is a bug and shows its traceback.
"""


class AskExpertError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class ConfigError(AskExpertError):
    """A config file or value is malformed or inconsistent."""


class DataError(AskExpertError):
    """A data set is missing, corrupt or does not match what was asked for."""


class CheckpointError(AskExpertError):
    """A checkpoint or its metadata is missing, corrupt or does not match its preset."""


class PartitionError(AskExpertError):
    """A partition file is malformed or does not match the system."""


class RoutingError(AskExpertError):
    """Router inputs are inconsistent (shapes, k, unknown gate, unknown expert)."""


class CheckpointVersionWarning(UserWarning):
    """A checkpoint was written under other torch/timm releases than the ones loading it."""
