"""Start, wait for and stop a tritonserver process, leaving nothing behind.

The server runs in its own process group (it and its Python-backend stubs), so stopping
it signals the whole group: SIGTERM, then SIGKILL after a grace period. Readiness is the
server's own /v2/health/ready endpoint, polled until a deadline; a server that exits
while starting is reported with the end of its log. Ports are free ones unless given.
Python-backend shared-memory regions get a per-server prefix and are removed on stop,
also after a kill -9.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.paths import ArtifactPaths
from pipeline.recipe.config import Recipe
from pipeline.serve.triton_runtime import Runtime

SHM_DIR = Path("/dev/shm")
POLL_SECONDS = 0.1


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls, http: int = 0, grpc: int = 0, metrics: int = 0) -> Ports:
        return cls(http or free_port(), grpc or free_port(), metrics or free_port())


class TritonServer:
    """One tritonserver on 127.0.0.1; use as a context manager so it is always stopped."""

    def __init__(
        self,
        runtime: Runtime,
        repository: Path,
        log_path: Path,
        ports: Ports | None = None,
        host: str = "127.0.0.1",
        verbose: bool = False,
    ) -> None:
        self.runtime = runtime
        self.repository = Path(repository)
        self.log_path = Path(log_path)
        self.ports = ports or Ports.pick()
        self.host = host
        self.verbose = verbose
        self.shm_prefix = f"sparse_pipeline_{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def command(self) -> list[str]:
        return [
            str(self.runtime.environment.tritonserver),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={self.runtime.backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-timeout-secs=10",
            "--strict-readiness=true",
        ] + (["--log-verbose=1"] if self.verbose else [])

    def start(self) -> None:
        if not self.repository.is_dir():
            raise PipelineError(f"model repository {self.repository} does not exist; run `python -m pipeline package`")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.runtime.process_env(),
                start_new_session=True,
            )

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ready; PipelineError if the server exits or the deadline passes first."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise PipelineError(
                    f"tritonserver exited with code {code} while starting; its log "
                    f"{self.log_path} ends with: {self.log_tail()}"
                )
            if self.is_ready():
                return time.monotonic() - started
            time.sleep(POLL_SECONDS)
        raise PipelineError(
            f"tritonserver was not ready after {timeout_s:.0f} s; see {self.log_path}: {self.log_tail()}"
        )

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip()[:300] for line in text[-lines:]) or "(empty log)"

    def kill_hard(self) -> None:
        """kill -9 of the server process alone, as a crash would (its stubs notice and exit by themselves)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def group_alive(self) -> bool:
        if self.process is None:
            return False
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; removes the server's shared memory."""
        if self.process is None:
            return
        pgid = self.process.pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while self.group_alive() and time.monotonic() < deadline:
                self.process.poll()  # reap the leader so the group can empty
                time.sleep(POLL_SECONDS)
            if not self.group_alive():
                break
        self.process.poll()
        self.remove_shared_memory()

    def remove_shared_memory(self) -> None:
        for region in SHM_DIR.glob(self.shm_prefix + "*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve_foreground(
    recipe: Recipe,
    paths: ArtifactPaths,
    env_dir: Path | None,
    http_port: int = 0,
    grpc_port: int = 0,
    ready_timeout_s: float = 120.0,
) -> int:
    """`make serve`: the CPU repository until Ctrl-C (or until the server exits); returns its exit status."""
    from pipeline.package.ensembles import ensemble_name
    from pipeline.package.repository import repository_dir
    from pipeline.serve.triton_runtime import find_environment, prepare_runtime

    repository = repository_dir(paths, "cpu")
    if not repository.is_dir():
        raise PipelineError(f"{repository} does not exist; run `python -m pipeline package --model {recipe.name}`")
    environment = find_environment(env_dir)
    with tempfile.TemporaryDirectory(prefix="serve-") as work:
        runtime = prepare_runtime(environment, Path(work) / "runtime")
        log_path = paths.serve_log
        server = TritonServer(runtime, repository, log_path, Ports.pick(http=http_port, grpc=grpc_port))
        try:
            server.start()
            ready_s = server.wait_ready(ready_timeout_s)
            print(f"tritonserver ready in {ready_s:.1f} s on 127.0.0.1 (log: {log_path})")
            print(f"  HTTP  http://{server.http_url}/v2/models/{ensemble_name(recipe.name, 'sparse')}")
            print(f"  gRPC  {server.grpc_url}")
            print(f"  models: {', '.join(sorted(p.name for p in repository.iterdir() if p.is_dir()))}")
            print("Ctrl-C stops it.", flush=True)
            if server.process is None:
                raise RuntimeError("TritonServer.start returned without a process")
            return server.process.wait()
        except KeyboardInterrupt:
            print("stopping tritonserver")
            return 0
        finally:
            server.stop()
