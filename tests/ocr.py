"""Reading a picture's text as a person would: tesseract (Debian tesseract-ocr) on a PNG.

Our pictures and OHIF's viewport are light text on dark or coloured ground;
tesseract reads dark text on light best, so the picture is turned to grey,
inverted and enlarged twice first.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def read_text(picture: Path | np.ndarray) -> str:
    """The words tesseract finds, whitespace folded to single spaces."""
    tesseract = shutil.which("tesseract")
    if tesseract is None:
        pytest.fail("tesseract is not installed (Debian packages tesseract-ocr, -eng)")
    image = Image.open(picture) if isinstance(picture, Path) else Image.fromarray(picture)
    grey = 255 - np.asarray(image.convert("L"))
    prepared = Image.fromarray(grey).resize((image.width * 2, image.height * 2))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "page.png"
        prepared.save(path)
        run = subprocess.run(
            [tesseract, str(path), "-", "--psm", "6"], capture_output=True, text=True, timeout=120
        )
    assert run.returncode == 0, run.stderr
    return " ".join(run.stdout.split())
