"""The tritonserver that the `nvidia-pytriton` wheel bundles, made runnable on a CPU machine.

The wheel ships `tritonserver` 2.51 with the Python backend only. Starting it by hand needs:

- a backend folder whose `python/` holds the backend library *and* the Python-backend stub
  built for the interpreter's version (the wheel keeps stubs for 3.8-3.13 elsewhere): made
  in a private runtime folder, with symlinks to the wheel's files and a copy of the stub;
- LD_LIBRARY_PATH with the wheel's bundled libraries and the interpreter's own libpython
  folder (otherwise the stub loads the system's libpython against another standard library);
- the Python environment's bin first on PATH: the stub takes its sys.prefix from there;
- numpy < 2 in that environment: the stub reads numpy arrays through numpy 1.x's layout and
  silently sends empty tensors under numpy 2;
- for perf_analyzer (tritonclient 2.51's wheel), libb64 and libcudart under their sonames,
  which the pytriton wheel ships under hashed names: symlinked into the runtime folder.

The environment holding all that is the *Triton environment*: `--triton-env DIR`, else
$PIPELINE_TRITON_ENV, else `.venv-triton` in the repository (what `make serve-env` builds: a
venv layered on the project's venv, with nvidia-pytriton, numpy<2 and tritonclient 2.51),
else the running interpreter's environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

ENV_VARIABLE = "PIPELINE_TRITON_ENV"
DEFAULT_ENV_NAME = ".venv-triton"
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SETUP_HINT = "run `make serve-env` (or pass --triton-env DIR / set PIPELINE_TRITON_ENV)"
# sonames perf_analyzer links against -> name prefix of the copy in nvidia_pytriton.libs
PERF_ANALYZER_LIBS = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}

_PROBE = """
import importlib.util, json, sys, sysconfig
def where(name):
    spec = importlib.util.find_spec(name)
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
try:
    import numpy
    numpy_version = numpy.__version__
except Exception:
    numpy_version = None
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "libdir": sysconfig.get_config_var("LIBDIR"),
                  "numpy": numpy_version, "pytriton": where("pytriton")}))
"""


@dataclass(frozen=True)
class TritonEnvironment:
    """Where the server binary, its libraries and the Python the backend runs on are."""

    prefix: Path  # the Python environment (its bin/ goes first on PATH)
    python_version: str  # "3.11"
    libpython_dir: Path
    server_root: Path  # .../site-packages/pytriton/tritonserver
    wheel_libs: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def tritonserver(self) -> Path:
        return self.server_root / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.server_root / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"

    @property
    def perf_analyzer(self) -> Path | None:
        own = self.prefix / "bin" / "perf_analyzer"
        if own.is_file():
            return own
        found = shutil.which("perf_analyzer")
        return Path(found) if found else None


def default_env_dir() -> Path:
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE])
    local = REPOSITORY_ROOT / DEFAULT_ENV_NAME
    return local if local.is_dir() else Path(sys.prefix)


def find_environment(env_dir: Path | None = None) -> TritonEnvironment:
    """Probe the Triton environment; a PipelineError (exit 2) names what is missing and how to get it."""
    prefix = (Path(env_dir) if env_dir else default_env_dir()).absolute()
    python = prefix / "bin" / "python"
    if not python.exists():
        raise PipelineError(f"Triton environment {prefix} has no bin/python; {SETUP_HINT}")
    try:
        probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        raise PipelineError(f"cannot run {python} ({type(exc).__name__}); {SETUP_HINT}") from None
    if not info["pytriton"]:
        raise PipelineError(
            f"the nvidia-pytriton wheel (which bundles tritonserver) is not installed in {prefix}; {SETUP_HINT}"
        )
    if not info["numpy"] or int(info["numpy"].split(".")[0]) >= 2:
        raise PipelineError(
            f"the Python backend of tritonserver 2.51 needs numpy<2, {prefix} has numpy {info['numpy']}; {SETUP_HINT}"
        )
    server_root = Path(info["pytriton"]) / "tritonserver"
    env = TritonEnvironment(
        prefix=prefix,
        python_version=info["version"],
        libpython_dir=Path(info["libdir"]),
        server_root=server_root,
        wheel_libs=server_root.parent.parent / "nvidia_pytriton.libs",
    )
    for required in (env.tritonserver, env.stub, env.wheel_libs):
        if not required.exists():
            raise PipelineError(
                f"{required} is missing from the nvidia-pytriton install (Python "
                f"{env.python_version}); reinstall it: {SETUP_HINT}"
            )
    return env


@dataclass(frozen=True)
class Runtime:
    """A prepared runtime folder: the backend folder and the environment variables to start processes with."""

    environment: TritonEnvironment
    root: Path

    @property
    def backend_dir(self) -> Path:
        return self.root / "backends"

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(self.environment.wheel_libs), str(self.environment.libpython_dir), str(self.lib_dir)]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        env["PATH"] = f"{self.environment.prefix / 'bin'}:{env.get('PATH', '')}"
        env.pop("PYTHONHOME", None)
        return env


def prepare_runtime(environment: TritonEnvironment, root: Path) -> Runtime:
    """Fill `root` with backends/python (library and utils linked, the stub copied) and lib/ (sonames)."""
    runtime = Runtime(environment, Path(root))
    python_dir = runtime.backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    wheel_backend = environment.server_root / "backends" / "python"
    for item in wheel_backend.iterdir():
        link = python_dir / item.name
        if not link.exists():
            link.symlink_to(item)
    stub = python_dir / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copy2(environment.stub, stub)  # the backend looks for the stub next to its library
    runtime.lib_dir.mkdir(exist_ok=True)
    for soname, prefix in PERF_ANALYZER_LIBS.items():
        matches = sorted(environment.wheel_libs.glob(prefix + "*"))
        if matches and not (runtime.lib_dir / soname).exists():
            (runtime.lib_dir / soname).symlink_to(matches[0])
    return runtime
