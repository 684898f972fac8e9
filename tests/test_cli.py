"""The installed command `sparse-pipeline` (a console script) is the same CLI as `python -m pipeline`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nm_fixtures import PIPELINE_ENV

from pipeline.stages import STAGES


def installed_command() -> str:
    found = shutil.which("sparse-pipeline", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("sparse-pipeline is not installed in this environment (pip install -e . installs it)")
    return found


def test_the_console_script_lists_every_stage_under_its_own_name():
    result = subprocess.run(
        [installed_command(), "--help"], env=PIPELINE_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sparse-pipeline")
    assert all(stage in result.stdout for stage in STAGES)


def test_the_console_script_refuses_bad_flags_in_one_line():
    result = subprocess.run(
        [installed_command(), "layers", "--no-such-flag"], env=PIPELINE_ENV, capture_output=True, text=True, timeout=300
    )
    lines = result.stderr.strip().splitlines()
    assert (
        result.returncode == 2
        and len(lines) == 1
        and "--no-such-flag" in lines[0]
        and lines[0].startswith("error: sparse-pipeline")
    ), result.stderr
