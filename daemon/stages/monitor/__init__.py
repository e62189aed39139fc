"""Stage 7, monitor: how each model version performs, and whether what it sees drifts.

- governance.py: model modes (silent, review-only, live) and their promotion;
- performance.py: PPV, sensitivity and NPV (from AI negatives sampled for
  review), agreement, subgroups and champion/challenger concordance, each
  with a confidence interval;
- report.py: the committee's report (PDF beside the web page's HTML) and
  the registry export;
- statistics.py: PSI, two-sample KS and chi-square, in numpy alone;
- drift.py: a version's baseline and weekly periods, compared variable by variable;
- watch.py: serve's jobs: a new scanner reported as soon as its run is
  recorded, and the drift alerts of each complete period, once each.
"""
