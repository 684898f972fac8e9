"""GPU compute time of a TensorRT engine, measured the way trtexec measures "GPU Compute Time".

trtexec (TensorRT `samples/common/sampleInference.cpp`) records CUDA events on the compute stream around each
enqueue and reports the time between them; with `--useCudaGraph` it captures one enqueue into a CUDA graph
and launches the graph instead. Polygraphy's `TrtRunner.last_inference_time()` is not that: it is
`time.time()` around the whole Python `infer` (tensor walks, shape queries, output allocators, output views,
a stream sync), a host cost per call that pulls every dense/sparse ratio toward 1.

Here, after one `infer` has set the input shapes and tensor addresses on the runner's execution context:
`calls` back-to-back `execute_async_v3` on the runner's own stream (or launches of a CUDA graph holding one
such call, where capture works) between two CUDA events make one sample; the sample's time / `calls` is the
GPU time per inference. The host time of the same enqueues (perf_counter) is kept beside it, to report and
never to gate. No machine of this project has run this on a GPU: tests/test_trt_timing.py runs it against a
fake CUDA clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A sample should be well above the cost of recording two events and launching (trtexec's default
# --duration/--iterations make each figure hundreds of milliseconds; a sample here is at least this much).
TARGET_SAMPLE_MS = 1.0
MAX_CALLS = 256


class TorchCuda:
    """The CUDA operations the timing needs, through PyTorch, on an existing stream (Polygraphy's `Stream.ptr`)."""

    def __init__(self, stream_ptr: int):
        import torch

        self.torch = torch
        self.stream = torch.cuda.ExternalStream(int(stream_ptr))

    def event(self) -> Any:
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event) -> None:
        event.record(self.stream)

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, enqueue: Callable[[], None]) -> Callable[[], None]:
        """One `enqueue` captured into a CUDA graph (thread-local capture mode, as trtexec's
        cudaStreamBeginCapture(..., cudaStreamCaptureModeThreadLocal)); returns its launch on the same stream."""
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            enqueue()

        def launch() -> None:
            with torch.cuda.stream(self.stream):
                graph.replay()

        return launch

    @staticmethod
    def host_seconds() -> float:
        return time.perf_counter()


@dataclass
class Samples:
    gpu_ms: list[float] = field(default_factory=list)  # GPU time per inference, one value per sample
    host_ms: list[float] = field(default_factory=list)  # host (enqueue) time per inference, never gated


def time_calls(clock, enqueue: Callable[[], None], calls: int, samples: int) -> Samples:
    """`samples` samples of `calls` back-to-back enqueues between two events; times per call in ms."""
    out = Samples()
    for _ in range(samples):
        start, end = clock.event(), clock.event()
        clock.record(start)
        began = clock.host_seconds()
        for _ in range(calls):
            enqueue()
        host = clock.host_seconds() - began
        clock.record(end)
        out.gpu_ms.append(clock.elapsed_ms(start, end) / calls)
        out.host_ms.append(host * 1e3 / calls)
    return out


def calls_per_sample(clock, enqueue: Callable[[], None], target_ms: float = TARGET_SAMPLE_MS) -> int:
    """How many back-to-back calls make a sample of at least `target_ms` of GPU time (1..MAX_CALLS)."""
    probe = time_calls(clock, enqueue, 4, 1).gpu_ms[0]
    if probe <= 0:
        return MAX_CALLS
    return max(1, min(MAX_CALLS, math.ceil(target_ms / probe)))


@dataclass
class GpuTimer:
    """Times one prepared execution context. `execute` enqueues one inference on the stream (the context's
    execute_async_v3); `clock` is TorchCuda on the runner's stream (a fake in the CPU tests)."""

    clock: Any
    execute: Callable[[], None]
    use_graph: bool = True
    calls: int = 0
    launch: Callable[[], None] | None = None
    graph_note: str = ""

    def prepare(self) -> None:
        """Capture the CUDA graph (where the engine allows it) and choose the calls per sample; once per shape."""
        self.launch, self.graph_note = self.execute, "no CUDA graph (disabled)"
        if self.use_graph:
            try:
                self.clock.synchronize()
                self.launch = self.clock.capture(self.execute)
                self.graph_note = "CUDA graph of one execute_async_v3"
            except Exception as exc:  # engines with data-dependent shapes or loops cannot be captured
                self.launch = self.execute
                self.graph_note = f"no CUDA graph (capture failed: {type(exc).__name__}: {str(exc)[:80]})"
                self.clock.synchronize()
        self.calls = calls_per_sample(self.clock, self.launch)

    def samples(self, iterations: int, warmup: int) -> Samples:
        if self.launch is None:
            self.prepare()
        launch = self.launch or self.execute
        for _ in range(max(0, warmup)):
            launch()
        if warmup:
            self.clock.synchronize()
        return time_calls(self.clock, launch, self.calls, iterations)

    def __call__(self) -> None:
        """One untimed launch (a warm-up run)."""
        (self.launch or self.execute)()

    @property
    def method(self) -> str:
        launches = "graph launches" if self.graph_note.startswith("CUDA graph") else "execute_async_v3 calls"
        return (
            f"GPU compute time: CUDA events around {self.calls} back-to-back {launches} on the runner's stream, "
            f"per inference ({self.graph_note}; trtexec's method); host enqueue time reported apart, not gated"
        )
