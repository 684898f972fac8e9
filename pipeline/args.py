"""Flags that several stages share, as argument groups (in the spirit of Polygraphy's tools/args): each flag is
defined once, with one help text and one set of valid values, and every stage that takes it adds its group."""

from __future__ import annotations

import argparse

from pipeline.recipe.config import BACKENDS


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: cuda when present)")


def add_backend_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "engine backend"
) -> None:
    parser.add_argument(
        "--backend", choices=list(BACKENDS), default=None, help=f"{what} (default: recipe build.backend)"
    )


def add_junit_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    parser.add_argument("--junit", default=None, metavar="FILE", help=what)


def add_learned_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str) -> None:
    parser.add_argument("--learned", choices=["auto", "reuse", "train"], default="auto", help=help_text)


def add_triton_arguments(parser: argparse.ArgumentParser, needs: str) -> None:
    """The server stages' flags: where tritonserver lives and how long to wait for it."""
    group = parser.add_argument_group("Triton server")
    group.add_argument(
        "--triton-env",
        default=None,
        metavar="DIR",
        help=f"Python environment with {needs} "
        "(default: $PIPELINE_TRITON_ENV, else .venv-triton, else this interpreter's)",
    )
    group.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for readiness")
