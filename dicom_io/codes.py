"""Coded concepts shared by the SR and SEG builders.

Standard codes where the standard has one (SCT, DCM, UCUM); the few concepts
the standard lacks (an AI run that did not happen) use the private scheme
99SECONDREADER, which every object using it declares in its Coding Scheme
Identification Sequence.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from model.results import CodedConcept

# IHE AI Results (AIR): purpose of reference of the algorithm's item in the
# Contributing Equipment Sequence (the code IHE assigned before DICOM had one).
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")

# The NUM measurement of each finding. DCM 122157 is the plain "Probability";
# DCM 111047 "Probability of cancer" would be wrong for most findings.
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
# The probability is stated in percent (UCUM "%"): viewers print the value
# with the unit's code, and "97.31 %" reads as what it is where "0.97 1"
# (UCUM "1", no units) does not. `dicom_io.sr.read_findings` reads either.
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")

PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
COMMENT = codes.DCM.Comment  # 121106
SUMMARY = codes.DCM.Summary  # 121111

# Segmented Property Category of the saliency SEG when the caller gives none
# (CID 7150): what a finding like a nodule or an opacity is.
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure

PRIVATE_SCHEME = "99SECONDREADER"
PRIVATE_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="secondreader local codes",
    responsible_organization="secondreader",
)
IHE_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator="99IHE",
    name="IHE Radiology codes",
    responsible_organization="IHE",
)

# Title of the SR written when no AI result exists: a viewer shows the code
# meaning as the document title, so it must say plainly what happened.
AI_NOT_PERFORMED = hd.sr.CodedConcept("AI-NOT-RUN", PRIVATE_SCHEME, "AI analysis not performed")
AI_OUTCOME = hd.sr.CodedConcept("AI-OUTCOME", PRIVATE_SCHEME, "AI analysis outcome")
OUTCOME_NOT_APPLICABLE = hd.sr.CodedConcept(
    "NOT-APPLICABLE", PRIVATE_SCHEME, "No AI model applies to this study"
)
OUTCOME_FAILED = hd.sr.CodedConcept(
    "FAILED", PRIVATE_SCHEME, "The AI analysis of this study failed"
)
OUTCOME_FAILED_QC = hd.sr.CodedConcept(
    "FAILED-QC", PRIVATE_SCHEME, "Images failed the AI input quality checks"
)

# Procedure Reported (TID 1500 row 4 takes its value from CID 100, "Quantitative
# Diagnostic Imaging Procedure"). The daemon knows the modality, not the
# ordered procedure, so the modality-level entries of CID 100; a modality
# CID 100 has none for gets its generic "Imaging procedure". (The SNOMED CT
# "Computed Tomography" we wrote before is not in CID 100: PixelMed's
# DicomSRValidator reported it as an error.) Radiographs (CR, DX, MG) get
# "Imaging procedure" too: LOINC's "XR unspecified body region" is not in the
# CID 100 that validators in the field carry (PixelMed's, 2019), and an SR a
# PACS's validator refuses helps nobody.
_PROCEDURE_BY_MODALITY: dict[str, hd.sr.CodedConcept] = {
    "CT": hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": hd.sr.CodedConcept("44136-0", "LN", "PET unspecified body region"),
    "NM": hd.sr.CodedConcept("49118-3", "LN", "NM unspecified body region"),
}
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")

# View Code Sequence values (CID 4014 mammography, CID 4010 radiography) by the
# short name View Position uses: what the synthetic images write and what the
# analysis reads back when a header names its view by code only.
VIEW_CODES = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
    "ML": ("399260004", "medial-lateral"),
    "LM": ("399352003", "lateral-medial"),
    "PA": ("399348003", "postero-anterior"),
    "AP": ("399232001", "antero-posterior"),
    "LL": ("260461000", "lateral"),
}

# CID 244 Laterality, for the finding site of a finding on one side.
# A segmented region's measurements (TID 1411, CID 7469/7470): its volume, its
# longest diameter in an axial plane (RECIST's long axis), and the CT numbers
# over it, as Attenuation Coefficient with a Mean or Maximum derivation.
VOLUME = codes.SCT.Volume  # 118565006
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
LONG_AXIS = hd.sr.CodedConcept("103339001", "SCT", "Long Axis")
ATTENUATION_COEFFICIENT = hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit  # [hnsf'U]
MEAN = codes.SCT.Mean  # 373098007
MAXIMUM = codes.SCT.Maximum  # 56851009

LATERALITY = {
    "L": hd.sr.CodedConcept("7771000", "SCT", "Left"),
    "R": hd.sr.CodedConcept("24028007", "SCT", "Right"),
}


def procedure_for_modality(modality: str) -> hd.sr.CodedConcept:
    """The Procedure Reported code for a study of this modality."""
    return _PROCEDURE_BY_MODALITY.get(modality.upper(), IMAGING_PROCEDURE)


def to_hd(concept: CodedConcept) -> hd.sr.CodedConcept:
    """The result contract's code as a highdicom coded concept."""
    return hd.sr.CodedConcept(concept.value, concept.scheme_designator, concept.meaning)
