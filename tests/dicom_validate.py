"""External validators for the DICOM objects we write, for any test to reuse.

dciodvfy (dicom3tools) checks an object against its IOD; its exit code does not
say whether it found errors, so its output is parsed. dsrdump (dcmtk) is a
second, independent SR reader.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

# The virtualenv's bin folder first: dicom3tools installs dciodvfy there.
_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    local = _BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (dicom3tools / dcmtk missing?)")
    return found


def dciodvfy_output(path: Path) -> list[str]:
    """Every line dciodvfy -new prints for the file.

    dciodvfy cannot read the Deflated transfer syntax (our parametric maps):
    such a file is inflated by dcmtk's dcmconv first, a second reader that
    must accept the deflated stream for the check to pass at all.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if _is_deflated(path):
            inflated = Path(tmp) / "inflated.dcm"
            subprocess.run(
                [_tool("dcmconv"), "+te", str(path), str(inflated)],
                capture_output=True, timeout=120, check=True,
            )  # fmt: skip
            path = inflated
        run = subprocess.run(
            [_tool("dciodvfy"), "-new", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


def _is_deflated(path: Path) -> bool:
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
    except Exception:
        return False
    return meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dciodvfy -new that report an error (warnings left out)."""
    return [line for line in dciodvfy_output(path) if line.startswith("Error")]


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """dcmtk's dsrdump of an SR file (check returncode and stdout)."""
    return subprocess.run(
        [_tool("dsrdump"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# PixelMed's jar and the two libraries it needs, as Debian installs them
# (libpixelmed-java, deploy/install-system-packages.sh).
_PIXELMED_JARS = ("pixelmed.jar", "commons-codec.jar", "commons-compress.jar")
_PIXELMED_CLASSPATH = ":".join(f"/usr/share/java/{jar}" for jar in _PIXELMED_JARS)
# Java 17's XPath limits stop PixelMed's template stylesheets half way: lifted.
_XPATH_LIMITS = ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")
_JAVA_XPATH_UNLIMITED = [f"-Djdk.xml.{limit}=0" for limit in _XPATH_LIMITS]


def pixelmed_sr_report(path: Path, *, template: bool = True) -> list[str]:
    """The Error: and Warning: lines of PixelMed's DicomSRValidator for an SR file.

    dciodvfy checks the SR's attributes; PixelMed also walks the content tree
    against the templates (TID 1500 and those it includes) and their context
    groups. A run that never reached the root template is a failure of its own,
    unless the SR follows none (`template=False`: the "AI not run" SR).
    """
    java = _tool("java")
    if not Path("/usr/share/java/pixelmed.jar").exists():
        raise FileNotFoundError("pixelmed.jar not found (Debian package libpixelmed-java)")
    run = subprocess.run(
        [java, *_JAVA_XPATH_UNLIMITED, "-cp", _PIXELMED_CLASSPATH,
         "com.pixelmed.validate.DicomSRValidator", str(path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = (run.stdout + run.stderr).splitlines()
    if template and not any(line.startswith("Found Root Template") for line in output):
        tail = "\n".join(output[-20:])
        raise RuntimeError(f"PixelMed found no root template in {path}:\n{tail}")
    return [line for line in output if line.startswith(("Error:", "Warning:"))]


def pixelmed_sr_errors(path: Path, *, template: bool = True) -> list[str]:
    """PixelMed's Error: lines for an SR file (warnings left out)."""
    return [line for line in pixelmed_sr_report(path, template=template)
            if line.startswith("Error:")]  # fmt: skip
