"""The one owner of bake.json: masks.pt and sparse.pt as `bake` wrote them (sha256, bytes) and its checks.

Written by bake; export and package read it through `BakeReport.load` and check masks.pt / sparse.pt with
`BakeReport.checked`.
"""

from __future__ import annotations

from pipeline.records import StageReport


class BakeReport(StageReport):
    STAGE = "bake"
