"""Serving step: run tritonserver on the repositories the package step wrote (server, runtime), check it
(serve_check) and load-test it (perf). Packaging (the repositories themselves) lives in pipeline.package."""
