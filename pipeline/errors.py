"""The one exception type for mistakes a user can fix.

The CLI prints a PipelineError as a single line and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad input or environment: message says what was wrong and how to fix it."""


class GateFailed(Exception):
    """A verification gate failed (exit code 1)."""


class Interrupted(BaseException):
    """A signal ended the run (SIGTERM, SIGINT): the CLI prints one line and exits 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT). A BaseException, like KeyboardInterrupt, so no `except Exception` eats it.
    Stages with a checkpoint save it first and say how to continue in `note`."""

    def __init__(self, signum: int, note: str = "") -> None:
        super().__init__(signum, note)
        self.signum, self.note = int(signum), note

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
