"""The applications the product is for, each with its demonstration study and its model.

One entry per kind of study (`secondreader demo --kind KIND OUT`,
`secondreader model train KIND OUT`): how to write a synthetic study of that
kind as DICOM, and how to rebuild its built-in model from nothing but a seed.
Each model is a demonstration, trained on phantoms, "not for clinical use";
each records in its manifest's `[evaluation]` what it is worth on a shifted
generator's studies (`model.evaluation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.manifest import ModelManifest

# (output folder, seed, with a lesion) -> one line saying what was written.
DemoWriter = Callable[[Path, int, bool], str]
# (output model folder, seed) -> the manifest written there.
Trainer = Callable[[Path, int], ModelManifest]


@dataclass(frozen=True)
class Application:
    kind: str  # the command line's name: "ct-chest"
    study: str  # what a demo study is, in words: "chest CT, 40 axial slices"
    builtin: str  # the model's folder under model/builtin
    demo: DemoWriter
    train: Trainer


def _demo_ct_chest(out: Path, seed: int, lesion: bool) -> str:
    from dicom_io.synthetic import write_ct_series
    from model.phantom import phantom_volume

    volume, centre = phantom_volume(seed, n_slices=40, rows=256, cols=256, lesion=lesion)
    paths = write_ct_series(volume, out, spacing=(2.5, 1.4, 1.4), seed=seed,
                            series_description="Synthetic chest CT" + (" (nodule)" if lesion
                                                                       else ""))  # fmt: skip
    where = f", nodule centred at slice {centre[0] + 1}" if centre else ", no nodule"
    return f"wrote {len(paths)} CT slices to {out}{where}"


def _demo_cr_chest(out: Path, seed: int, lesion: bool) -> str:
    from pydicom.uid import generate_uid

    from dicom_io.synthetic import write_projection
    from model.phantom import phantom_radiograph

    image, centre = phantom_radiograph(seed, rows=256, cols=256, lesion=lesion)
    out.mkdir(parents=True, exist_ok=True)
    write_projection(image, out / "CR1.dcm", modality="CR", view="PA", spacing=(1.7, 1.7),
                     study_uid=generate_uid(), series_uid=generate_uid())  # fmt: skip
    where = f", nodule at row {centre[0]}, column {centre[1]}" if centre else ", no nodule"
    return f"wrote a PA chest radiograph to {out / 'CR1.dcm'}{where}"


def _train_slice_classifier(kind: str) -> Trainer:
    def train_it(out: Path, seed: int) -> ModelManifest:
        from model.manifest import MANIFEST_NAME
        from model.train import train

        train(out, kind="ct" if kind == "ct-chest" else "cr", seed=seed)
        return ModelManifest.from_file(out / MANIFEST_NAME)

    return train_it


APPLICATIONS: dict[str, Application] = {
    a.kind: a
    for a in (
        Application("ct-chest", "chest CT, 40 axial slices", "ct-nodule", _demo_ct_chest,
                    _train_slice_classifier("ct-chest")),  # fmt: skip
        Application("cr-chest", "PA chest radiograph", "cr-nodule", _demo_cr_chest,
                    _train_slice_classifier("cr-chest")),  # fmt: skip
    )
}
