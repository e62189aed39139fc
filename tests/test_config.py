"""Configuration: TOML file, environment overrides, defaults, and refusing bad values.

A bad value must stop `secondreader` with exit code 2 and a message that names
the key, before anything starts; a good override must really change what runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config
from tests.conftest import REPO, DaemonProcess, free_port

EXIT_CONFIG = 2


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any SECONDREADER_* setting of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECONDREADER_")}
    env.pop("STATE_DIRECTORY", None)
    return {**env, **extra}


def _secondreader(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=cwd,
        env=env if env is not None else _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BAD_FILES = {
    "port out of range": ("[scp]\nport = 70000\n", "scp.port"),
    "AE title too long": ('[scp]\nae_title = "A_TITLE_FAR_TOO_LONG"\n', "scp.ae_title"),
    "negative stable time": ("[completion]\nstable_seconds = -1\n", "completion.stable_seconds"),
    "not a sync mode": (
        '[database]\nsqlite_synchronous = "OFF"\n',
        "database.sqlite_synchronous",
    ),
    "allowed peer AE": (
        '[[scp.allowed_peers]]\nae_title = "BAD\\\\AE"\n',
        "scp.allowed_peers.0.ae_title",
    ),
    "unknown key": ("[scp]\nprot = 104\n", "scp.prot"),
    "unknown section": ("[scanner]\nspeed = 1\n", "scanner"),
    "TLS without certificate": ("[scp.tls]\nenabled = true\n", "scp.tls"),
    "wrong type": ('[storage]\nfsync = "sometimes"\n', "storage.fsync"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_invalid_file_exits_2_naming_the_key(case: str, tmp_path: Path) -> None:
    text, key = BAD_FILES[case]
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    r = _secondreader("--config", str(bad), "status")
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert f"  {key}: " in r.stderr
    assert "invalid configuration" in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    if case.startswith("unknown"):
        assert "unknown key" in r.stderr
    if case == "unknown key":  # the closest key it may have meant
        assert "did you mean scp.port?" in r.stderr


def test_an_invalid_environment_variable_is_named_as_the_variable(tmp_path: Path) -> None:
    r = _secondreader("status", env=_clean_env(SECONDREADER_SCP__PORT="-1"))
    assert r.returncode == EXIT_CONFIG
    assert "scp.port: " in r.stderr and "environment variable SECONDREADER_SCP__PORT" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_and_debug_go_before_or_after_the_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nstate_dir = "{state}"\n')
    # No database yet: one line naming where it would be, and nothing created.
    before = _secondreader("--config", str(config), "status")
    after = _secondreader("status", "--config", str(config))
    for r in (before, after):
        assert r.returncode == EXIT_CONFIG
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert f"no database at {state / 'secondreader.db'}" in r.stderr
        assert "secondreader db upgrade" in r.stderr
    assert not state.exists()  # a read-only command creates nothing
    # Without a config file: it says where the defaults would keep the state.
    bare = _secondreader("review", "list", cwd=tmp_path)
    assert bare.returncode == EXIT_CONFIG and "no config file" in bare.stderr
    assert str(tmp_path / "state") in bare.stderr and not (tmp_path / "state").exists()
    debug = _secondreader("status", "--config", str(config), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows it


def test_serve_refuses_an_invalid_file_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[scp]\nport = 0\n[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    r = _secondreader("--config", str(bad), "serve", timeout=30)
    assert r.returncode == EXIT_CONFIG
    assert "scp.port" in r.stderr
    assert not (tmp_path / "state").exists()


def test_unreadable_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[scp\nport = \n")
    r = _secondreader("--config", str(broken), "status")
    assert r.returncode == EXIT_CONFIG and "not valid TOML" in r.stderr
    r = _secondreader("--config", str(tmp_path / "missing.toml"), "status")
    assert r.returncode == EXIT_CONFIG and "config file not found" in r.stderr
    # $SECONDREADER_CONFIG is read like --config.
    r = _secondreader("status", env=_clean_env(SECONDREADER_CONFIG=str(broken)))
    assert r.returncode == EXIT_CONFIG and "not valid TOML" in r.stderr


def test_invalid_environment_override_exits_2(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    r = _secondreader("--config", str(good), "status", env=_clean_env(SECONDREADER_SCP__PORT="x"))
    assert r.returncode == EXIT_CONFIG and "  scp.port: " in r.stderr
    # An override of a key that does not exist is refused like one in the file.
    r = _secondreader("--config", str(good), "status", env=_clean_env(SECONDREADER_SCP__PROT="104"))
    assert r.returncode == EXIT_CONFIG and "  scp.prot: " in r.stderr


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[scp]\nport = 1104\nae_title = "FROMFILE"\n[storage]\nfsync = true\n'
        "[completion]\nstable_seconds = 5\n"
    )
    environ = {
        "SECONDREADER_SCP__PORT": "2104",
        "SECONDREADER_STORAGE__FSYNC": "false",
        "SECONDREADER_COMPLETION__STABLE_SECONDS": "2.5",
        "SECONDREADER_LOGGING__JSON": "true",
        "SECONDREADER_SCP__ALLOWED_PEERS": '[{"ae_title": "PACS", "addresses": ["10.0.0.0/8"]}]',
        # Read as a plain string: not JSON.
        "SECONDREADER_DATABASE__URL": "postgresql+psycopg://sr@db/secondreader",
    }
    config = load_config(path, environ)
    assert config.scp.port == 2104
    assert config.scp.ae_title == "FROMFILE"  # not overridden: the file's value
    assert config.storage.fsync is False
    assert config.completion.stable_seconds == 2.5
    assert config.logging.json_format is True
    assert [(p.ae_title, p.addresses) for p in config.scp.allowed_peers] == [
        ("PACS", ["10.0.0.0/8"])
    ]
    assert config.database_url == "postgresql+psycopg://sr@db/secondreader"
    # The config file itself can come from the environment.
    assert load_config(None, {"SECONDREADER_CONFIG": str(path)}).scp.port == 1104


def test_errors_name_every_bad_key() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            None,
            {"SECONDREADER_SCP__PORT": "0", "SECONDREADER_SCP__MAX_ASSOCIATIONS": "0"},
        )
    assert "scp.port" in str(exc.value) and "scp.max_associations" in str(exc.value)


def test_defaults() -> None:
    config = load_config(None, {})
    assert config.scp.ae_title == "SECONDREADER"
    assert config.scp.port == 11112
    assert config.scp.allowed_peers == []
    assert config.scp.tls.enabled is False
    assert config.scp.max_pdu_size == 1024 * 1024
    assert config.storage.fsync is True
    assert config.database.sqlite_synchronous == "NORMAL"
    assert config.database_url == f"sqlite:///{config.storage.state_dir / 'secondreader.db'}"
    assert config.completion.stable_seconds == 10.0


def test_runs_with_no_file(tmp_path: Path) -> None:
    """No config file anywhere: state under $STATE_DIRECTORY (systemd) or ./state."""
    r = _secondreader("db", "upgrade", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "state" / "secondreader.db").is_file()
    r = _secondreader("status", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert not any(status["studies"].values()) and not any(status["jobs"].values())

    systemd_state = tmp_path / "var-lib-secondreader"
    env = _clean_env(STATE_DIRECTORY=str(systemd_state))
    assert _secondreader("db", "upgrade", cwd=tmp_path, env=env).returncode == 0
    assert (systemd_state / "secondreader.db").is_file()

    # serve, with the port (and no in-process worker) from the environment only.
    port = free_port()
    env = {
        **env,
        "SECONDREADER_SCP__PORT": str(port),
        "SECONDREADER_WORKER__IN_PROCESS": "false",
        "SECONDREADER_LOGGING__JSON": "true",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "secondreader ready" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        echo = _secondreader("echo", "--port", str(port), "--aet", "SECONDREADER", env=env)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    messages = [rec["message"] for rec in lines]
    assert f"secondreader ready (AE SECONDREADER, port {port})" in messages
    assert "secondreader stopped" in messages
    assert (systemd_state / "spool").is_dir()


def test_port_override_reaches_the_daemon(daemon_factory) -> None:
    port = free_port()
    d: DaemonProcess = daemon_factory(
        "[worker]\nin_process = false\n", env={"SECONDREADER_SCP__PORT": str(port)}
    )
    assert port != d.port  # the file says d.port
    d.start()
    assert f"listening on 127.0.0.1:{port}" in d.log()
    echo = d.cli("echo", "--port", str(port), "--aet", "SECONDREADER", check=False)
    assert echo.returncode == 0, echo.stderr
    assert d.stop() == 0
