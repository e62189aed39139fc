"""SQLAlchemy models: the tables every stage reads and writes.

Times are naive UTC (`utcnow()`), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    # Start of the current receiving period: the forced-completion clock.
    receiving_since: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    completion_count: Mapped[int] = mapped_column(Integer, default=0)
    # Retention (daemon/stages/retain.py) removed the files of every instance
    # received up to this moment; the rows stay. Instances received later
    # (the study re-opened) have their files.
    files_removed_at: Mapped[datetime | None] = mapped_column(DateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    calling_ae: Mapped[str] = mapped_column(String(16))
    receive_count: Mapped[int] = mapped_column(Integer, default=1)

    series: Mapped[Series] = relationship(back_populates="instances")


class AncillaryInstance(Base):
    """An object stored (or dropped) but never analysed: a non-image object
    (SR, SEG, PR, KO, RT, waveform, PDF) or one we produced coming back.

    Kept apart from `instances`, so that it never re-opens a study, never
    counts towards its completion and never reaches a worker (loop guard).
    """

    __tablename__ = "ancillary_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    # Relative to the ancillary spool; None when dropped (scp.non_image_objects).
    path: Mapped[str | None] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    calling_ae: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))  # "non-image" or "own object"
    receive_count: Mapped[int] = mapped_column(Integer, default=1)


class Job(Base):
    """One unit of queued work on a study (for now: analyse it)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="analyse")
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class AuditEvent(Base):
    """Append-only trail of what happened. Written only through db.audit.

    Tamper-evident (db/chain.py): `row_mac` signs the row when it is written,
    `seq` and `chain_mac` chain it to the previous one when it is sealed.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(128))  # AE title, worker id or user
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Unique: a copied row (content and MAC) cannot be inserted a second time.
    nonce: Mapped[str | None] = mapped_column(String(32), unique=True)
    row_mac: Mapped[str | None] = mapped_column(String(64))
    seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    chain_mac: Mapped[str | None] = mapped_column(String(64))


class ReportState(StrEnum):
    PENDING = "pending"  # the report stage has not built the SR/SEG yet
    REPORTED = "reported"  # objects built and queued in the outbox
    FAILED = "failed"
    # A silent model version's run: recorded and monitored, nothing built or sent.
    WITHHELD = "withheld"


class ModelMode(StrEnum):
    """What a model version's results reach (db/governance.py)."""

    SILENT = "silent"  # recorded and monitored only
    REVIEW_ONLY = "review-only"  # the review worklist, not the PACS
    LIVE = "live"  # the PACS and the worklist


class ReviewSelection(StrEnum):
    """Why an analysed run is (or is not) in the review worklist."""

    POSITIVE = "positive"  # the AI called a finding present
    SAMPLED_NEGATIVE = "sampled_negative"  # AI negative, drawn for quality control
    UNSAMPLED_NEGATIVE = "unsampled_negative"  # AI negative, not drawn


class AnalysisRun(Base):
    """One model (or the decision that none applies) run on one study.

    Written by the infer stage, read by the report stage.
    """

    __tablename__ = "analysis_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # model.results.Outcome
    reason: Mapped[str | None] = mapped_column(Text)  # why the AI did not run
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_device_uid: Mapped[str | None] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    # Preprocessing steps with parameters and timings: provenance for the audit.
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Saliency map on the source grid (.npz under the state directory).
    saliency_path: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    report_state: Mapped[str] = mapped_column(String(16), default=ReportState.PENDING, index=True)
    report_error: Mapped[str | None] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    # "pending": the SR is queued, the other objects (map, GSPS, summary) are
    # still to build (daemon/stages/report.py, second pass); None: none or done.
    extras_state: Mapped[str | None] = mapped_column(String(16))
    # Set by the report stage: the model version's mode when its report was
    # decided (ModelMode), why it is in the worklist (ReviewSelection) and the
    # fraction of AI negatives drawn then. None on runs from before governance.
    mode: Mapped[str | None] = mapped_column(String(16))
    review_selection: Mapped[str | None] = mapped_column(String(24), index=True)
    sample_fraction: Mapped[float | None]

    findings: Mapped[list[FindingRecord]] = relationship(back_populates="run")


class FindingRecord(Base):
    """One output label of one run: probability, decision and where."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("analysis_runs.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    finding_code: Mapped[dict[str, Any]] = mapped_column(JSON)  # value, scheme, meaning
    site_code: Mapped[dict[str, Any]] = mapped_column(JSON)
    probability: Mapped[float]
    threshold: Mapped[float]
    present: Mapped[bool]
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    frame_number: Mapped[int | None] = mapped_column(Integer)
    point: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"col": x, "row": y}
    box: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"col0","row0","col1","row1"}
    tracking_uid: Mapped[str | None] = mapped_column(UID)  # set by the report stage
    # Projection studies: the side ("L", "R"), the key image's view, the views it is present on.
    laterality: Mapped[str | None] = mapped_column(String(1))
    view: Mapped[str | None] = mapped_column(String(64))
    views: Mapped[list[str] | None] = mapped_column(JSON)
    # Detection models: which lesion of its label (1 = most suspicious), its diameter.
    # Segmentation models: which region (1 = the largest), its longest axial diameter.
    lesion: Mapped[int | None] = mapped_column(Integer)
    diameter_mm: Mapped[float | None]
    # Segmentation models: the region's volume, the mean and maximum of the image over it.
    volume_ml: Mapped[float | None]
    mean_intensity: Mapped[float | None]
    max_intensity: Mapped[float | None]
    # 3D detection models: the box's section in the key plane, [[x, y, z], ...] mm (LPS).
    region_3d: Mapped[list[list[float]] | None] = mapped_column(JSON)

    run: Mapped[AnalysisRun] = relationship(back_populates="findings")


class Decision(StrEnum):
    CONFIRM = "confirm"
    REJECT = "reject"  # the finding is stated as absent (or, for an absent one, present)
    CORRECT = "correct"  # kept, at the location the physician gives


class FindingDecision(Base):
    """A physician's decision on one AI finding, in one review round.

    Round 1 is the first review; each amendment is a new round, with a
    decision for every finding (changed or carried over), so a round alone
    says what its verified SR states.
    """

    __tablename__ = "finding_decisions"
    __table_args__ = (
        UniqueConstraint("finding_id", "round", name="uq_finding_decisions_finding_round"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("analysis_runs.id"), index=True)
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id"))
    round: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(16))
    reviewer: Mapped[str] = mapped_column(String(64))
    organization: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    # For a correction: {"sop_instance_uid", "sop_class_uid", "frame_number", "point"|"box"}.
    location: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    decided_at: Mapped[datetime] = mapped_column(DateTime)


class Verification(Base):
    """A verified SR: one completed review round of one AI result."""

    __tablename__ = "verifications"
    __table_args__ = (UniqueConstraint("run_id", "round", name="uq_verifications_run_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("analysis_runs.id"))
    round: Mapped[int] = mapped_column(Integer)
    reviewer: Mapped[str] = mapped_column(String(64))
    organization: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)  # why an amendment was made
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID)
    # The AI SR for round 1; the previous verified SR for an amendment.
    predecessor_sop_instance_uid: Mapped[str] = mapped_column(UID)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class PerformedProcedureStep(Base):
    """An MPPS the modality created and updated (dicom_io/mpps.py)."""

    __tablename__ = "performed_procedure_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    status: Mapped[str] = mapped_column(String(16))
    # SOP Instance UIDs of the Performed Series Sequence (COMPLETED lists them all).
    instance_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    calling_ae: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    # When it completed its study: it does so once (a later re-opening waits
    # for the quiet window as usual).
    used_at: Mapped[datetime | None] = mapped_column(DateTime)


class PulledStudy(Base):
    """A study the scheduled pull found on the PACS (daemon/stages/pull.py): pulled once."""

    __tablename__ = "pulled_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    source_ae: Mapped[str] = mapped_column(String(16))
    # "pulled" (C-MOVE succeeded), "present" (already here: not asked for),
    # "retry" (failed, asked again next poll) or "failed" (gave up).
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    found_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class User(Base):
    """A local account of the web page (daemon/accounts.py): reviewer or admin."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # As DICOM writes a person (Smith^Jane): the verifying observer of their SRs.
    full_name: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(256))  # argon2id, with its parameters
    role: Mapped[str] = mapped_column(String(16))  # "reviewer" or "admin"
    disabled: Mapped[bool] = mapped_column(default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    password_changed_at: Mapped[datetime] = mapped_column(DateTime)


class WebSession(Base):
    """A logged-in browser: only the token's hash is kept, and its CSRF token."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime)


class DeliveryState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"  # gave up; `secondreader deliveries retry` re-queues
    # Release policy after_review: waits for the physician's decision.
    HELD = "held"
    # Held, and the site sends only the verified result: never sent.
    WITHHELD = "withheld"


class OutboxItem(Base):
    """One object for one destination; survives restarts, so retries do too."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "state", "next_attempt_at"),
        Index("uq_outbox_object_destination", "sop_instance_uid", "destination", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("analysis_runs.id"), index=True)
    object_kind: Mapped[str] = mapped_column(String(16))  # "sr", "seg", "verified-sr"
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to the state directory
    destination: Mapped[str] = mapped_column(String(64))  # name from the config
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Storage commitment: none / requested / committed / failed.
    commitment_state: Mapped[str] = mapped_column(String(16), default="none")
    commitment_transaction_uid: Mapped[str | None] = mapped_column(UID)


class InstallationSetting(Base):
    """One fact about this installation, e.g. the audit key's fingerprint (never the key)."""

    __tablename__ = "installation_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class ProcessHeartbeat(Base):
    """A running process's last sign of life: serve, a receiving process, a worker.

    Each beats every few seconds (db/liveness.py); a row whose beat is old
    and that never said it stopped is a process that died.
    """

    __tablename__ = "process_heartbeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)  # kind@host:pid
    kind: Mapped[str] = mapped_column(String(16))  # "serve", "receiver", "worker"
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    beat_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)


class ModelModeChange(Base):
    """A model version's mode, from this moment: the latest row is its mode now.

    Written only by db/governance.py, with who changed it, why and on what
    evidence (the figures the admin saw), and audited.
    """

    __tablename__ = "model_mode_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16))
    changed_at: Mapped[datetime] = mapped_column(DateTime)
    changed_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RunObservation(Base):
    """What governance watches of one analysed run (model/observation.py), with its output.

    No name, ID, UID or date of the patient: age as a band. `calling_ae` is
    the AE title that sent the analysed series.
    """

    __tablename__ = "run_observations"

    run_id: Mapped[int] = mapped_column(ForeignKey("analysis_runs.id"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    analysed_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_model: Mapped[str | None] = mapped_column(String(64))
    kernel: Mapped[str | None] = mapped_column(String(64))
    slice_thickness: Mapped[float | None]
    kvp: Mapped[float | None]
    pixel_spacing: Mapped[float | None]
    contrast: Mapped[str | None] = mapped_column(String(8))
    p01: Mapped[float | None]
    p50: Mapped[float | None]
    p99: Mapped[float | None]
    noise: Mapped[float | None]
    score: Mapped[float]  # the highest probability of the run's findings
    positive: Mapped[bool]  # some finding called present
    patient_sex: Mapped[str | None] = mapped_column(String(1))
    age_band: Mapped[str | None] = mapped_column(String(8))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
