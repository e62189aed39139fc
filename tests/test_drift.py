"""The drift watch (issue 25): its statistics, a baseline stream that raises nothing over
eight weeks, a stream half from a new scanner that raises the alert and the new-scanner
report, and the report through a real `serve` as the new scanner's first run is recorded."""

from __future__ import annotations

import math
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.registry import CollectorRegistry
from pydicom import dcmread
from pydicom.uid import generate_uid

from daemon.config import MonitoringConfig
from daemon.metrics import DatabaseCollector
from daemon.stages.monitor.drift import VARIABLES, compare, drift_report
from daemon.stages.monitor.statistics import (
    chi2_2samp,
    chi2_sf,
    kolmogorov_q,
    ks_2samp,
    psi_categorical,
    psi_numeric,
)
from daemon.stages.monitor.watch import Monitor
from db.audit import EventType, events
from db.models import AnalysisRun, ReportState, RunObservation, Study, utcnow
from db.monitoring import observations
from db.session import Database
from dicom_io.synthetic import write_ct_series
from model.observation import intensity
from model.phantom import phantom_volume
from tests.configs import write_config
from tests.conftest import REPO, DaemonProcess, storescu
from tests.conftest import USER_PASSWORD as PASSWORD
from tests.dicomgen import PATIENT_ID, PATIENT_NAME

SETTINGS = MonitoringConfig(
    baseline_days=28, min_baseline_runs=30, period_days=7, min_period_runs=20,
    psi_bound=0.25, ks_alpha=0.01,
)  # fmt: skip
RUNS_PER_DAY = 6
WEEKS = 8
MODEL, VERSION = "demo-nodule-ct", "1.0.0"


# -- the statistics on known cases ------------------------------------------------------


def test_kolmogorov_series_matches_the_tables() -> None:
    # P(K > lam): 0.27 at 1.0; the 5 % and 1 % critical values 1.358 and 1.628.
    assert kolmogorov_q(1.0) == pytest.approx(0.2700, abs=1e-4)
    assert kolmogorov_q(1.358) == pytest.approx(0.05, abs=5e-4)
    assert kolmogorov_q(1.628) == pytest.approx(0.01, abs=2e-4)
    # The two forms of the series agree where they meet.
    assert kolmogorov_q(1.18 - 1e-9) == pytest.approx(kolmogorov_q(1.18), abs=1e-8)
    assert kolmogorov_q(0.0) == 1.0 and kolmogorov_q(5.0) < 1e-20


def test_ks_on_identical_shifted_and_hand_computed_samples() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 500)
    assert ks_2samp(a, a) == (0.0, 1.0)
    d, p = ks_2samp(a, rng.normal(0, 1, 500))
    assert d < 0.1 and p > 0.05
    d, p = ks_2samp(a, rng.normal(1.0, 1, 500))
    assert d > 0.3 and p < 1e-12
    # By hand: [1..4] against [5..8], D = 1; ne = 2, lam = (sqrt 2 + 0.12 + 0.11 / sqrt 2) * 1
    # = 1.6122, p = 2 (e^(-2 lam^2) - e^(-8 lam^2) + ...) = 0.011066.
    d, p = ks_2samp([1, 2, 3, 4], [5, 6, 7, 8])
    lam = math.sqrt(2) + 0.12 + 0.11 / math.sqrt(2)
    assert d == 1.0
    assert p == pytest.approx(2 * (math.exp(-2 * lam**2) - math.exp(-8 * lam**2)), rel=1e-6)
    assert p == pytest.approx(0.011066, abs=1e-5)
    # ECDFs 0.5 apart from 2 to 4 (at 3: 3/4 against 1/4): D = 0.5.
    assert ks_2samp([1, 2, 3, 4], [2.5, 3.5, 5, 6])[0] == 0.5


def test_chi_square_tail_matches_the_tables() -> None:
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(9.21, 2) == pytest.approx(math.exp(-9.21 / 2), rel=1e-9)  # df 2: exp(-x/2)
    assert chi2_sf(0.5, 3) == pytest.approx(0.9189, abs=1e-4)
    assert chi2_sf(30.0, 3) == pytest.approx(1.38e-6, rel=1e-2)
    same, p = chi2_2samp(["a"] * 50 + ["b"] * 50, ["a"] * 10 + ["b"] * 10)
    assert same == 0.0 and p == 1.0


def test_psi_by_hand_and_on_known_distributions() -> None:
    # Baseline a/b 50/50, period 90/10: 0.4 ln(1.8) + 0.4 ln(5) = 0.8789.
    psi = psi_categorical(["a"] * 5 + ["b"] * 5, ["a"] * 9 + ["b"])
    assert psi == pytest.approx(0.4 * math.log(1.8) + 0.4 * math.log(5), rel=1e-3)
    assert psi_categorical(["a", "b"] * 50, ["b", "a"] * 20) == pytest.approx(0.0, abs=1e-12)
    # A value the baseline never had weighs heavily (its share there is the epsilon).
    assert psi_categorical(["a"] * 100, ["a"] * 10 + ["new"] * 10) > 3.0
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, 5000)
    assert psi_numeric(base, rng.normal(0, 1, 5000)) < 0.02
    # One standard deviation's shift: well past the 0.25 of a "major shift".
    assert psi_numeric(base, rng.normal(1, 1, 5000)) > 0.8
    # Ties (kVp 100 or 120) merge the decile bins instead of breaking them.
    kvp = [100.0] * 30 + [120.0] * 70
    assert psi_numeric(kvp, kvp) == pytest.approx(0.0, abs=1e-12)


def test_an_alert_needs_both_a_large_and_a_significant_shift() -> None:
    rng = np.random.default_rng(3)
    rows = [{"noise": float(v), "score": 0.1} for v in rng.normal(10, 1, 40)]
    # Small samples of one distribution: PSI near the bound from noise alone, no alert.
    week = [{"noise": float(v), "score": 0.1} for v in rng.normal(10, 1, 20)]
    noise = next(v for v in compare(rows, week, SETTINGS) if v.variable == "noise")
    assert noise.test == "ks" and not noise.alert
    # Large samples and a trivial shift: significant, but PSI far below the bound.
    big = [{"noise": float(v)} for v in rng.normal(10, 1, 20000)]
    shifted = [{"noise": float(v)} for v in rng.normal(10.06, 1, 20000)]
    tiny = next(v for v in compare(big, shifted, SETTINGS) if v.variable == "noise")
    assert tiny.p_value < 1e-3 and tiny.psi < 0.05 and not tiny.alert
    # A real shift: both.
    moved = [{"noise": float(v)} for v in rng.normal(13, 1, 40)]
    real = next(v for v in compare(rows, moved, SETTINGS) if v.variable == "noise")
    assert real.alert


# -- simulated streams ----------------------------------------------------------------------

# Baseline scanners: (manufacturer, model, kernel, slice thickness, kVp), with their shares.
SCANNERS = (
    ("SIEMENS", "SOMATOM Force", "Br40d", 1.0, 120.0),
    ("GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD", 1.25, 120.0),
    ("SIEMENS", "SOMATOM go.Top", "Br44d", 1.5, 100.0),
)
SHARES = (0.5, 0.3, 0.2)
NEW_SCANNER = ("CANON_MEC", "Aquilion ONE", "FC13", 1.0, 120.0)


class Simulator:
    """Observations as the worker records them, from small phantom volumes.

    The image statistics are `model.observation.intensity` of a phantom
    volume (model/phantom.py) with its scanner's noise added. The new scanner
    adds more noise: a shifted noise level as well as a new name.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.seed = seed * 100_000

    def row(self, at: datetime, new_scanner: bool = False) -> dict[str, Any]:
        self.seed += 1
        volume, _ = phantom_volume(self.seed, n_slices=4, rows=40, cols=40, lesion=False)
        if new_scanner:
            scanner, extra = NEW_SCANNER, 40.0
        else:
            scanner, extra = SCANNERS[self.rng.choice(len(SCANNERS), p=SHARES)], 8.0
        noisy = volume + self.rng.normal(0.0, extra, volume.shape)
        score = float(self.rng.beta(1.2, 12.0))
        manufacturer, model, kernel, thickness, kvp = scanner
        return {
            "analysed_at": at, "modality": "CT", "body_part": "CHEST",
            "manufacturer": manufacturer, "manufacturer_model": model, "kernel": kernel,
            "slice_thickness": thickness, "kvp": kvp,
            "pixel_spacing": round(float(self.rng.uniform(0.6, 0.85)), 4),
            "contrast": "yes" if self.rng.random() < 0.4 else "no",
            **intensity(noisy), "score": score, "positive": score > 0.5,
            "patient_sex": "F" if self.rng.random() < 0.5 else "M", "age_band": "60-79",
        }  # fmt: skip

    def stream(self, start: datetime, days: int, new_share: float = 0.0) -> list[dict[str, Any]]:
        """RUNS_PER_DAY runs a day at random times; `new_share` of them from the new scanner."""
        times = sorted(
            start + timedelta(days=day, seconds=float(self.rng.uniform(0, 86_400)))
            for day in range(days)
            for _ in range(RUNS_PER_DAY)
        )
        return [self.row(t, bool(self.rng.random() < new_share)) for t in times]


def insert(
    db: Database, rows: list[dict[str, Any]], model: str = MODEL, version: str = VERSION
) -> None:
    """Each row as the worker leaves it: a study, its run and its observation."""
    with db.session() as s:
        for row in rows:
            study = Study(
                study_instance_uid=generate_uid(),
                state="complete", first_received_at=row["analysed_at"],
                receiving_since=row["analysed_at"], last_received_at=row["analysed_at"],
            )  # fmt: skip
            s.add(study)
            s.flush()
            run = AnalysisRun(
                study_id=study.id, outcome="analysed", model_name=model,
                model_version=version, created_at=row["analysed_at"],
                report_state=ReportState.REPORTED,
            )  # fmt: skip
            s.add(run)
            s.flush()
            s.add(RunObservation(run_id=run.id, model_name=model, model_version=version, **row))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    from db import migrate

    url = f"sqlite:///{tmp_path / 'drift.db'}"
    migrate.upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def _timeline() -> tuple[datetime, datetime]:
    """A baseline's start 28 days and 8 weeks before now, and now: the last week is complete."""
    now = utcnow()
    start = (now - timedelta(days=28 + 7 * WEEKS + 1)).replace(minute=0, second=0, microsecond=0)
    return start, now


def _metrics(db: Database) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db, config=None))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name.startswith("secondreader_drift")
    }


def test_baseline_stream_raises_nothing_over_eight_weeks(db: Database) -> None:
    start, now = _timeline()
    sim = Simulator(seed=25)
    insert(db, sim.stream(start, 28 + 7 * WEEKS + 1))
    monitor = Monitor(db, SETTINGS)
    report = monitor.report(MODEL, VERSION, now)
    assert report is not None and report.ready
    assert report.baseline_n >= 28 * RUNS_PER_DAY - 2 * RUNS_PER_DAY
    assert len(report.periods) == WEEKS
    for period in report.periods:
        assert period.enough and period.n >= SETTINGS.min_period_runs
        assert {v.variable for v in period.variables} == set(VARIABLES)
        assert period.alerting == [], (period.start, period.variables)
    assert report.new_values == ()
    # The jobs report nothing either: no log line, no audit row.
    assert monitor.new_values(now) == []
    monitor.drift(now)
    with db.session() as s:
        assert events(s, EventType.DRIFT_ALERT) == []
        assert events(s, EventType.DRIFT_NEW_VALUE) == []
    metrics = _metrics(db)
    assert sum(v for (name, _), v in metrics.items() if name == "secondreader_drift_alert") == 0


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Database, Path]]:
    """A baseline, then eight weeks half from a new scanner with more noise; and its config."""
    from db import migrate

    root = tmp_path_factory.mktemp("shifted")
    config = write_config(root, f"sqlite:///{root / 'drift.db'}")
    migrate.upgrade(config.database_url)
    database = Database(config.database_url)
    start, _ = _timeline()
    sim = Simulator(seed=26)
    rows = sim.stream(start, 28)
    baseline_end = rows[0]["analysed_at"] + timedelta(days=28)
    rows = [r for r in rows if r["analysed_at"] < baseline_end]
    rows += sim.stream(baseline_end, 7 * WEEKS + 1, new_share=0.5)
    insert(database, rows)
    yield database, root / "secondreader.toml"
    database.dispose()


def test_a_new_scanner_with_more_noise_raises_the_alert_and_the_report(
    shifted: tuple[Database, Path], caplog: pytest.LogCaptureFixture
) -> None:
    db, _ = shifted
    now = utcnow()
    monitor = Monitor(db, SETTINGS)

    caplog.set_level("WARNING", logger="daemon.stages.monitor.watch")
    found = monitor.new_values(now)
    assert {(n.variable, n.value) for _, _, n in found} == {
        ("manufacturer", "CANON_MEC"), ("manufacturer_model", "Aquilion ONE"), ("kernel", "FC13"),
    }  # fmt: skip
    # Reported once: a second pass (the next run recorded) adds nothing.
    assert monitor.new_values(now) == []
    lines = [r.getMessage() for r in caplog.records if "new " in r.getMessage()]
    assert len(lines) == 3
    assert any("new manufacturer [CANON_MEC]" in line for line in lines)

    reports = monitor.drift(now)
    (report,) = reports
    assert len(report.periods) == WEEKS
    for period in report.periods:
        assert {"noise", "manufacturer", "kernel"} <= set(period.alerting), period.variables
    with db.session() as s:
        new_rows = events(s, EventType.DRIFT_NEW_VALUE)
        alert_rows = events(s, EventType.DRIFT_ALERT)
    assert {(e.detail["variable"], e.detail["value"]) for e in new_rows} == {
        ("manufacturer", "CANON_MEC"), ("manufacturer_model", "Aquilion ONE"), ("kernel", "FC13"),
    }  # fmt: skip
    assert all(e.detail["model"] == MODEL and e.detail["version"] == VERSION for e in new_rows)
    assert len(alert_rows) == WEEKS
    assert "noise" in alert_rows[-1].detail["variables"]
    alert_lines = [r.getMessage() for r in caplog.records if "drifted" in r.getMessage()]
    assert len(alert_lines) == WEEKS and "noise" in alert_lines[-1]
    # Once per period: the next pass reports nothing again.
    monitor.drift(now)
    with db.session() as s:
        assert len(events(s, EventType.DRIFT_ALERT)) == WEEKS

    metrics = _metrics(db)
    labels = (("model", MODEL), ("version", VERSION))
    assert metrics[("secondreader_drift_new_values_total", labels)] == 3
    alert = "secondreader_drift_alert"
    assert metrics[(alert, (*labels[:1], ("variable", "noise"), *labels[1:]))] == 1
    assert metrics[(alert, (*labels[:1], ("variable", "kvp"), *labels[1:]))] == 0


def test_the_drift_page_shows_periods_new_values_and_plots(
    shifted: tuple[Database, Path],
) -> None:
    from daemon.accounts import AccountService
    from daemon.config import load_config
    from daemon.web import create_app

    db, config_path = shifted
    config = load_config(config_path, environ={})
    accounts = AccountService(db, config.web)
    accounts.add("root", PASSWORD, "admin", "test")
    accounts.add("smith", PASSWORD, "reviewer", "test")
    app = create_app(config, db)
    admin, reviewer = app.test_client(), app.test_client()
    for client, user in ((admin, "root"), (reviewer, "smith")):
        sent = {"username": user, "password": PASSWORD}
        assert client.post("/login", data=sent).status_code == 302
    page_url = f"/admin/monitoring/{MODEL}/{VERSION}/drift"
    assert reviewer.get(page_url).status_code == 403
    with app.test_request_context():
        from flask import url_for

        assert url_for("drift.drift", name=MODEL, version=VERSION) == page_url
    page = admin.get(page_url)
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "CANON_MEC" in text and "FC13" in text and "Aquilion ONE" in text
    assert text.count("DRIFT</strong>") == WEEKS
    assert 'class="alert"><td>noise</td><td>ks</td>' in text
    for variable in VARIABLES:
        assert f"/drift/{variable}.png" in text
    for variable in ("noise", "manufacturer"):
        png = admin.get(f"{page_url}/{variable}.png")
        assert png.status_code == 200 and png.mimetype == "image/png"
        assert png.data.startswith(b"\x89PNG")
    assert admin.get(f"{page_url}/patient_name.png").status_code == 404
    assert admin.get(f"/admin/monitoring/{MODEL}/9.9/drift").status_code == 404
    # The committee's report and the list of versions carry it too.
    report = admin.get(f"/admin/monitoring/{MODEL}/{VERSION}").get_data(as_text=True)
    assert report.count("alert: ") == WEEKS and "noise" in report
    assert "New manufacturer “CANON_MEC”" in report
    monitor = Monitor(db, SETTINGS)  # the list counts what the monitor's jobs reported
    monitor.new_values()
    monitor.drift()
    listed = admin.get("/admin/monitoring").get_data(as_text=True)
    assert f"{WEEKS} alerting period(s), 3 new scanner value(s)" in listed
    text = admin.get(f"/admin/monitoring/{MODEL}/{VERSION}/report.txt").get_data(as_text=True)
    assert text.count("ALERT: ") == WEEKS and "new manufacturer 'CANON_MEC'" in text


def test_model_drift_prints_the_periods_and_names_an_unknown_model(
    shifted: tuple[Database, Path],
) -> None:
    _, config_path = shifted

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "-c", str(config_path), "model", "drift", *args],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip

    out = cli(MODEL, VERSION)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"model {MODEL} {VERSION}: baseline ")
    drifted = [line for line in lines if "DRIFT:" in line]
    assert len(drifted) == WEEKS and all("noise (ks, PSI" in line for line in drifted)
    assert "new manufacturer 'CANON_MEC', first seen" in out.stdout
    unknown = cli("no-such-model", "1.0")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip().splitlines() == [
        f"secondreader: no observations of model no-such-model 1.0 "
        f"(models with observations: {MODEL} {VERSION})"
    ]


def test_too_few_runs_say_nothing(db: Database) -> None:
    start, now = _timeline()
    sim = Simulator(seed=27)
    rows = sim.stream(start, 28)[:20]  # 20 runs: fewer than min_baseline_runs
    rows += sim.stream(start + timedelta(days=29), 7, new_share=1.0)[:10]
    insert(db, rows)
    monitor = Monitor(db, SETTINGS)
    report = monitor.report(MODEL, VERSION, now)
    assert report is not None and not report.ready and report.periods == ()
    assert monitor.new_values(now) == []  # no baseline: nothing is new
    # A baseline, then a week with too few runs: "too few to say", nothing tested.
    with db.session() as s:
        rows = observations(s)
    report = drift_report(
        rows, MODEL, VERSION, SETTINGS.model_copy(update={"min_baseline_runs": 10}), now
    )
    assert report is not None and report.ready
    assert report.periods and all(not p.enough and p.alerting == [] for p in report.periods)


# -- through a real serve ---------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_serve_reports_a_new_manufacturer_as_its_first_run_is_recorded(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A baseline of 28 days (seeded rows: a month through serve would take a month), then
    one study from the synthetic writer's manufacturer, which the baseline never saw."""
    manifest = tomllib.loads((REPO / "model/builtin/ct-nodule/manifest.toml").read_text())
    model, version = manifest["name"], manifest["version"]
    d = daemon_factory('[worker]\ndevice = "cpu"\npoll_seconds = 0.2\n')
    d.cli("db", "upgrade")
    db = Database(f"sqlite:///{d.state / 'secondreader.db'}")
    start = utcnow() - timedelta(days=31)
    insert(db, Simulator(seed=28).stream(start, 28), model, version)
    d.start()
    volume, _ = phantom_volume(10, n_slices=12, rows=128, cols=128, spacing=(2.5, 2.8, 2.8))
    files = write_ct_series(volume, tmp_path / "ct", spacing=(2.5, 2.8, 2.8))
    assert dcmread(files[0]).Manufacturer == "secondreader synthetic"
    sent = storescu(d.port, files)
    assert sent.returncode == 0, sent.stderr

    line = f"drift: model {model} {version}: new manufacturer [secondreader synthetic] first seen"
    d.wait_for(lambda: line in d.log(), timeout=90)

    def reported() -> list[Any]:
        with db.session() as s:
            return events(s, EventType.DRIFT_NEW_VALUE)

    (row,) = d.wait_for(reported, timeout=30)
    assert row.actor == "monitor"
    assert {k: row.detail[k] for k in ("model", "version", "variable", "value")} == {
        "model": model, "version": version, "variable": "manufacturer",
        "value": "secondreader synthetic",
    }  # fmt: skip
    with db.session() as s:
        (recorded,) = [e for e in events(s, EventType.ANALYSIS_RECORDED)]
    # At once: woken by the recorded run, not at the check's next tick (a minute).
    assert (row.at - recorded.at).total_seconds() < 10
    assert d.stop() == 0
    log = d.log()
    assert log.count("new manufacturer") == 1  # once, though the job ran again at the stop
    assert PATIENT_NAME.split("^")[0] not in log and PATIENT_ID not in log
    db.dispose()


def test_new_values_are_found_and_reported_once_on_both_backends(db_url: str) -> None:
    """db/drift.py's grouped queries (first time of each value) on SQLite and PostgreSQL."""
    db = Database(db_url)
    try:
        start, now = _timeline()
        sim = Simulator(seed=29)
        baseline = sim.stream(start, 28)[::4]  # 42 runs over the 28 days
        later = [sim.row(now - timedelta(days=2)), sim.row(now - timedelta(days=1), True)]
        insert(db, baseline + later)
        monitor = Monitor(db, SETTINGS)
        found = monitor.new_values(now)
        assert sorted((m, v, n.variable, n.value) for m, v, n in found) == [
            (MODEL, VERSION, "kernel", "FC13"),
            (MODEL, VERSION, "manufacturer", "CANON_MEC"),
            (MODEL, VERSION, "manufacturer_model", "Aquilion ONE"),
        ]
        assert all(n.first_seen == later[1]["analysed_at"] for _, _, n in found)
        assert monitor.new_values(now) == []
        # A baseline too small for another version: nothing is new there.
        insert(db, [sim.row(start, True)] + later[:1], version="2.0.0")
        assert monitor.new_values(now) == []
    finally:
        db.dispose()
