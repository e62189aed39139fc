"""The files an administrator installs: the systemd unit and the example config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon.config import load_config
from tests.conftest import REPO, require_tool

UNIT = REPO / "deploy" / "secondreader.service"
EXAMPLE = REPO / "deploy" / "secondreader.example.toml"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    venv_bin = Path(sys.executable).parent
    # Point the unit at this checkout's virtualenv, as an installation would.
    unit = tmp_path / "secondreader.service"
    unit.write_text(UNIT.read_text().replace("/opt/secondreader/.venv/bin", str(venv_bin)))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_unit_is_a_sandboxed_notify_service_with_watchdog() -> None:
    directives = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), value.strip())
    assert directives["Type"] == "notify"
    assert int(directives["WatchdogSec"]) > 0
    assert directives["User"] == "secondreader"
    assert directives["StateDirectory"] == "secondreader"
    assert directives["ProtectSystem"] == "strict"
    assert directives["NoNewPrivileges"] == "yes"
    assert directives["ExecStart"].endswith("secondreader serve")


def test_example_config_is_valid_and_equals_the_defaults() -> None:
    example = load_config(EXAMPLE, environ={})
    defaults = load_config(None, environ={})
    # The example documents the defaults: loading it changes nothing.
    assert example.model_dump() == defaults.model_dump()


def test_readme_manifest_example_is_a_valid_manifest() -> None:
    import tomllib

    from model.manifest import ModelManifest

    text = (REPO / "README.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    # The README elides the two values a user fills in.
    block = block.replace('sha256 = "..."', f'sha256 = "{"0" * 64}"')
    manifest = ModelManifest.model_validate(tomllib.loads(block))
    assert manifest.applies_to.modalities == ["CT"]
    assert manifest.labels[0].finding.value == "27925004"
    assert manifest.weights.format == "torchscript"
