"""`serve`: run tritonserver in the foreground on 127.0.0.1 with the CPU repository (triton_cpu/).

Prints the HTTP and gRPC URLs once the server is ready; Ctrl-C stops it and its
Python-backend processes. All logic is in pipeline.package.server; see docs/triton.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import add_model_arguments
from pipeline.package.server import serve_foreground
from pipeline.stages._common import prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--triton-env", default=None, metavar="DIR",
                        help="Python environment with the tritonserver wheel and numpy<2 "
                             "(default: $PIPELINE_TRITON_ENV, else .venv-triton, else this interpreter's)")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--grpc-port", type=int, default=0, help="gRPC port (default: a free one)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for readiness")


def run(args: argparse.Namespace) -> int:
    recipe, paths = prepare(args)
    return serve_foreground(recipe, paths, Path(args.triton_env) if args.triton_env else None,
                            http_port=args.http_port, grpc_port=args.grpc_port, ready_timeout_s=args.ready_timeout)
