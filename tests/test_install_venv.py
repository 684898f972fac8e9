"""tools/install-venv.py: pip's index settings reach uv, and a failing uv falls back to pip."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location("install_venv", ROOT / "tools" / "install-venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_python(tmp_path: Path, config_lines: str, pip_install_rc: int = 0) -> Path:
    """A `python` that answers `-m pip config list` with `config_lines` and `-m pip install` with an exit code,
    logging its arguments."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{tmp_path}/calls"\n'
        'if [ "$3" = config ]; then cat <<"EOF"\n' + config_lines + "EOF\nexit 0\nfi\n"
        f"exit {pip_install_rc}\n"
    )
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


CONFIG = """global.cert='/etc/ssl/certs/ca.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/wheels'
global.index-url='https://mirror.example/simple'
:env:.find-links='/opt/wheels /opt/more-wheels'
:env:.index-url='https://env.example/simple'
:env:.default-timeout='180'
"""


def test_pip_settings_reach_uv(installer, tmp_path):
    python = fake_python(tmp_path, CONFIG)
    settings = installer.pip_settings(python)
    assert settings["extra-index-url"] == ["file:///opt/a/simple", "file:///opt/b/simple"]
    assert settings["find-links"] == ["/opt/wheels", "/opt/more-wheels"]  # merged, no repeats
    assert settings["index-url"] == ["https://env.example/simple"]  # the environment variable wins
    assert settings["cert"] == ["/etc/ssl/certs/ca.crt"] and "default-timeout" not in settings
    command = installer.uv_command(Path("/v/bin/uv"), python, settings)
    joined = " ".join(command)
    assert command[:3] == ["/v/bin/uv", "pip", "install"] and f"--python {python}" in joined
    assert "--index-strategy unsafe-best-match" in joined
    for flag in (
        "--extra-index-url file:///opt/a/simple",
        "--extra-index-url file:///opt/b/simple",
        "--find-links /opt/more-wheels",
        "--constraint /etc/pip/constraints.txt",
        "--index-url https://env.example/simple",
    ):
        assert flag in joined
    assert "mirror.example" not in joined


def test_no_pip_configuration_passes_no_index_flags(installer, tmp_path):
    python = fake_python(tmp_path, "")
    assert installer.pip_settings(python) == {}
    assert installer.uv_command(Path("uv"), python, {})[-2:] == ["--index-strategy", "unsafe-best-match"]


def test_uv_that_cannot_be_installed_falls_back_to_pip(installer, tmp_path, capsys):
    python = fake_python(tmp_path, CONFIG, pip_install_rc=1)
    assert installer.install_with_uv(python, ["-e", "."]) is False
    assert "could not install uv; installing with pip" in capsys.readouterr().out
    assert "-m pip install --quiet uv" in (tmp_path / "calls").read_text()


def test_failed_install_is_one_error_line_and_exit_2(installer, tmp_path, capsys):
    fake_python(tmp_path, "", pip_install_rc=1)
    assert installer.main([str(tmp_path / "venv"), "--pip-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not install the project into")
    calls = (tmp_path / "calls").read_text()
    assert "-m pip install torch==2.14.1 torchvision==0.29.1" in calls and "uv" not in calls
