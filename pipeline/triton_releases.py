"""Which TensorRT each Triton Inference Server container release ships, for the `-py3` image.

A TensorRT plan loads only in the TensorRT that built it, down to the build number (the fourth part:
NVIDIA/TensorRT#3793; a plan from the PyPI 8.6.1 wheel, 8.6.1.6, is refused by Triton 23.04/23.05,
which ship 8.6.1.2: NVIDIA/TensorRT#3071, triton-inference-server/server#5975). Other image flavours
of the same release (`-trtllm-python-py3`, `-vllm-python-py3`) ship other TensorRT builds and are not
in this table. `serve.triton_release` (validated by the recipe) and the package stage
(pipeline/package/plans.py) read this one table; it lives outside both so that neither imports the other.

Each row says where its version comes from. Rows with `source=None` carry the major.minor.patch
that NVIDIA's Frameworks Support Matrix lists for the release as this project recorded it earlier,
without a build number and without a source this project can point to: packaging a plan for such a
release is refused until someone adds the four-part version read in that container
(`dpkg -l | grep libnvinfer` inside nvcr.io/nvidia/tritonserver:<release>-py3) and its source.
Releases after 25.07 are listed with no TensorRT version at all: none could be sourced here.

Four-part versions of the `-py3` image from TensorRT 10 on come from the "Contents of the Triton Inference
Server container" section of triton-inference-server/server `docs/introduction/release_notes.md`, which at
the commits in `_RELEASE_NOTES` named the container of one release each (24.08, 24.10, 24.12, 25.01); from
25.02 on that file only points to the GitHub release page. `docs/introduction/compatibility.md` of the same
repository is NOT a source for this table: its TensorRT column is for the `-trtllm-python-py3` image (and it
changed its own 24.07 row from 10.2.0.19 to 10.1.0 between commits), so its versions are not used here.
"""

from __future__ import annotations

from dataclasses import dataclass

FLAVOUR = "py3"  # nvcr.io/nvidia/tritonserver:<release>-py3


@dataclass(frozen=True)
class TritonRelease:
    tensorrt: str | None  # "8.6.1.2" (four parts), "10.0.1" (three: build number not sourced), None: unknown
    source: str | None = None  # where the version was read; None: no source is claimed

    @property
    def four_part(self) -> bool:
        return self.tensorrt is not None and len(self.tensorrt.split(".")) == 4


_ISSUES_8612 = "NVIDIA/TensorRT#3071, triton-inference-server/server#5975"
_UNSOURCED = {
    "23.01": "8.5.2",
    "23.02": "8.5.3",
    "23.03": "8.5.3",
    "23.06": "8.6.1",
    "23.07": "8.6.1",
    "23.08": "8.6.1",
    "23.09": "8.6.1",
    "23.10": "8.6.1",
    "23.11": "8.6.1",
    "23.12": "8.6.1",
    "24.01": "8.6.1",
    "24.02": "8.6.3",
    "24.03": "8.6.3",
    "24.04": "8.6.3",
    "24.05": "10.0.1",
    "24.06": "10.1.0",
    "24.07": "10.2.0",
    "24.09": "10.4.0",
    "24.11": "10.6.0",
    "25.02": "10.8.0",
    "25.03": "10.9.0",
    "25.04": "10.9.0",
    "25.05": "10.10.0",
    "25.06": "10.11.0",
    "25.07": "10.11.0",
}
_NOTES = "triton-inference-server/server docs/introduction/release_notes.md @ {} (release {}: TensorRT {})"
_RELEASE_NOTES = {  # release -> (four-part TensorRT of its -py3 container, commit of the release notes naming it)
    "24.08": ("10.3.0.26", "7669321582e8bd5dcaf68b76e65389615e0a662f"),
    "24.10": ("10.5.0.18", "9fac69d6b7be565411a280ed3dff96335765d96e"),
    "24.12": ("10.7.0.23", "ff695aeb49819e223c88272da45f251b60f38442"),
    "25.01": ("10.8.0.43", "d3ee577e403a445fb69db3e8e5a641f9a6765650"),
}
_UNKNOWN = ["25.08", "25.09", "25.10", "25.11", "25.12", "26.01", "26.02", "26.03", "26.04", "26.05"]

RELEASES: dict[str, TritonRelease] = dict(
    sorted(
        [(release, TritonRelease(version)) for release, version in _UNSOURCED.items()]
        + [
            (release, TritonRelease(version, _NOTES.format(commit[:12], release, version)))
            for release, (version, commit) in _RELEASE_NOTES.items()
        ]
        + [(release, TritonRelease("8.6.1.2", _ISSUES_8612)) for release in ("23.04", "23.05")]
        + [(release, TritonRelease(None)) for release in _UNKNOWN]
    )
)

# release -> TensorRT version as recorded (the recipe validates serve.triton_release against its keys)
TRITON_TENSORRT = {release: row.tensorrt or "unknown" for release, row in RELEASES.items()}
