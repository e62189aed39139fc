"""Test configurations: a config file with the test's own state folder and database."""

from __future__ import annotations

from pathlib import Path

from daemon.config import Config, load_config


def write_config(
    tmp_path: Path, db_url: str, body: str = "", *, state: Path | None = None
) -> Config:
    """`tmp_path`/secondreader.toml: the state folder (no fsync: tests), the database,
    then `body`; read without the environment."""
    path = tmp_path / "secondreader.toml"
    path.write_text(
        f"""
[storage]
state_dir = "{state or tmp_path / "state"}"
fsync = false

[database]
url = "{db_url}"
"""
        + body
    )
    return load_config(path, environ={})
