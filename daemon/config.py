"""Configuration: one TOML file, validated at start-up, overridable per key.

Every key has a default, so the daemon runs with no file at all. An
environment variable `SECONDREADER_<SECTION>__<KEY>` overrides one key, e.g.
`SECONDREADER_SCP__PORT=11113`; its value is read as JSON when it parses
(numbers, booleans, lists) and as a plain string otherwise.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from db.layout import AUDIT_KEY_FILE, StateLayout

ENV_PREFIX = "SECONDREADER_"
CONFIG_ENV = "SECONDREADER_CONFIG"


class ConfigError(Exception):
    """An invalid configuration; the message names the key and the problem."""


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


def _ae_title(v: str) -> str:
    if not 0 < len(v) <= 16 or "\\" in v or not v.isprintable() or v.strip() != v:
        raise ValueError("an AE title is 1 to 16 printable characters, no backslash")
    return v


class AllowedPeer(_Section):
    ae_title: str
    # Source addresses this AE may call from; empty means any address.
    addresses: list[str] = Field(default_factory=list)

    _check_ae = field_validator("ae_title")(_ae_title)


class TLSConfig(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    # CA bundle to verify client certificates; setting it makes them required.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _cert_when_enabled(self) -> TLSConfig:
        # Refused here (exit 2, key named) rather than as a traceback at start-up.
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("TLS enabled needs both cert_file and key_file")
        return self


class SCPConfig(_Section):
    ae_title: str = "SECONDREADER"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    # The largest PDU we accept, announced to every peer; a peer that declares
    # a longer one is cut off (memory is never given to an unbounded length).
    # 1 MiB is as fast as unlimited here (bench/ingest.py).
    max_pdu_size: int = Field(1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    # Refuse a request addressed to another AE title (a misrouted sender).
    check_called_ae_title: bool = True
    # Modality Performed Procedure Step SCP: a study whose MPPS is COMPLETED
    # completes as soon as every instance it lists has arrived, without the
    # quiet window (completion.stable_seconds, still the rule without MPPS).
    accept_mpps: bool = True
    # Receiving processes sharing the listening socket: concurrent
    # associations are received on that many cores. 1: `serve` alone.
    # max_associations applies to each process.
    processes: int = Field(1, ge=1, le=64)
    # Objects that are not images (SR, SEG, PR, KO, RT, waveforms, PDF):
    # "store" keeps them in the spool, "discard" answers success and drops
    # them; either way they are audited and never analysed. "refuse" rejects
    # them at association negotiation.
    non_image_objects: Literal["store", "discard", "refuse"] = "store"
    # Storage SOP Class UIDs refused at negotiation, whatever the above says.
    refused_sop_classes: list[str] = Field(default_factory=list)
    # From the TCP connection to an accepted association (TLS handshake
    # included), and for any one PDU to arrive whole: past these a peer is cut off.
    request_timeout_seconds: float = Field(10.0, gt=0)
    pdu_timeout_seconds: float = Field(60.0, gt=0)
    # Connections from one address that may wait for their association at once:
    # above max_associations' default, so that a PACS opening its associations
    # in one burst is served, yet one address cannot take every pending slot.
    max_pending_per_address: int = Field(16, ge=1)
    # New connections from one address that never become an association: a
    # burst of this many, then this many a second; past them a port scan or a
    # flood is refused in the accept loop, costing no thread. A connection that
    # becomes an association gives its place back (dicom_io/guard.py).
    connection_rate_per_address: float = Field(20.0, gt=0)
    connection_burst_per_address: int = Field(100, ge=1)
    # An association admitted and then silent (no PDU) this long is released:
    # it holds a slot of max_associations and sends nothing.
    idle_association_seconds: float = Field(15.0, gt=0)
    # Admitted associations one address, or one calling AE title, may hold at
    # once. Unset: half of max_associations (at least 1), so one source can
    # never take every slot. A PACS that sends over more associations at once
    # needs max_associations raised, or these.
    max_associations_per_address: int | None = Field(None, ge=1)
    max_associations_per_calling_ae: int | None = Field(None, ge=1)
    # Connections that never become an association are logged and audited
    # once per source address and interval, with a count.
    junk_log_interval_seconds: float = Field(60.0, gt=0)
    # From a C-STORE-RQ to its answer when the database cannot be written:
    # past this, 0xA700 (out of resources), well within a sender's patience
    # (typically 30 s), so it can tell a refusal from a lost answer.
    store_deadline_seconds: float = Field(10.0, gt=0, le=25)
    # Empty list: any calling AE is accepted. Otherwise default deny.
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    # Seconds to let running associations finish after SIGTERM.
    drain_seconds: float = Field(30.0, ge=0)

    _check_ae = field_validator("ae_title")(_ae_title)


class StorageConfig(_Section):
    # Holds the spool and the SQLite file. systemd's StateDirectory wins when set.
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "state")).absolute()
    )
    # fsync each received file before acknowledging it. Off only for benchmarks.
    fsync: bool = True

    @property
    def layout(self) -> StateLayout:
        """The state folder's folders and files (db/layout.py)."""
        return StateLayout(self.state_dir)

    @property
    def spool_dir(self) -> Path:
        return self.layout.spool

    @property
    def ancillary_dir(self) -> Path:
        """Non-image objects and our own objects sent back: kept, never analysed."""
        return self.layout.ancillary


class DatabaseConfig(_Section):
    # SQLAlchemy URL; empty = SQLite file in the state directory.
    url: str = ""
    # NORMAL (WAL) survives a process crash; on power loss the last commits may
    # be lost, and start-up rebuilds their rows from the fsynced spool files.
    # FULL also fsyncs every commit: about 2.5 ms more per received instance here.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "NORMAL"


class CompletionConfig(_Section):
    stable_seconds: float = Field(10.0, gt=0)
    # A study still receiving after this long is completed anyway.
    max_seconds: float = Field(1800.0, gt=0)
    check_interval_seconds: float = Field(2.0, gt=0)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DestinationTLS(_Section):
    enabled: bool = False
    # CA bundle that signed the PACS certificate; empty: the system store.
    ca_file: Path | None = None
    # Our client certificate, for a PACS that requires mutual TLS.
    cert_file: Path | None = None
    key_file: Path | None = None


OutputKind = Literal["sr", "regions", "pmap", "seg", "binary-seg", "gsps", "summary"]
OUTPUT_KINDS: tuple[str, ...] = ("sr", "regions", "pmap", "seg", "binary-seg", "gsps",
                                 "summary")
# What OHIF 3.13 shows (SR, parametric map) and what any PACS shows (GSPS,
# summary). The FRACTIONAL SEG stays off: OHIF 3.13 hangs on "Loading SEG...".
# "regions" only exists for a segmentation model, whose SR it goes with.
DEFAULT_OUTPUTS: tuple[OutputKind, ...] = ("sr", "regions", "pmap", "gsps", "summary")
# What the report stage's second pass builds; the SR, and the SEG it cites,
# come first (daemon/stages/report.py).
EXTRA_KINDS = frozenset({"pmap", "binary-seg", "gsps", "summary"})


class Destination(_Section):
    """A PACS (or any C-STORE SCP) that receives our SR and SEG objects."""

    # "immediate": the preliminary AI objects go at once (the verified SR
    # follows the review). "after_review": they wait for the physician; then
    # the verified SR goes, with the AI objects only if send_ai_result_after_review.
    release: Literal["immediate", "after_review"] = "immediate"
    send_ai_result_after_review: bool = False
    # Which AI objects this destination receives (see OUTPUT_KINDS):
    # "sr" the TID 1500 SR; "regions" a segmentation model's BINARY SEG of
    # the regions its SR measures (its volumetric groups reference it; without
    # it the SR measures each region on its key image); "pmap" the saliency
    # as a Parametric Map (OHIF overlays it; CT/MR only); "seg" the saliency as a FRACTIONAL SEG;
    # "binary-seg" the thresholded region as a BINARY SEG; "gsps" the region
    # and its label as a presentation state on the key image (most PACS
    # viewers show it); "summary" a Secondary Capture of the result, for
    # every study, negative and not-run ones too. The physician's verified SR
    # goes to every destination.
    outputs: list[OutputKind] = Field(default_factory=lambda: list(DEFAULT_OUTPUTS), min_length=1)

    # Names the destination in the outbox and in `secondreader deliveries`.
    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str
    port: int = Field(104, ge=1, le=65535)
    tls: DestinationTLS = Field(default_factory=DestinationTLS)
    # Ask for storage commitment (N-ACTION) and count an object delivered only
    # once the PACS reports it committed. The PACS must know our AE (scp.*).
    storage_commitment: bool = False
    timeout_seconds: float = Field(30.0, gt=0)

    _check_ae = field_validator("ae_title")(_ae_title)

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each output kind at most once")
        return v


class ReportConfig(_Section):
    # Series of the AI result SR; high numbers keep it after the acquired series.
    series_number: int = Field(9901, ge=1)
    series_description: str = Field("AI RESULT - NOT VERIFIED - secondreader", max_length=64)
    # Series of the SR that says the AI did not run on a study, and why.
    not_run_series_description: str = Field(
        "AI NOT RUN - NO AI RESULT - secondreader", max_length=64
    )
    # false: no saliency objects at all (parametric map, SEGs), whatever a
    # destination's outputs ask for.
    segmentation: bool = True
    # Series of each AI object; the destinations' `outputs` say which are sent.
    seg_series_number: int = Field(9902, ge=1)
    seg_series_description: str = Field("AI SALIENCY - NOT VERIFIED - secondreader", max_length=64)
    pmap_series_number: int = Field(9904, ge=1)
    pmap_series_description: str = Field(
        "AI SALIENCY MAP - NOT VERIFIED - secondreader", max_length=64
    )
    gsps_series_number: int = Field(9905, ge=1)
    gsps_series_description: str = Field(
        "AI ANNOTATION - NOT VERIFIED - secondreader", max_length=64
    )
    summary_series_number: int = Field(9906, ge=1)
    summary_series_description: str = Field(
        "AI SUMMARY - NOT VERIFIED - secondreader", max_length=64
    )
    region_seg_series_number: int = Field(9907, ge=1)
    region_seg_series_description: str = Field(
        "AI REGION - NOT VERIFIED - secondreader", max_length=64
    )
    # A segmentation model's regions (the "seg" output of its results: the
    # SR's volumetric groups reference its segments).
    regions_seg_series_number: int = Field(9908, ge=1)
    regions_seg_series_description: str = Field(
        "AI SEGMENTATION - NOT VERIFIED - secondreader", max_length=64
    )
    manufacturer: str = Field("secondreader", max_length=64)
    manufacturer_model_name: str = Field("secondreader", max_length=64)
    institution_name: str | None = Field(None, max_length=64)
    institutional_department_name: str | None = Field(None, max_length=64)
    check_interval_seconds: float = Field(2.0, gt=0)


class AuditConfig(_Section):
    # HMAC key of the tamper-evident trail, outside the database. Empty: the
    # file audit.key next to the config file (or in the state directory
    # without one). `secondreader db upgrade` creates it (mode 0600).
    key_file: Path | None = None
    # How often the sealer chains new audit rows (and logs the chain's head).
    seal_interval_seconds: float = Field(5.0, gt=0)


class ReviewConfig(_Section):
    # The reviewer's organisation, in the verified SR (Verifying Organization).
    organization: str = Field("secondreader site", min_length=1, max_length=64)
    series_number: int = Field(9903, ge=1)
    series_description: str = Field("AI RESULT - PHYSICIAN REVIEWED", max_length=64)
    # A decision signed on the web page waits this long before its verified
    # SR is built and queued: the reviewer can undo it meanwhile. 0: at once.
    undo_seconds: float = Field(10.0, ge=0, le=600)


class DeliveryConfig(_Section):
    # Every object goes to every destination; none: objects are built, not sent.
    destinations: list[Destination] = Field(default_factory=list)
    # Backoff after the n-th failed attempt: base * 2**(n-1), at most max.
    retry_base_seconds: float = Field(30.0, gt=0)
    retry_max_seconds: float = Field(3600.0, gt=0)
    # An object not delivered this long after it was queued becomes a dead
    # letter: no more attempts until `secondreader deliveries retry`.
    dead_letter_after_seconds: float = Field(86400.0, gt=0)
    check_interval_seconds: float = Field(5.0, gt=0)
    # Storage commitment: no N-EVENT-REPORT this long after the N-ACTION
    # counts as a failed attempt (the object is sent and requested again).
    commitment_timeout_seconds: float = Field(600.0, gt=0)
    # Outbox items handled per tick, so one tick stays short.
    batch_size: int = Field(200, ge=1)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[Destination]) -> list[Destination]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        return v


class WorkerConfig(_Section):
    """The infer stage: how workers take jobs from the queue and run the models."""

    # `serve` runs one worker thread; false when workers run as `secondreader worker`.
    in_process: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Slices per forward pass; halved automatically on CUDA out-of-memory.
    batch_size: int = Field(16, ge=1)
    # A job whose worker stops renewing its lease this long goes back to the queue.
    lease_seconds: float = Field(120.0, gt=0)
    heartbeat_seconds: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    # Backoff after the n-th failed attempt: base * 2**(n-1), at most max.
    retry_backoff_seconds: float = Field(30.0, ge=0)
    retry_backoff_max_seconds: float = Field(3600.0, ge=0)
    # How often an idle worker looks for a queued job.
    poll_seconds: float = Field(2.0, gt=0)
    # On SIGTERM, let the current job finish this long, then give it back to the queue.
    stop_seconds: float = Field(30.0, ge=0)
    # Every process (serve, receiving processes, workers) records a beat this
    # often (db/liveness.py); three missed beats and it counts as gone.
    liveness_seconds: float = Field(10.0, gt=0)
    # A job queued this long while no worker is alive: a warning in `status`,
    # the Operations page and the log, a metric, and 503 from /healthz.
    no_worker_alert_seconds: float = Field(120.0, gt=0)
    # "module:callable" building another analyser from the Config, instead of the
    # models. An extension point used by the tests (tests/analysers.py); keep empty.
    analyser: str = ""
    # Memory (MB) touched once when the worker starts and kept, with every
    # block a study frees, for the next study: fresh memory costs page faults
    # that made building one 300-slice volume take up to 1.7 s instead of
    # 0.04 s (daemon/stages/analyse/worker.py, keep_freed_memory). The
    # worker's process keeps its largest footprint. 0: memory is given back
    # to the kernel as it is freed (glibc's defaults).
    keep_memory_mb: int = Field(1024, ge=0)
    # Streaming: images of studies still arriving are read, prepared and run
    # through the 2D models as they land in the spool, so that at completion
    # only the last few remain (daemon/stages/analyse/stream.py). Nothing is
    # reported before completion. Off: every image is read at completion.
    streaming: bool = True
    # How often the streamer looks for new images (a receiver in the same
    # process wakes it at once).
    stream_poll_seconds: float = Field(0.2, gt=0)
    # Memory the images read ahead may hold (a 300-slice 512x512 CT: about
    # 180 MB); past it, new images wait for completion.
    stream_memory_mb: int = Field(2048, ge=0)
    # A study nothing arrived for this long is forgotten (its job may have
    # gone to another worker); it is read again from the spool if needed.
    stream_forget_seconds: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerConfig:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("worker.heartbeat_seconds must be shorter than worker.lease_seconds")
        return self


class ModelsConfig(_Section):
    # Model folders (manifest.toml + weights); empty: the models shipped in model/builtin.
    paths: list[Path] = Field(default_factory=list)


class MonitoringConfig(_Section):
    """Model governance (daemon/stages/monitor/): modes, sampled negatives, drift, subgroups."""

    # The mode of a model version no admin has set (`secondreader model mode`):
    # "live" sends its results to the PACS, "review-only" to the worklist only,
    # "silent" records them and sends them nowhere. A site that wants every new
    # version to start with a silent trial sets "silent".
    default_mode: Literal["silent", "review-only", "live"] = "live"
    # The share of AI-negative results drawn into the review worklist, labelled
    # "AI negative, sampled for quality control": their decisions give
    # sensitivity and NPV. 1: every negative is listed (as before governance).
    negative_sample_fraction: float = Field(1.0, ge=0, le=1)
    # Drift: a model version's first `baseline_days` of observations (at least
    # `min_baseline_runs`) are its baseline; each later `period_days` is
    # compared with it every `drift_interval_seconds`.
    baseline_days: float = Field(28.0, gt=0)
    min_baseline_runs: int = Field(30, ge=5)
    period_days: float = Field(7.0, gt=0)
    min_period_runs: int = Field(20, ge=5)
    drift_interval_seconds: float = Field(3600.0, gt=0)
    # A variable alerts when its population stability index is above `psi_bound`
    # (0.25: the usual "major shift") AND its test's p-value (KS for numbers,
    # chi-square for categories) is below `ks_alpha` divided by the number of
    # variables tested (Bonferroni): PSI alone alarms on small samples' noise,
    # the p-value alone on trivial shifts between large samples.
    psi_bound: float = Field(0.25, gt=0)
    ks_alpha: float = Field(0.01, gt=0, lt=1)
    # Subgroups with fewer decided findings than this are marked "too few to say".
    min_group_size: int = Field(10, ge=1)


class MetricsConfig(_Section):
    # Prometheus /metrics over HTTP: studies, queue depth, outbox, dead letters
    # and audit event counts, read from the database.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=1, le=65535)


class PullConfig(_Section):
    """Scheduled pull (daemon/stages/pull.py): C-FIND the PACS for new studies, C-MOVE them to us.

    The PACS must know our AE title, host and port (its modality table). A
    study is pulled once: `pulled_studies` remembers it across restarts.
    """

    enabled: bool = False
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = Field(104, ge=1, le=65535)
    timeout_seconds: float = Field(30.0, gt=0)
    interval_seconds: float = Field(300.0, gt=0)
    # Filters of the C-FIND: modalities (one query each; empty: any), a Study
    # Description pattern ("*CHEST*"; empty: any), and studies of the last
    # `max_age_days` days by Study Date (today included).
    modalities: list[str] = Field(default_factory=list)
    study_description: str = Field("", max_length=64)
    max_age_days: int = Field(1, ge=0, le=3650)
    # Where the PACS sends them: our own AE title unless set.
    move_destination: str | None = None
    # At most this many C-MOVEs per poll, so one poll stays short.
    max_studies_per_poll: int = Field(20, ge=1)
    # A study whose C-MOVE failed this often is not asked for again.
    max_attempts: int = Field(3, ge=1)

    _check_ae = field_validator("ae_title")(_ae_title)


class RetentionConfig(_Section):
    """What `secondreader cleanup` and the daemon's retention job remove (daemon/stages/retain.py).

    Only finished studies lose their files (db/retention.py): never one that
    is receiving, queued, running, unreported, undelivered or, with
    `wait_for_review`, awaiting review. Database rows stay.
    """

    enabled: bool = True
    # Files of a finished study are kept this many days after it finished.
    keep_days: float = Field(30.0, ge=0)
    # Above `high_watermark_percent` of the state folder's disk in use,
    # finished studies are removed oldest first, whatever their age, until
    # below `low_watermark_percent`; at any hour, since a full disk cannot wait.
    high_watermark_percent: float = Field(90.0, gt=0, le=100)
    low_watermark_percent: float = Field(80.0, gt=0, le=100)
    # Age-based removal only between these times (local "HH:MM", both or
    # neither; the window may span midnight). Unset: at any time.
    window_start: str | None = Field(None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    window_end: str | None = Field(None, pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    # Keep a study until its analysed runs have a physician's verified SR.
    wait_for_review: bool = False
    check_interval_seconds: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> RetentionConfig:
        if self.low_watermark_percent >= self.high_watermark_percent:
            raise ValueError("low_watermark_percent must be below high_watermark_percent")
        if (self.window_start is None) != (self.window_end is None):
            raise ValueError("window_start and window_end go together")
        return self


class WebConfig(_Section):
    """The review web page (daemon/web/), served inside `serve` or by `secondreader web`."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # A session unused this long is over: the next request asks for the password.
    session_idle_minutes: float = Field(30.0, gt=0)
    # This many wrong passwords in a row lock the account for lockout_minutes.
    lockout_attempts: int = Field(5, ge=1)
    lockout_minutes: float = Field(15.0, gt=0)
    # Cookies only over HTTPS (set it behind a TLS reverse proxy).
    secure_cookies: bool = False
    # Single sign-on: a reverse proxy at one of these addresses names the
    # user in this header; from any other address the header is ignored.
    trusted_proxies: list[str] = Field(default_factory=list)
    proxy_user_header: str = ""
    # "Open in viewer": e.g. "https://viewer.example/viewer?StudyInstanceUIDs={study_uid}".
    viewer_url_template: str = ""


class Config(_Section):
    scp: SCPConfig = Field(default_factory=SCPConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    pull: PullConfig = Field(default_factory=PullConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    # The file this configuration was read from (not a setting).
    _source: Path | None = PrivateAttr(default=None)

    @property
    def audit_key_path(self) -> Path:
        """audit.key_file, else audit.key next to the config file (or in the state dir)."""
        if self.audit.key_file is not None:
            return self.audit.key_file
        folder = self._source.parent if self._source is not None else self.storage.state_dir
        return folder / AUDIT_KEY_FILE

    @property
    def database_url(self) -> str:
        """database.url with `postgres://` and `postgresql://` meaning our driver, psycopg 3."""
        if not self.database.url:
            return f"sqlite:///{self.storage.layout.database}"
        return normalise_database_url(self.database.url)

    @property
    def source(self) -> Path | None:
        """The file this configuration was read from; None: defaults and environment only."""
        return self._source


def normalise_database_url(url: str) -> str:
    """`postgres://` and `postgresql://` mean our PostgreSQL driver, psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and validate; raises ConfigError with a readable message."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    overrides = _env_overrides(environ)
    data = _merge(data, overrides)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(err, overrides, path) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from exc
    config._source = path.absolute() if path is not None else None
    return config


def _problem(err: Any, overrides: dict[str, Any], path: Path | None) -> str:
    """One problem, named where the administrator set it: the variable or the file."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    node: Any = overrides
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None and not isinstance(node, dict):
        where = f"environment variable {ENV_PREFIX}{'__'.join(p.upper() for p in loc)}"
    else:
        where = str(path) if path else "no file"
    message = str(err["msg"])
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _closest(loc)
    return f"{key}: {message} (set in {where})"


def _closest(loc: list[str]) -> str:
    """ ", did you mean X?" for a misspelt key, from the keys its section has."""
    section: Any = Config
    for part in loc[:-1]:
        if part.isdigit():
            continue  # an item of a list of sections: [[delivery.destinations]]
        annotation = getattr(section.model_fields.get(part), "annotation", None)
        args = getattr(annotation, "__args__", None)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            annotation = args[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    close = difflib.get_close_matches(loc[-1], list(section.model_fields), n=1, cutoff=0.6)
    return f", did you mean {'.'.join([*loc[:-1], close[0]])}?" if close else ""
