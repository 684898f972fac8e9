"""`serve`: run tritonserver in the foreground on 127.0.0.1 with the CPU repository (triton_cpu/).

Prints the HTTP and gRPC URLs once the server is ready; Ctrl-C stops it and its
Python-backend processes. All logic is in pipeline.serve.server; see docs/triton.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipeline.args import add_triton_arguments
from pipeline.declaration import StageDeclaration
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.serve.server import serve_foreground

DECLARATION = StageDeclaration(
    help="run tritonserver (CPU repository) in the foreground on 127.0.0.1",
    reads=("triton_cpu",),
    writes=("serve_log",),  # no config.json: it serves what package wrote
    recipe=("name",),
)


@dataclass
class Options:
    triton_env: str | None = None
    http_port: int = 0
    grpc_port: int = 0
    ready_timeout: float = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_triton_arguments(parser, "the tritonserver wheel and numpy<2")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--grpc-port", type=int, default=0, help="gRPC port (default: a free one)")


def run(recipe: Recipe, paths: ArtifactPaths, options: Options) -> int:
    return serve_foreground(
        recipe,
        paths,
        Path(options.triton_env) if options.triton_env else None,
        http_port=options.http_port,
        grpc_port=options.grpc_port,
        ready_timeout_s=options.ready_timeout,
    )
