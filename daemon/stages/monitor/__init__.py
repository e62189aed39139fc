"""Stage 7, monitor: how each model version performs and whether its inputs drift.

`performance.py`: PPV, sensitivity and NPV (from AI negatives sampled for
review), agreement, subgroups and champion/challenger agreement, each with a
confidence interval. `governance.py`: model modes and their promotion.
`report.py`: the committee's report (HTML and PDF) and the registry export.
"""
