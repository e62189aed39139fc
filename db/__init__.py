"""The database: the only package that speaks SQL (import-linter checks it).

One module per stage's tables, named in docs/architecture.md:

| stage    | module                                     |
|----------|--------------------------------------------|
| receive  | ingest.py (instances), mpps.py             |
| complete | studies.py (complete studies, queue jobs)  |
| analyse  | queue.py (the job queue), results.py (runs and findings), saliency.py (the map files) |
| report   | reports.py                                 |
| deliver  | outbox.py                                  |
| review   | reviews.py, accounts.py                    |
| retain   | retention.py                               |
| pull     | pulls.py                                   |
| seal     | chain.py; audit.py is written by every stage |

models.py holds the tables and their states, layout.py the state folder's
layout, session.py the engine and sessions, migrate.py and migrations/ the schema.
"""
