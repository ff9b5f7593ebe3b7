"""Errors that end a command with one clear line (the CLI prints ``str(error)`` and exits non-zero)."""


class DpokitError(Exception):
    """An expected failure caused by the user's input; shown as one line, never as a traceback."""


class ConfigError(DpokitError, ValueError):
    """A bad config key or value. The message names the key."""


class DataError(DpokitError):
    """Bad or unusable data. The message names file:line."""


class ModelError(DpokitError):
    """A model that cannot be found or loaded."""


class WriteError(DpokitError):
    """A file dpokit writes could not be written (disk full, file-size limit, permissions). The message names
    the path and the cause; nothing partial is left looking complete (``dpokit.io.writing``)."""


class Preempted(DpokitError):
    """Training stopped on SIGTERM or SIGINT after the step in flight, with a complete checkpoint saved
    (``dpokit.training.preempt``). The process exits with ``exit_code``, 128 + the signal's number (the code a shell
    gives a process its signal ended): 143 for SIGTERM, 130 for SIGINT."""

    def __init__(self, message: str, signum: int, checkpoint: str):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
