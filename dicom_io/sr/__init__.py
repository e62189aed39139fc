"""The AI result as DICOM Structured Reports the PACS stores and viewers show.

Three documents, all Comprehensive 3D SR in the study of their images, each in
a new series:

* `build_ai_result_sr`: TID 1500 Measurement Report, one measurement group per
  finding, marked PRELIMINARY / UNVERIFIED (the radiologist has not seen it);
* `build_not_run_sr`: says the AI did not analyse the study and why, so that a
  missing result never reads as "no finding";
* `build_verified_sr`: the physician's review of an AI SR, VERIFIED and FINAL,
  with the AI SR as predecessor.

`read_findings` reads the findings back (tests, Orthanc round trips, review).
"""

from dicom_io.sr.ai_result import build_ai_result_sr
from dicom_io.sr.content import (
    AI_NOT_RUN_SERIES_DESCRIPTION,
    AI_RESULT_SERIES_DESCRIPTION,
    SOFTWARE_VERSION,
    VERIFIED_SERIES_DESCRIPTION,
    algorithm_equipment,
    finding_tracking_uid,
)
from dicom_io.sr.not_run import build_not_run_sr
from dicom_io.sr.reading import SRFinding, read_findings
from dicom_io.sr.verified import ReviewDecision, build_verified_sr

__all__ = [
    "AI_NOT_RUN_SERIES_DESCRIPTION",
    "AI_RESULT_SERIES_DESCRIPTION",
    "SOFTWARE_VERSION",
    "VERIFIED_SERIES_DESCRIPTION",
    "ReviewDecision",
    "SRFinding",
    "algorithm_equipment",
    "build_ai_result_sr",
    "build_not_run_sr",
    "build_verified_sr",
    "finding_tracking_uid",
    "read_findings",
]
