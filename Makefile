# The two commands of the README: `make run` and `make test`.
# Both create the virtual environment first; torch is pinned by constraints.txt.
VENV ?= .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Migrate the embedded SQLite database under ./state and serve in the foreground.
run: install
	$(VENV)/bin/secondreader db upgrade
	$(VENV)/bin/secondreader serve

# Install the real peers if missing (dcmtk, Orthanc with DICOMweb, dicom3tools,
# PostgreSQL, Chromium, tesseract, PixelMed with a Java runtime), fetch the
# OHIF viewer the viewer tests open (npm package @ohif/app, checked against its
# published SHA-1), lint, check the layers (import-linter) and the types (mypy),
# then run the whole suite.
test: install
	deploy/install-system-packages.sh
	$(VENV)/bin/python tests/fetch_ohif.py
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

bench: install
	$(VENV)/bin/python bench/ingest.py
	$(VENV)/bin/python bench/pipeline.py
	$(VENV)/bin/python bench/models.py

clean:
	rm -rf $(VENV) state
