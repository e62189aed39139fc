"""Performed procedure steps in the database: record N-CREATE / N-SET, find waiting studies."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import PerformedProcedureStep, utcnow
from dicom_io import mpps


def record_message(
    session: Session, message: mpps.ProcedureStepMessage, now: datetime | None = None
) -> int:
    """Apply an N-CREATE or N-SET; returns the DIMSE status for the modality."""
    now = now or utcnow()
    step = session.scalars(
        select(PerformedProcedureStep).where(
            PerformedProcedureStep.sop_instance_uid == message.sop_instance_uid
        )
    ).one_or_none()
    if message.kind == "create":
        if step is not None:
            return mpps.DUPLICATE_SOP_INSTANCE
        step = PerformedProcedureStep(
            sop_instance_uid=message.sop_instance_uid,
            study_instance_uid=message.study_instance_uid,
            status=message.status or mpps.IN_PROGRESS,
            instance_uids=message.instance_uids or [],
            calling_ae=message.calling_ae,
            created_at=now,
            updated_at=now,
        )
        session.add(step)
    else:
        if step is None:
            return mpps.NO_SUCH_SOP_INSTANCE
        if step.status in mpps.FINAL:
            return mpps.NO_LONGER_UPDATABLE
        if message.status is not None:
            step.status = message.status
        if message.instance_uids is not None:
            step.instance_uids = message.instance_uids
        if message.study_instance_uid is not None:
            step.study_instance_uid = message.study_instance_uid
        step.updated_at = now
    audit.record(
        session,
        EventType.MPPS_UPDATED,
        message.calling_ae,
        study_instance_uid=step.study_instance_uid,
        sop_instance_uid=message.sop_instance_uid,
        message=message.kind,
        status=step.status,
        instances=len(step.instance_uids),
    )
    return mpps.SUCCESS


def waiting_studies(session: Session) -> set[str]:
    """Studies a COMPLETED step has not completed yet: an arriving instance may finish them."""
    return set(
        session.scalars(
            select(PerformedProcedureStep.study_instance_uid).where(
                PerformedProcedureStep.status == mpps.COMPLETED,
                PerformedProcedureStep.used_at.is_(None),
                PerformedProcedureStep.study_instance_uid.is_not(None),
            )
        )
    )
