"""The monitor stage: model governance's watch over what each model version sees.

- statistics.py: PSI, two-sample KS and chi-square, in numpy alone;
- drift.py: a version's baseline and weekly periods, compared variable by variable;
- watch.py: serve's jobs: a new scanner reported as soon as its run is
  recorded, and the drift alerts of each complete period, once each.
"""
