"""Polygraphy's log (TensorRT's lines among it) captured for a build or a runner's start."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def captured_log():
    """Polygraphy's log (TensorRT's lines among it) into a list instead of stdout: INFO and above, and "(Sparsity)"
    lines at any severity (their severity differs between versions)."""
    from polygraphy.logger import G_LOGGER

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if record.levelno >= logging.DEBUG or "(Sparsity)" in text:
                lines.append(text)

    saved = G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors
    G_LOGGER.use_python_logging_system, G_LOGGER.module_severity = True, G_LOGGER.EXTRA_VERBOSE
    G_LOGGER.colors = False  # no escape codes in the log file
    logger, handler = logging.getLogger("Polygraphy"), Keep(level=1)
    saved_logger = logger.level, logger.propagate
    logger.setLevel(1)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved_logger
        G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors = saved


def errors_in(lines: list[str], limit: int = 3) -> str:
    """The last error lines of a captured log ("" when there is none)."""
    bad = [line for line in lines if line.lstrip().startswith(("[E]", "[!]"))]
    return " | ".join(bad[-limit:])
