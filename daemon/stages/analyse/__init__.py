"""Analyse: the worker that claims jobs (worker.py) and the model analyser (analyser.py)."""
