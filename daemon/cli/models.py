"""`model train`, `model evaluate`, `model calibrate`, `model drift` and `demo`."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli.parsing import EXIT_CONFIG, Subparsers
from daemon.config import Config
from daemon.stages.monitor.governance import GovernanceError, GovernanceService
from db.governance import MODES

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.stages.monitor.drift import DriftReport
    from model.datasets import Kind
    from model.manifest import ModelManifest


def _cmd_model_train(_config: Config, args: argparse.Namespace) -> int:
    from model.applications import APPLICATIONS

    site_data = args.csv is not None or args.dicom_root is not None
    if (args.csv is None) != (args.dicom_root is None):
        print("secondreader: --csv and --dicom-root go together", file=sys.stderr)
        return EXIT_CONFIG
    if args.kind not in _SLICE_CLASSIFIERS and (site_data or args.n_train or args.epochs):
        print(f"secondreader: --csv, --dicom-root, --n-train and --epochs are for the slice "
              f"classifiers ({', '.join(_SLICE_CLASSIFIERS)})", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    if args.kind in _SLICE_CLASSIFIERS:
        from model.train import train

        report = train(
            args.output,
            kind=_SLICE_CLASSIFIERS[args.kind],
            seed=args.seed,
            epochs=args.epochs,
            n_train=args.n_train or 2400,
            csv=args.csv,
            dicom_root=args.dicom_root,
            device=args.device,
            name=args.name,
            version=args.version,
        )
        print(f"model written to {args.output}")
        for key, value in sorted(report.metrics.items()):
            print(f"  {key:<24}{value:.4f}" if isinstance(value, float) else f"  {key:<24}{value}")
    else:
        APPLICATIONS[args.kind].train(args.output, args.seed)
        print(f"model written to {args.output}")
    return _print_evaluation(args.output)


def _print_evaluation(folder: Path) -> int:
    """The manifest's shifted-generator evaluation, where it has one."""
    from model.manifest import MANIFEST_NAME, ModelManifest

    evaluation = ModelManifest.from_file(Path(folder) / MANIFEST_NAME).evaluation
    if evaluation is None:
        print("  no shifted-generator evaluation recorded (the manifest has no [evaluation])")
        return 0
    print("  on a shifted generator, per study:")
    for label, words in evaluation.lines():
        print(f"    {label + ':':<34}{words}")
    return 0


# The kinds `model train` builds with the slice classifier's trainer (model.train),
# which also takes a site's own labelled studies.
_SLICE_CLASSIFIERS: dict[str, Kind] = {"ct-chest": "ct", "cr-chest": "cr"}


def _cmd_model_evaluate(_config: Config, args: argparse.Namespace) -> int:
    from model.manifest import MANIFEST_NAME, ModelManifest
    from model.registry import builtin_model_dir
    from model.train import evaluate

    folder = args.model or builtin_model_dir()
    if (manifest := ModelManifest.from_file(Path(folder) / MANIFEST_NAME)).kind != "classification":
        return _recorded_figures(Path(folder), manifest)
    metrics = evaluate(
        folder, seed=args.seed, csv=args.csv, dicom_root=args.dicom_root, device=args.device
    )
    print(f"{folder}:")
    for key in (
        "auc", "sensitivity", "specificity", "ece", "ece_uncalibrated", "brier",
        "brier_uncalibrated", "n",
        "study_auc", "study_sensitivity", "study_specificity", "study_ece",
        "study_ece_uncalibrated", "study_brier", "study_brier_uncalibrated", "n_studies",
    ):  # fmt: skip
        if key in metrics:
            value = metrics[key]
            low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
            interval = f"  (95 % CI {low:.4f} to {high:.4f})" if low is not None else ""
            print(f"  {key:<26}{int(value)}" if key.startswith("n")
                  else f"  {key:<26}{value:.4f}{interval}")  # fmt: skip
    return _print_evaluation(Path(folder))


def _recorded_figures(folder: Path, manifest: ModelManifest) -> int:
    """A detection or segmentation model: what its maker measured, as its manifest records it.

    `model evaluate` regenerates a classifier's synthetic test set; a detector's or a
    segmentation's test set is its maker's (for the demonstration bundle: its
    training script, `python -m model.train_segmentation`, which measures a shifted
    generator and writes the figures into the bundle's metadata).
    """
    print(f"{folder}: {manifest.name} {manifest.version}, a {manifest.kind} model")
    if not manifest.metrics and manifest.evaluation is None:
        print("  no held-out figures recorded in its manifest; measure it on your own "
              "labelled studies before use")
        return 0
    if manifest.metrics:
        print("  held-out figures recorded in its manifest (its maker's test set):")
    for key, value in manifest.metrics.items():
        print(f"  {key:<52}{value:.4g}")
    return _print_evaluation(folder)


# What `model calibrate` shows before and after: the measures calibration changes.
_CALIBRATION_KEYS = ("ece", "brier", "study_ece", "study_brier")


def _cmd_model_calibrate(_config: Config, args: argparse.Namespace) -> int:
    from model.recalibrate import recalibrate

    if (args.csv is None) != (args.dicom_root is None):
        print("secondreader: --csv and --dicom-root go together", file=sys.stderr)
        return EXIT_CONFIG
    try:
        r = recalibrate(args.folder, n_val_studies=args.n_val_studies, seed=args.seed,
                        csv=args.csv, dicom_root=args.dicom_root, version=args.version,
                        device=args.device)  # fmt: skip
    except ValueError as exc:
        print(f"secondreader: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    cal = r.new.calibration
    assert cal is not None
    print(f"{r.folder}: {r.new.name} {r.old.version} -> {r.new.version}")
    print(f"  Platt scaling on {cal.fitted_on}: slope {cal.slope:.4f}, "
          f"intercept {cal.intercept:.4f}")  # fmt: skip
    print(f"  threshold {r.old.threshold:.6g} -> {r.new.threshold:.6g} (the same decisions)")
    print(f"  on {r.test_set}:{'':<8}before     after")
    for key in _CALIBRATION_KEYS:
        if key in r.after:
            n = int(r.after["n_studies" if key.startswith("study_") else "n"])
            print(f"  {key:<14}(n={n:<4}) {r.before[key]:>10.4f}{r.after[key]:>10.4f}")
    return 0


def _model_errors() -> tuple[type[Exception], ...]:
    """What a model folder, file or manifest can get wrong: one line, not a traceback."""
    from pydantic import ValidationError

    from model.export import ExportError
    from model.registry import ModelIntegrityError, ModelLoadError

    return (ModelLoadError, ModelIntegrityError, ExportError, ValidationError, OSError)


def _refused(exc: Exception) -> int:
    print(f"secondreader: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _cmd_model_export_onnx(_config: Config, args: argparse.Namespace) -> int:
    from model.export import export_onnx

    try:
        folder = export_onnx(args.model, args.output, version=args.version)
    except _model_errors() as exc:
        return _refused(exc)
    print(f"ONNX model folder written to {folder} (logits and class-activation map; "
          "checked against torch)")
    return 0


def _cmd_model_import_onnx(config: Config, args: argparse.Namespace) -> int:
    from model.export import import_onnx
    from model.manifest import ModelManifest

    def named() -> ModelManifest:  # the manifest as written, before the file is pinned
        return ModelManifest.model_validate({**_toml(args.manifest), "weights": {
            "file": "model.onnx", "sha256": "0" * 64, "format": "onnx"}})  # fmt: skip

    try:
        folder = import_onnx(args.file, args.manifest, _into(config, args.into, named))
    except _model_errors() + (ValueError,) as exc:  # ValueError: a TOML that does not parse
        return _refused(exc)
    print(f"model folder written to {folder}")
    print(f"to run it, add it to [models] paths in the configuration: \"{folder}\"")
    return 0


def _cmd_model_import_bundle(config: Config, args: argparse.Namespace) -> int:
    from model.bundle import bundle_manifest, import_bundle

    try:
        into = _into(config, args.into, lambda: bundle_manifest(args.bundle, args.manifest)[0])
        manifest = import_bundle(args.bundle, args.manifest, into)
    except _model_errors() + (ValueError,) as exc:  # ValueError: a TOML that does not parse
        return _refused(exc)
    print(f"model folder written to {into} (from MONAI bundle {manifest.training['bundle']} "
          f"{manifest.training['bundle_version']})")
    print(f"  preprocessing: {manifest.training['preprocessing']}")
    if manifest.training["differences"] != "none known":
        print(f"  differences from MONAI: {manifest.training['differences']}")
    print(f"to run it, add it to [models] paths in the configuration: \"{into}\"")
    return 0


def _into(config: Config, given: Path | None, named: Callable[[], ModelManifest]) -> Path:
    """Where an imported model goes: as given, else <state_dir>/models/NAME-VERSION."""
    if given is not None:
        return given
    from model.export import folder_name

    return config.storage.state_dir / "models" / folder_name(named())


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    with path.open("rb") as fh:
        return tomllib.load(fh)


def _cmd_model_check(_config: Config, args: argparse.Namespace) -> int:
    from model.export import check_model

    try:
        r = check_model(args.model, args.device)
    except _model_errors() as exc:
        return _refused(exc)
    print(f"{r.folder}: {r.name} {r.version}")
    rows = [
        ("runtime", f"{r.runtime} on {r.device}"),
        ("input", " x ".join(map(str, r.input_shape))),
        ("kind", r.kind),
        ({"classification": "logits"}.get(r.kind, r.kind), " x ".join(map(str, r.logits_shape))),
        ("class-activation map", " x ".join(map(str, r.cam_shape)) if r.cam_shape else "none"),
        ("saliency from", r.saliency),
        ("time per window" if r.kind == "segmentation" else "time per slice",
         f"{r.milliseconds_per_slice:.3f} ms (median of 3 batches)"),
        ("calibration", r.calibration),
        ("intended use", r.intended_use),
    ]
    rows += [("label", label) for label in r.labels]
    for key, value in rows:
        print(f"  {key:<22}{value}")
    return 0


def _cmd_model_expectations(_config: Config, args: argparse.Namespace) -> int:
    from model import expectations
    from model.manifest import MANIFEST_NAME, ModelManifest

    if (args.csv is None) != (args.dicom_root is None):
        print("secondreader: --csv and --dicom-root go together", file=sys.stderr)
        return EXIT_CONFIG
    try:
        manifest = ModelManifest.from_file(args.model / MANIFEST_NAME)
        if args.csv is not None:
            rows = expectations.site_rows(args.csv, args.dicom_root)
            source = f"{len(rows)} studies listed in {args.csv.name}"
        else:
            kind = str(manifest.training.get("kind", ""))
            seed = int(manifest.training.get("seed", 0)) if args.seed is None else args.seed
            rows = expectations.synthetic_rows(kind, seed, args.studies)
            source = f"{len(rows)} studies of the synthetic training generator, seed {seed}"
        expects = expectations.record(rows, source)
    except _model_errors() + (ValueError,) as exc:
        return _refused(exc)
    expectations.write_expectations(args.model, expects)
    print(f"{args.model}: a series outside these ranges is not analysed ({source})")
    if expects.planes:
        print(f"  {'planes':<22}{', '.join(expects.planes)}")
    for key in ("field_of_view", "p01", "p50", "p99", "noise"):
        r = getattr(expects, key)
        if r is not None:
            print(f"  {key:<22}{r.low:g} to {r.high:g}")
    return 0


def _cmd_model_drift(config: Config, args: argparse.Namespace) -> int:
    from daemon.factories import open_database
    from daemon.stages.monitor.watch import Monitor

    db = open_database(config, signed=False)
    try:
        monitor = Monitor(db, config.monitoring)
        report = monitor.report(args.name, args.version)
        known = monitor.known_versions()
    finally:
        db.dispose()
    if report is None:
        names = ", ".join(f"{m} {v}" for m, v in known) or "none yet"
        print(f"secondreader: no observations of model {args.name} {args.version} "
              f"(models with observations: {names})", file=sys.stderr)  # fmt: skip
        return 1
    for line in drift_lines(report, config.monitoring.min_baseline_runs):
        print(line)
    return 0


def drift_lines(report: DriftReport, min_baseline_runs: int) -> list[str]:
    """The baseline, each period with its alerting variables, and the new scanner values."""
    day = "%Y-%m-%d"
    lines = [f"model {report.model} {report.version}: baseline "
             f"{report.baseline_start:{day}} to {report.baseline_end:{day}}, "
             f"{report.baseline_n} run(s)"]  # fmt: skip
    if not report.ready:
        lines.append(f"  no comparison yet: the baseline needs its whole period and at least "
                     f"{min_baseline_runs} runs")  # fmt: skip
    for p in report.periods:
        span = f"{p.start:{day}} to {p.end:{day}}  {p.n:>5} runs  "
        if not p.enough:
            lines.append(f"{span}too few to say")
        elif not p.alerting:
            lines.append(f"{span}no drift")
        else:
            shown = [f"{v.variable} ({v.test}, PSI {v.psi:.2f}, p {v.p_value:.2g})"
                     for v in p.variables if v.alert]  # fmt: skip
            lines.append(f"{span}DRIFT: {', '.join(shown)}")
    for new in report.new_values:
        lines.append(f"new {new.variable.replace('_', ' ')} {new.value!r}, first seen "
                     f"{new.first_seen:%Y-%m-%d %H:%M}")  # fmt: skip
    return lines


def _cmd_demo(_config: Config, args: argparse.Namespace) -> int:
    from model.applications import APPLICATIONS

    if args.slices is not None and args.kind != "ct-chest":
        print("secondreader: --slices is for --kind ct-chest", file=sys.stderr)
        return EXIT_CONFIG
    if args.kind == "ct-chest" and args.slices is not None:
        from dicom_io.synthetic import write_ct_series
        from model.phantom import phantom_volume

        volume, centre = phantom_volume(
            args.seed, n_slices=args.slices, rows=256, cols=256, lesion=args.lesion
        )
        paths = write_ct_series(
            volume,
            args.output,
            spacing=(2.5, 1.4, 1.4),
            series_description="Synthetic chest CT" + (" (nodule)" if args.lesion else ""),
            seed=args.seed,
        )
        where = f", nodule centred at slice {centre[0] + 1}" if centre else ", no nodule"
        print(f"wrote {len(paths)} CT slices to {args.output}{where}")
        return 0
    print(APPLICATIONS[args.kind].demo(args.output, args.seed, args.lesion))
    return 0


def add_model(sub: Subparsers) -> None:
    p = sub.add_parser("model", help="train, evaluate and govern models, and watch their drift")
    msub = p.add_subparsers(dest="model_command", required=True)
    q = msub.add_parser("train", help="rebuild a built-in model from its seed, or train the "
                        "slice classifier on a site's studies; writes a model folder")  # fmt: skip
    q.add_argument("kind", choices=_kinds(), help="the application (as `demo --kind`)")
    q.add_argument("output", type=Path, help="model folder to write")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--epochs", type=int, help="maximum epochs (slice classifiers; default: "
                   "per kind)")  # fmt: skip
    q.add_argument("--n-train", type=int, help="synthetic training slices (slice classifiers; "
                   "default 2400)")  # fmt: skip
    q.add_argument("--csv", type=Path, help="site data: CSV of study_uid,label")
    q.add_argument("--dicom-root", type=Path, help="site data: folder of the CSV's studies")
    q.add_argument("--device", default="auto")
    q.add_argument("--name", help="model name in the manifest")
    q.add_argument("--version", default="1.0.0")
    q.set_defaults(func=_cmd_model_train)
    q = msub.add_parser("evaluate", help="AUC, sensitivity, specificity, calibration (ECE, "
                        "Brier) on the test set")  # fmt: skip
    q.add_argument("model", type=Path, nargs="?", help="model folder (default: built-in)")
    q.add_argument("--seed", type=int, help="synthetic test set seed (default: the manifest's)")
    q.add_argument("--csv", type=Path)
    q.add_argument("--dicom-root", type=Path)
    q.add_argument("--device", default="auto")
    q.set_defaults(func=_cmd_model_evaluate)
    q = msub.add_parser("export-onnx", help="write a built-in-architecture model as ONNX, "
                        "with its class-activation map")
    q.add_argument("model", type=Path, help="model folder (state_dict)")
    q.add_argument("output", type=Path, help="ONNX model folder to write")
    q.add_argument("--version", help="version of the new folder (default: the same)")
    q.set_defaults(func=_cmd_model_export_onnx)
    q = msub.add_parser("import-onnx", help="make a model folder from an ONNX file and a "
                        "manifest TOML")
    q.add_argument("file", type=Path, help="the .onnx file")
    q.add_argument("--manifest", type=Path, required=True, help="manifest TOML (see README)")
    q.add_argument("--into", type=Path, help="folder to write (default: "
                   "<state_dir>/models/<name>-<version>)")
    q.set_defaults(func=_cmd_model_import_onnx)
    q = msub.add_parser("import-bundle", help="make a model folder from a MONAI bundle (folder "
                        "or zip) without executing its config")
    q.add_argument("bundle", type=Path, help="the bundle folder or .zip")
    q.add_argument("--manifest", type=Path, required=True, help="TOML with the labels' SNOMED CT "
                   "codes, applies_to, threshold, intended_use (see README)")
    q.add_argument("--into", type=Path, help="folder to write (default: "
                   "<state_dir>/models/<name>-<version>)")
    q.set_defaults(func=_cmd_model_import_bundle)
    q = msub.add_parser("check", help="load a model folder, run it on a synthetic input, and "
                        "print its shapes, time and codes")
    q.add_argument("model", type=Path, help="model folder")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=_cmd_model_check)
    q = msub.add_parser("expectations", help="record what a model was made for (plane, field "
                        "of view, intensities, noise): a series outside it is not analysed")
    q.add_argument("model", type=Path, help="model folder (its manifest is rewritten)")
    q.add_argument("--studies", type=int, default=200, help="synthetic studies (default 200)")
    q.add_argument("--seed", type=int, help="synthetic seed (default: the training seed)")
    q.add_argument("--csv", type=Path, help="site data: the training CSV of study_uid,label")
    q.add_argument("--dicom-root", type=Path)
    q.set_defaults(func=_cmd_model_expectations)
    q = msub.add_parser("calibrate", help="fit a model folder's Platt scaling again, on "
                        "validation data: same decisions, calibrated probabilities")  # fmt: skip
    q.add_argument("folder", type=Path, help="model folder (its manifest is rewritten)")
    q.add_argument("--n-val-studies", type=int, help="synthetic validation series (CT) or "
                   "images (CR) (default: as many as in training)")  # fmt: skip
    q.add_argument("--seed", type=int, help="data seed (default: the manifest's)")
    q.add_argument("--csv", type=Path, help="site data: CSV of study_uid,label")
    q.add_argument("--dicom-root", type=Path, help="site data: folder of the CSV's studies")
    q.add_argument("--version", help="new version (default: the next minor, 1.0.0 -> 1.1.0)")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=_cmd_model_calibrate)
    q = msub.add_parser("drift", help="a model version's inputs and outputs, week by week, "
                        "against its baseline: drift alerts and new scanners")  # fmt: skip
    q.add_argument("name", help="model name (as in its manifest)")
    q.add_argument("version", help="model version")
    q.set_defaults(func=_cmd_model_drift)
    _add_governance(msub)


def _governance(config: Config) -> GovernanceService:
    from daemon.factories import open_database

    return GovernanceService(open_database(config), config)


def _cmd_model_modes(config: Config, _args: argparse.Namespace) -> int:
    versions = _governance(config).versions()
    if not versions:
        print("no model version has analysed a study yet")
    for v in versions:
        default = "" if v.mode_set else " (default)"
        print(f"{v.model_name} {v.model_version}: {v.mode}{default}, {v.runs} runs"
              + (f", {v.withheld} silent" if v.withheld else ""))  # fmt: skip
    return 0


def _cmd_model_mode(config: Config, args: argparse.Namespace) -> int:
    service = _governance(config)
    try:
        change = service.set_mode(args.name, args.version, args.mode,
                                  by=service.admin(args.by), reason=args.reason)  # fmt: skip
    except GovernanceError as exc:
        print(f"secondreader: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{change.model_name} {change.model_version}: {change.mode} from its next result on")
    return 0


def _cmd_model_monitor(config: Config, args: argparse.Namespace) -> int:
    from daemon.stages.monitor.report import pdf, report_lines

    try:
        report = _governance(config).report(args.name, args.version, since=args.since,
                                            until=args.until)  # fmt: skip
    except GovernanceError as exc:
        print(f"secondreader: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print("\n".join(report_lines(report)))
    if args.pdf is not None:
        args.pdf.write_bytes(pdf(report))
        print(f"report written to {args.pdf}")
    return 0


def _cmd_model_export(config: Config, args: argparse.Namespace) -> int:
    import getpass

    from daemon.factories import open_database
    from daemon.stages.monitor.report import export_csv, export_json
    from db.monitoring import record_export, registry_rows

    db = open_database(config)
    with db.session() as s:
        rows = registry_rows(s, since=args.since, until=args.until)
        record_export(s, f"cli:{getpass.getuser()}", fmt=args.format, rows=len(rows))
    body = export_csv(rows) if args.format == "csv" else export_json(rows)
    if args.output is None:
        sys.stdout.write(body)
    else:
        args.output.write_text(body)
        print(f"{len(rows)} rows written to {args.output}")
    return 0


def _date(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _add_governance(msub: Any) -> None:
    q = msub.add_parser("modes", help="each model version's mode (silent, review-only, live)")
    q.set_defaults(func=_cmd_model_modes)
    q = msub.add_parser("mode", help="promote or demote a model version, with a reason")
    q.add_argument("name", help="the model's name (`model modes`)")
    q.add_argument("version")
    q.add_argument("mode", choices=list(MODES))
    q.add_argument("--reason", required=True, help="why: it goes into the audit trail")
    q.add_argument("--by", required=True, help="your user name (an enabled admin account)")
    q.set_defaults(func=_cmd_model_mode)
    q = msub.add_parser("monitor", help="a model version's monitoring report")
    q.add_argument("name")
    q.add_argument("version")
    q.add_argument("--since", type=_date, help="from this date (YYYY-MM-DD)")
    q.add_argument("--until", type=_date, help="before this date")
    q.add_argument("--pdf", type=Path, help="also write the report as a PDF")
    q.set_defaults(func=_cmd_model_monitor)
    q = msub.add_parser("export", help="registry export (ACR Assess-AI), no names or IDs")
    q.add_argument("--format", choices=["csv", "json"], default="csv")
    q.add_argument("--output", type=Path, help="file to write (default: standard output)")
    q.add_argument("--since", type=_date)
    q.add_argument("--until", type=_date)
    q.set_defaults(func=_cmd_model_export)


def _kinds() -> list[str]:
    from model.applications import APPLICATIONS

    return list(APPLICATIONS)


def add_demo(sub: Subparsers) -> None:
    from model.applications import APPLICATIONS

    p = sub.add_parser("demo", help="write a synthetic study to try the pipeline")
    p.add_argument("output", type=Path, help="folder to write the DICOM files to")
    p.add_argument("--kind", choices=_kinds(), default="ct-chest",
                   help="; ".join(f"{a.kind}: {a.study}" for a in APPLICATIONS.values())
                   + " (default ct-chest)")  # fmt: skip
    p.add_argument("--lesion", action=argparse.BooleanOptionalAction, default=True,
                   help="with a lung nodule (default), or --no-lesion without")  # fmt: skip
    p.add_argument("--slices", type=int, help="ct-chest: number of axial slices (default 40)")
    p.add_argument("--seed", type=int, default=15,
                   help="phantom seed: another seed, another anatomy (default 15)")  # fmt: skip
    p.set_defaults(func=_cmd_demo)
