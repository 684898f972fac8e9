#!/usr/bin/env python3
"""Creates or updates the project's venv: torch, torchvision, then the package with the given extras.

    python3 tools/install-venv.py .venv [--extras test] [--pip-only]

Installs with uv (https://docs.astral.sh/uv/, installed from PyPI into the venv first), which unpacks the
wheels in parallel: on this project's 2-core machines the 5.5 GB CUDA build of torch and the package's
dependencies install in about 16 s, against about 90 s with pip (docs/notebook/time-to-accuracy.md "Set-up").
uv does not read pip's configuration, so the package indexes pip is configured with (`pip config list`:
index-url, extra-index-url, find-links, constraint, cert, from files or PIP_* variables) are passed to it.
When uv cannot be installed or fails, it says so and installs with pip as before. `--pip-only` skips uv.

torch==2.14.1 and torchvision==0.29.1 are tried first (the versions the project is tested with); where
they cannot be installed, the newest the indexes offer.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
UNPINNED_TORCH = ["torch", "torchvision"]
# pip options uv takes under the same name; multi-valued ones may list several, separated by white space
PIP_OPTIONS = {"index-url": False, "extra-index-url": True, "find-links": True, "constraint": True}


def run(command: list[str], env: dict[str, str] | None = None) -> int:
    print("+ " + shlex.join(command), flush=True)
    return subprocess.call(command, env=env)


def pip_settings(python: Path) -> dict[str, list[str]]:
    """pip's configured indexes, links, constraints and certificate (`pip config list`), by option name."""
    listed = subprocess.run([str(python), "-m", "pip", "config", "list"], capture_output=True, text=True)
    settings: dict[str, list[str]] = {}
    for line in listed.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep or "." not in key:
            continue
        name = key.rsplit(".", 1)[1]
        value = value.strip().strip("'\"")
        if name == "cert" or (name in PIP_OPTIONS and not PIP_OPTIONS[name]):
            settings[name] = [value]  # single-valued: later scopes (environment variables last) win
        elif name in PIP_OPTIONS:
            settings.setdefault(name, [])
            settings[name] += [item for item in value.split() if item not in settings[name]]
    return settings


def uv_command(uv: Path, python: Path, settings: dict[str, list[str]]) -> list[str]:
    # unsafe-best-match: like pip, take the best version any index offers (uv stops at the first index)
    command = [str(uv), "pip", "install", "--python", str(python), "--index-strategy", "unsafe-best-match"]
    for name in PIP_OPTIONS:
        for value in settings.get(name, []):
            command += [f"--{name}", value]
    return command


def install_with_uv(python: Path, packages: list[str]) -> bool:
    bin_dir = python.parent
    uv = bin_dir / "uv"
    if not uv.exists() and run([str(python), "-m", "pip", "install", "--quiet", "uv"]) != 0:
        print("note: could not install uv; installing with pip", flush=True)
        return False
    settings = pip_settings(python)
    env = dict(os.environ)
    if settings.get("cert"):
        env.setdefault("SSL_CERT_FILE", settings["cert"][0])
    base = uv_command(uv, python, settings)
    if run(base + TORCH + packages, env) == 0 or run(base + UNPINNED_TORCH + packages, env) == 0:
        return True
    print("note: uv failed; installing with pip", flush=True)
    return False


def install_with_pip(python: Path, packages: list[str]) -> bool:
    pip = [str(python), "-m", "pip", "install"]
    torch_ok = run(pip + TORCH) == 0 or run(pip + UNPINNED_TORCH) == 0
    return torch_ok and run(pip + packages) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--extras", default="test", help="extras of the package to install (comma-separated)")
    parser.add_argument("--pip-only", action="store_true", help="install with pip, not uv")
    args = parser.parse_args(argv)
    python = args.venv / "bin" / "python"
    if not python.exists():
        venv.create(args.venv, with_pip=True)
    root = Path(__file__).resolve().parent.parent
    packages = ["-e", f"{root}[{args.extras}]" if args.extras else str(root)]
    if not args.pip_only and install_with_uv(python, packages):
        return 0
    if install_with_pip(python, packages):
        return 0
    print(
        f"error: could not install the project into {args.venv}; see pip's messages above, fix the package "
        "index settings (pip config list) and run the command again",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
