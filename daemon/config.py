"""Configuration: one TOML file, validated at start-up, overridable per key.

Every key has a default, so the daemon runs with no file at all. An
environment variable `SECONDREADER_<SECTION>__<KEY>` overrides one key, e.g.
`SECONDREADER_SCP__PORT=11113`; its value is read as JSON when it parses
(numbers, booleans, lists) and as a plain string otherwise.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "SECONDREADER_"
CONFIG_ENV = "SECONDREADER_CONFIG"


class ConfigError(Exception):
    """An invalid configuration; the message names the key and the problem."""


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


def _ae_title(v: str) -> str:
    if not 0 < len(v) <= 16 or "\\" in v or not v.isprintable() or v.strip() != v:
        raise ValueError("an AE title is 1 to 16 printable characters, no backslash")
    return v


class AllowedPeer(_Section):
    ae_title: str
    # Source addresses this AE may call from; empty means any address.
    addresses: list[str] = Field(default_factory=list)

    _check_ae = field_validator("ae_title")(_ae_title)


class TLSConfig(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    # CA bundle to verify client certificates; setting it makes them required.
    ca_file: Path | None = None


class SCPConfig(_Section):
    ae_title: str = "SECONDREADER"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    # 0 = unlimited; measured here to roughly double throughput over 16 KiB.
    max_pdu_size: int = Field(0, ge=0)
    # Empty list: any calling AE is accepted. Otherwise default deny.
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    # Seconds to let running associations finish after SIGTERM.
    drain_seconds: float = Field(30.0, ge=0)

    _check_ae = field_validator("ae_title")(_ae_title)


class StorageConfig(_Section):
    # Holds the spool and the SQLite file. systemd's StateDirectory wins when set.
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "state")).absolute()
    )
    # fsync each received file before acknowledging it. Off only for benchmarks.
    fsync: bool = True

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"


class DatabaseConfig(_Section):
    # SQLAlchemy URL; empty = SQLite file in the state directory.
    url: str = ""
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"


class CompletionConfig(_Section):
    stable_seconds: float = Field(10.0, gt=0)
    # A study still receiving after this long is completed anyway.
    max_seconds: float = Field(1800.0, gt=0)
    check_interval_seconds: float = Field(2.0, gt=0)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Config(_Section):
    scp: SCPConfig = Field(default_factory=SCPConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.storage.state_dir / 'secondreader.db'}"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and validate; raises ConfigError with a readable message."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    data = _merge(data, _env_overrides(environ))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{key}: {err['msg']}")
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(problems)) from exc
