"""Fetch the built OHIF viewer (npm package @ohif/app, its dist/) for the viewer tests.

    .venv/bin/python tests/fetch_ohif.py        # `make test` runs it

Downloads the pinned tarball from the npm registry once, checks its SHA-1
(the `shasum` npm publishes), and unpacks dist/ under .cache/ohif-<version>/,
less the source maps and the ONNX runtime (OHIF's optional in-browser AI
tools; 130 MB the tests never load). Nothing is fetched while tests run.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "3.13.2"
URL = f"https://registry.npmjs.org/@ohif/app/-/app-{VERSION}.tgz"
SHA1 = "26a51ffcc1704c30fff403258a1d7392e9a991f3"
ROOT = Path(__file__).resolve().parent.parent / ".cache" / f"ohif-{VERSION}"
DIST = ROOT / "dist"


def _wanted(name: str) -> bool:
    return (
        name.startswith("package/dist/")
        and not name.endswith(".map")
        and not name.startswith("package/dist/ort/")
    )


def fetch() -> Path:
    """The unpacked dist/ folder, fetched if not already there."""
    stamp = ROOT / ".complete"
    if stamp.exists():
        return DIST
    with urllib.request.urlopen(URL, timeout=300) as rsp:
        data = rsp.read()
    digest = hashlib.sha1(data).hexdigest()
    if digest != SHA1:
        raise SystemExit(f"@ohif/app {VERSION}: SHA-1 {digest}, expected {SHA1}")
    ROOT.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name)]
        for member in members:
            member.name = member.name.removeprefix("package/")
        tar.extractall(ROOT, members=members, filter="data")
    stamp.write_text(f"{VERSION} {SHA1}\n")
    return DIST


if __name__ == "__main__":
    print(f"OHIF {VERSION} viewer in {fetch()}", file=sys.stderr)
