#!/usr/bin/env bash
# The Debian packages the test suite talks to, installed only when missing.
# Used by `make test` and by .ci/run.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
# DICOMweb for OHIF (the viewer tests read Orthanc through it).
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The viewer tests: OHIF runs in headless Chromium (driven by Playwright), and
# tesseract reads the text burned into our summary image off the screen.
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v tesseract >/dev/null || need+=(tesseract-ocr)
[ -n "$(ls /usr/share/tesseract-ocr/*/tessdata/eng.traineddata 2>/dev/null)" ] || need+=(tesseract-ocr-eng)
# PixelMed's DicomSRValidator checks our SRs against the DICOM templates
# (TID 1500), which dciodvfy does not look at; it runs on a Java runtime.
[ -e /usr/share/java/pixelmed.jar ] || need+=(libpixelmed-java)
command -v java >/dev/null || need+=(default-jre-headless)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
