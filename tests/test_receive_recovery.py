"""After an unclean stop, rows that the database lost are rebuilt from the spool.

With SQLite synchronous=NORMAL a power loss may roll back the last commits
although their files were fsynced and their C-STOREs acknowledged. The test
reproduces exactly that state (rows gone, files there, daemon killed) and
checks that the next start records every acknowledged instance again.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete

from db.audit import EventType
from db.models import Instance
from tests.conftest import storescu
from tests.dicomgen import RECEIVE_ONLY, DaemonDB, ct_study, header


def test_rows_lost_by_a_crash_are_rebuilt_from_the_spool(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(RECEIVE_ONLY).start()
    files = ct_study(tmp_path / "ct", 12, seed=11)
    headers = [header(p) for p in files]
    study_uid = headers[0].study_instance_uid
    sent = storescu(d.port, files)
    assert sent.returncode == 0, sent.stderr
    d.kill()

    db = DaemonDB.of(d.state)
    lost = {h.sop_instance_uid for h in headers[-5:]}
    with db.db.session() as s:
        s.execute(delete(Instance).where(Instance.sop_instance_uid.in_(lost)))
    assert len(db.instances(study_uid)) == 7

    d.start()
    assert "did not stop cleanly" in d.log()
    rows = db.instances(study_uid)
    assert {r.sop_instance_uid for r in rows} == {h.sop_instance_uid for h in headers}
    recovered = {e.sop_instance_uid for e in db.events(EventType.INSTANCE_RECOVERED)}
    assert recovered == lost
    d.wait_for(lambda: db.complete(study_uid), timeout=30)

    # A clean stop leaves no marker: the next start does not scan the spool.
    assert d.stop() == 0
    d.start()
    assert d.log().count("did not stop cleanly") == 1
    assert d.stop() == 0
    db.close()
