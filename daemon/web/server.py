"""The web page's HTTP server: waitress (a production WSGI server, pure Python) in a thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from waitress import create_server

from daemon.config import Config
from db.session import Database

log = logging.getLogger(__name__)


def serve_web(
    config: Config,
    db: Database,
    healthy: Callable[[], bool],
    on_signed: Callable[[datetime | None], None] | None = None,
) -> Any:
    """Start the web page on `web.host`:`web.port`; returns the server (call .close())."""
    from daemon.web import create_app  # Flask only where the page is served

    app = create_app(config, db, healthy, on_signed)
    server = create_server(app, host=config.web.host, port=config.web.port, threads=4,
                           ident="secondreader")  # fmt: skip
    threading.Thread(target=server.run, name="web", daemon=True).start()
    log.info("web page on http://%s:%s/", config.web.host, server.effective_port)
    return server
