"""The factories every stage may use: database, settings, SCP settings, destinations.

This module imports no stage (daemon/stages/), so any stage, `serve`
(daemon/service.py), the CLI and the web page build these things the same
way without importing each other: that is what keeps the packages free of
import cycles (the `[tool.importlinter]` contracts in pyproject.toml).
"""

from __future__ import annotations

import socket
from pathlib import Path

from daemon.config import Config, Destination, load_config
from daemon.errors import NotMigrated
from db import migrate
from db.chain import load_key
from db.installation import check_key
from db.session import Database, sqlite_file
from dicom_io.guard import LoadBoard
from dicom_io.scp import PeerRule, SCPSettings
from dicom_io.scu import RemoteAE
from dicom_io.tls import client_context, server_context

__all__ = ["destination_remote", "load_config", "open_database", "scp_settings"]


def open_database(config: Config, *, signed: bool = True) -> Database:
    """The database, with the audit key that signs every audit row written through it.

    `signed=False` for commands that only read (status, listings, export):
    they work without the key. Nothing is created here: no database, or no
    schema, raises NotMigrated (`db upgrade` creates both); a key other than
    the one the database records raises AuditKeyMismatch.
    """
    url = config.database_url
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise NotMigrated(_no_database(config, path))
    current = migrate.current(url)
    if current is None:
        raise NotMigrated("the database has no schema: run `secondreader db upgrade` first")
    if current != migrate.head():
        raise NotMigrated(
            f"the database's schema is at revision {current}, this version of secondreader "
            f"needs {migrate.head()}: run `secondreader db upgrade` (after each update)"
        )
    key = load_key(config.audit_key_path) if signed else None
    db = Database(url, sqlite_synchronous=config.database.sqlite_synchronous, audit_key=key)
    if key is not None:
        try:
            with db.session() as s:
                check_key(s, key, str(config.audit_key_path))
        except Exception:
            db.dispose()
            raise
    return db


def _no_database(config: Config, path: Path) -> str:
    where = (
        f"the config file {config.source}" if config.source is not None
        else "no config file (--config FILE or SECONDREADER_CONFIG): the defaults keep "
             f"the state in {config.storage.state_dir.absolute()}"
    )  # fmt: skip
    return f"no database at {path} ({where}): run `secondreader db upgrade` first"


def scp_settings(
    config: Config,
    *,
    load_board: LoadBoard | None = None,
    listening_socket: socket.socket | None = None,
) -> SCPSettings:
    """The SCP's settings; a receiving process's board and socket (daemon/stages/receive/)."""
    c = config.scp
    ssl_context = None
    if c.tls.enabled:
        if c.tls.cert_file is None or c.tls.key_file is None:
            raise ValueError("scp.tls.enabled needs scp.tls.cert_file and scp.tls.key_file")
        ssl_context = server_context(c.tls.cert_file, c.tls.key_file, c.tls.ca_file)
    return SCPSettings(
        ae_title=c.ae_title,
        host=c.host,
        port=c.port,
        max_associations=c.max_associations,
        max_pdu_size=c.max_pdu_size,
        allowed_peers=[PeerRule(p.ae_title, tuple(p.addresses)) for p in c.allowed_peers],
        ssl_context=ssl_context,
        check_called_ae_title=c.check_called_ae_title,
        refused_sop_classes=[
            *c.refused_sop_classes,
            *(["non-image"] if c.non_image_objects == "refuse" else []),
        ],
        request_timeout=c.request_timeout_seconds,
        pdu_timeout=c.pdu_timeout_seconds,
        max_pending_per_address=c.max_pending_per_address,
        connection_rate_per_address=c.connection_rate_per_address,
        connection_burst_per_address=c.connection_burst_per_address,
        idle_association_seconds=c.idle_association_seconds,
        max_associations_per_address=c.max_associations_per_address,
        max_associations_per_calling_ae=c.max_associations_per_calling_ae,
        junk_log_interval_seconds=c.junk_log_interval_seconds,
        load_board=load_board,
        listening_socket=listening_socket,
    )


def destination_remote(config: Config, dest: Destination) -> RemoteAE:
    """How we reach a PACS destination (`[[delivery.destinations]]`): delivery, C-ECHO."""
    ctx = None
    if dest.tls.enabled:
        ctx = client_context(dest.tls.ca_file, dest.tls.cert_file, dest.tls.key_file)
    return RemoteAE(
        ae_title=dest.ae_title,
        host=dest.host,
        port=dest.port,
        calling_ae_title=config.scp.ae_title,
        ssl_context=ctx,
        timeout=dest.timeout_seconds,
    )
