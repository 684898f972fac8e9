"""The one owner of export.json: the ONNX files `export` wrote (sha256, bytes, checks) and its other results.

Written by export; build, verify and package read it through `ExportReport.load` and check the ONNX files they
use with `ExportReport.checked`.
"""

from __future__ import annotations

from pipeline.records import StageReport


class ExportReport(StageReport):
    STAGE = "export"
