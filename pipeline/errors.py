"""The one exception type for mistakes a user can fix.

The CLI prints a PipelineError as a single line and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad input or environment: message says what was wrong and how to fix it.

    Raised in a DataLoader worker (a damaged image found while loading), torch re-raises it in the main process
    with the worker's traceback as its message; the message is cut back to the one line it was raised with."""

    def __init__(self, message: str = "", *args) -> None:
        text = str(message)
        if text.startswith("Caught PipelineError in DataLoader worker"):
            raised = [
                line
                for line in text.splitlines()
                if line.startswith(("PipelineError: ", "pipeline.errors.PipelineError: "))
            ]
            text = raised[-1].split("PipelineError: ", 1)[1] if raised else text.splitlines()[0]
        super().__init__(text, *args)


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
