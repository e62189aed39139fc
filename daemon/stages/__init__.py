"""The pipeline's stages, one module or small package each, named as in the README's flow.

| stage    | module                      | what it does                                          |
|----------|-----------------------------|-------------------------------------------------------|
| receive  | stages/receive/             | C-STORE and MPPS into the spool and the database      |
| complete | stages/complete.py          | a quiet (or MPPS-complete) study becomes one job      |
| analyse  | stages/analyse/             | the worker claims jobs and runs the models            |
| report   | stages/report.py            | SR, parametric map, GSPS, summary image, SEG          |
| deliver  | stages/deliver.py           | the outbox to each PACS, storage commitment           |
| review   | stages/review.py            | physicians' decisions and the verified SR             |
| retain   | stages/retain.py            | files of finished studies, by age and disk watermark  |
| pull     | stages/pull.py              | scheduled C-FIND / C-MOVE from the PACS               |
| seal     | stages/seal.py              | chains the audit trail                                |
| monitor  | stages/monitor/             | new scanners at once, drift per period (governance)   |

A stage imports no other stage: they talk through the database and the
scheduler's wake-ups (daemon/service.py wires them). What they all build the
same way (database, SCP settings, destinations) is in daemon/factories.py.
"""
