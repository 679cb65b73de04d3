"""The DICOM node: instances in (C-STORE, STOW-RS), studies through the core, result objects out via the
outbox, every step in the audit log.

One node per service process, on the service's Predictor, so DICOM and HTTP traffic share one admission and
one set of models. `receive()` is the one entry for both doors. On stop, the SCP stops listening first, then
every waiting study is answered and put in the outbox (nothing acknowledged is dropped), then the delivery
loop stops; what it did not deliver is sent after the next start. With a spool (`dicom_node.spool`), what a
crash interrupted is taken back at the next start: instances received and not yet answered, from disk.

Two things are taken without analysis or refused before anything is kept. The node's own result objects
(`dicom_node.scope.own_result`), routed back to it by a PACS or by a destination that is the node itself, are
answered 'stored' and analysed no further (else each answer makes results of results, for ever); the audit
says `own_result`. An instance of another patient than the first one seen for its Study Instance UID is
refused (0xC000, `dicom_node.studies.StudyCollector.claim_patient`): the sender hears of the mix-up, the
audit records it, and no answer ever names two patients' instances.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from dicom_node.analysis import StudyAnalyser, StudyOutcome
from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.destination import Destination
from dicom_node.events import NodeEvents
from dicom_node.object_builder import ObjectBuilder
from dicom_node.outbox import Outbox
from dicom_node.receiving import Withheld
from dicom_node.room import Room
from dicom_node.scope import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    not_analysed,
    own_result,
    transfer_syntax_refusal,
)
from dicom_node.scp import StorageSCP
from dicom_node.sender import DeliveryLoop
from dicom_node.spool import Spool, SpooledInstance
from dicom_node.studies import Door, ReceivedInstance, ReceivedStudy, StudyCollector, patient_key
from dicom_node.tls import client_context, server_context
from inference.dicom_header import DicomError, brief
from inference.errors import ImageError
from inference.predictor import Predictor

log = logging.getLogger(__name__)

PUT_RETRY_MAX_S = 30.0
SHUTDOWN_PUT_S = 30.0
# 'cannot understand': a Study Instance UID whose instances name two patients is a mix-up the sender must see
ANOTHER_PATIENT = CANNOT_UNDERSTAND
ANOTHER_PATIENT_REASON = (
    "this Study Instance UID already holds instances of another patient (Patient ID or issuer differs): "
    "not analysed, so one answer never combines two patients"
)


@dataclass(frozen=True, repr=False)
class InstanceKeys:
    """What the door needs of an instance's header: its UIDs, who made it, and whose it is as a `patient_key`
    (no patient data: the key is a keyed hash that never leaves the process)."""

    sop_class: str
    sop_instance: str
    study_uid: str
    syntax: str
    manufacturer: str = ""
    series_number: int | None = None
    patient: str = ""

    @classmethod
    def of(cls, header: Any) -> InstanceKeys:
        meta = getattr(header, "file_meta", None)
        try:  # pydicom converts values lazily: a broken one fails here
            return cls(
                str(header.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "")),
                str(header.get("SOPInstanceUID", "")),
                str(header.get("StudyInstanceUID", "")),
                str(getattr(meta, "TransferSyntaxUID", "")),
                str(header.get("Manufacturer", "") or ""),
                _integer(header.get("SeriesNumber")),
                patient_key(str(header.get("PatientID", "") or ""), str(header.get("IssuerOfPatientID", "") or "")),
            )
        except Exception as error:
            raise DicomError(f"its UIDs cannot be read: {type(error).__name__}: {brief(error)}") from error

    def __repr__(self) -> str:
        return f"InstanceKeys({self.sop_class}, {self.sop_instance}, study {self.study_uid})"


def _integer(value: Any) -> int | None:
    """An IS value as an int; None when absent or not a whole number (a Series Number is compared, never used)."""
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Receipt:
    """The node's answer to one instance: a C-STORE status and, when refused, why (no patient data)."""

    status: int
    sop_class_uid: str
    sop_instance_uid: str
    reason: str | None = None

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


class DicomNode:
    def __init__(
        self, predictor: Predictor, outbox: Outbox, config: NodeConfig, events: NodeEvents | None = None
    ) -> None:
        self.predictor = predictor
        self.outbox = outbox
        self.config = config
        self.events = events or NodeEvents()
        self.destination = Destination.parse(config.destination)
        if config.tls.deliver and self.destination.kind != "dimse":
            raise ValueError("BFD_DICOM_DESTINATION_TLS is for C-STORE destinations; for DICOMweb use an https:// URL")
        # built now, so a certificate that does not load stops the start-up with its reason
        self._tls_in = server_context(config.tls) if config.tls.listen else None
        tls_out = client_context(config.tls) if config.tls.deliver else None
        self.audit = AuditLog(config.audit_log)
        self.builder = ObjectBuilder(config.build_processes, config.uid_root)
        self.analyser = StudyAnalyser(predictor, config.outputs, self.builder)
        self.collector = StudyCollector(
            self._on_study,
            quiet_s=config.quiet_s,
            max_instances=config.study_max_instances,
            held_bytes_budget=config.held_bytes_budget,
            max_wait_s=config.study_max_wait_s,
        )
        self._uid_root = config.uid_root  # the site's: a second sign of the node's own objects
        self.sender = DeliveryLoop(
            outbox,
            self.audit,
            [self.destination],
            calling_ae=config.ae_title,
            timeout_s=config.delivery_timeout_s,
            retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s,
            parallel=config.delivery_associations,
            events=self.events,
            tls=tls_out,
        )
        self.spool = (
            Spool(config.spool_dir, max_instance_bytes=config.max_instance_bytes)
            if config.spool_dir is not None
            else None
        )
        self.room = Room(predictor, self.collector, self.spool, config)
        self._recovery: asyncio.Task[None] | None = None
        self.scp: StorageSCP | None = None
        self.stopping = False

    async def start(self) -> None:
        await asyncio.to_thread(self.builder.start)
        self.sender.start()
        if self.spool is not None:
            left = await asyncio.to_thread(self.spool.left)
            if left:
                self._recovery = asyncio.get_running_loop().create_task(self._recover(left), name="dicom-recovery")
        if self.config.port is not None:
            loop = asyncio.get_running_loop()
            self.scp = StorageSCP(
                self.config, loop, self._receive_dimse, self.room.gate, self._tls_in, self.events.tls_refused
            )
            await asyncio.to_thread(self.scp.start)
        log.info("DICOM node on: results to %s", self.destination.describe())

    async def stop(self) -> None:
        self.stopping = True
        if self.scp is not None:
            await asyncio.to_thread(self.scp.stop)
        if self._recovery is not None:  # what it has not taken back yet stays in the spool for the next start
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        await self.collector.flush()
        await self.sender.stop()
        await asyncio.to_thread(self.builder.close)

    # -- in -----------------------------------------------------------------------------------------------------
    async def _receive_dimse(
        self, incoming: bytes | Withheld, calling_ae: str | None, peer: str | None
    ) -> tuple[int, str | None]:
        if isinstance(incoming, Withheld):  # not kept while it arrived: refused, as the gate said
            receipt = self._refused(
                incoming.status, incoming.sop_class_uid, incoming.sop_instance_uid, incoming.reason, "dimse", calling_ae
            )
            self.events.instance("dimse", receipt.status)
        else:
            receipt = await self.receive(incoming, "dimse", calling_ae=calling_ae, peer=peer)
        return receipt.status, receipt.reason

    async def receive(
        self, data: bytes, door: Door, *, calling_ae: str | None = None, peer: str | None = None
    ) -> Receipt:
        """Take one Part 10 instance for analysis with its study, or say why not (a C-STORE status)."""
        receipt = await self._receive(data, door, calling_ae, peer)
        self.events.instance(door, receipt.status)
        return receipt

    async def _receive(self, data: bytes, door: Door, calling_ae: str | None, peer: str | None) -> Receipt:
        try:  # the core's guards, in a decode slot: a deflate bomb is refused before it inflates, a broken file
            # has a reason, and nothing proportional to the instance's size runs on the event loop
            keys = await self.predictor.decoder.read_header(data, force=door == "dimse", extract=InstanceKeys.of)
        except ImageError as error:
            return Receipt(CANNOT_UNDERSTAND, "", "", f"not a readable DICOM Part 10 instance: {error}")
        sop_class, sop_instance, study_uid, syntax = keys.sop_class, keys.sop_instance, keys.study_uid, keys.syntax
        if not (sop_class and sop_instance and study_uid):
            return Receipt(
                CANNOT_UNDERSTAND, sop_class, sop_instance, "SOP Class, SOP Instance and Study Instance UIDs needed"
            )
        if kind := own_result(sop_class, sop_instance, keys.manufacturer, keys.series_number, self._uid_root):
            return self._own(kind, keys, door, calling_ae, peer)
        if (reason := not_analysed(sop_class)) is not None:
            return self._refused(SOP_CLASS_NOT_SUPPORTED, sop_class, sop_instance, reason, door, calling_ae)
        if (reason := self.room.too_large(len(data))) is not None:
            return self._refused(OUT_OF_RESOURCES, sop_class, sop_instance, reason, door, calling_ae)
        if syntax and (reason := transfer_syntax_refusal(syntax)) is not None:
            return self._refused(CANNOT_UNDERSTAND, sop_class, sop_instance, reason, door, calling_ae)
        if not self.collector.claim_patient(study_uid, keys.patient):  # decided here, before any wait: no race
            return self._another_patient(sop_class, sop_instance, study_uid, door, calling_ae)
        if self.stopping:
            return self._refused(OUT_OF_RESOURCES, sop_class, sop_instance, "shutting down", door, calling_ae)
        if (reason := await self.room.wait(len(data), study_uid, lambda: self.stopping)) is not None:
            return self._refused(OUT_OF_RESOURCES, sop_class, sop_instance, reason, door, calling_ae)
        instance = ReceivedInstance(study_uid, sop_class, sop_instance, data, door, calling_ae, peer)
        if self.spool is not None and (reason := await self._keep(instance)) is not None:
            return self._refused(OUT_OF_RESOURCES, sop_class, sop_instance, reason, door, calling_ae)
        self._take(instance)
        return Receipt(SUCCESS, sop_class, sop_instance)

    def _own(self, kind: str, keys: InstanceKeys, door: Door, calling_ae: str | None, peer: str | None) -> Receipt:
        """One of the node's own result objects came back: 'stored', and nothing more (not kept, not analysed)."""
        self.audit.write(
            "own_result",
            door=door,
            calling_ae=calling_ae,
            peer=peer,
            kind=kind,
            sop_class_uid=keys.sop_class,
            sop_instance_uid=keys.sop_instance,
            study_instance_uid=keys.study_uid,
            reason="a result object this software made: answered 'stored', not analysed again",
        )
        self.events.own_result(door)
        log.debug("%s: own %s result %s came back; not analysed again", door, kind, keys.sop_instance)
        return Receipt(SUCCESS, keys.sop_class, keys.sop_instance)

    def _another_patient(
        self, sop_class: str, sop_instance: str, study_uid: str, door: Door, calling_ae: str | None
    ) -> Receipt:
        log.warning(
            "study %s: instance %s is of another patient than the study's first; refused (the patient is not named)",
            study_uid,
            sop_instance,
        )
        return self._refused(
            ANOTHER_PATIENT, sop_class, sop_instance, ANOTHER_PATIENT_REASON, door, calling_ae, study_uid=study_uid
        )

    def _take(self, instance: ReceivedInstance) -> None:
        self.analyser.begin(instance, self.collector.analysed)  # analysed while the rest of its study arrives
        replaced = self.collector.add(instance)
        if replaced is not None:
            self.analyser.drop(replaced)
            if self.spool is not None:
                self.spool.forget([replaced])

    async def _keep(self, instance: ReceivedInstance) -> str | None:
        """Write the instance to the spool before the sender hears 'stored'; None, or why it could not be."""
        assert self.spool is not None
        with self.room.spooling(len(instance.data)):
            try:
                await asyncio.to_thread(self.spool.keep, instance)
            except OSError as error:
                log.error("spool: an instance could not be kept on disk (%s); refused", error.strerror or error)
                return f"the node cannot keep the instance on disk now ({error.strerror or type(error).__name__})"
        return None

    async def _recover(self, left: list[SpooledInstance]) -> None:
        """Take back what a previous run received and did not answer, as if it had just arrived: the senders
        were told 'stored' long ago, so this waits for room as long as it takes and never refuses."""
        self.audit.write(
            "recovered",
            instances=len(left),
            study_instance_uids=sorted({entry.study_uid for entry in left}),
            sop_instance_uids=[entry.sop_instance_uid for entry in left],
        )
        log.info("DICOM node: %d instance(s) received before a restart are analysed now", len(left))
        self.events.recovered(len(left))
        for entry in left:
            await self.room.wait_without_limit(entry.size, entry.study_uid)
            try:
                instance = await asyncio.to_thread(entry.load)
            except OSError as error:
                log.error("spool: %s could not be read back (%s); left in place", entry.path.name, error)
                continue
            if await self._of_another_patient(instance):
                continue
            self._take(instance)

    async def _of_another_patient(self, instance: ReceivedInstance) -> bool:
        """Whether an instance taken back from the spool is of another patient than its study's (one that arrived
        since the restart came first): then it is refused now, in the audit, and its file goes."""
        try:
            keys = await self.predictor.decoder.read_header(
                instance.data, force=instance.door == "dimse", extract=InstanceKeys.of
            )
        except ImageError:
            return False  # its analysis says why it cannot be read
        if self.collector.claim_patient(instance.study_uid, keys.patient):
            return False
        self._another_patient(
            instance.sop_class_uid, instance.sop_instance_uid, instance.study_uid, instance.door, instance.calling_ae
        )
        assert self.spool is not None
        await asyncio.to_thread(self.spool.forget, [instance])
        return True

    def _refused(
        self,
        status: int,
        sop_class: str,
        sop_instance: str,
        reason: str,
        door: Door,
        calling_ae: str | None,
        *,
        study_uid: str | None = None,
    ) -> Receipt:
        where = {"study_instance_uid": study_uid} if study_uid is not None else {}
        self.audit.write(
            "refused",
            door=door,
            calling_ae=calling_ae,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            **where,
            status=f"{status:#06x}",
            reason=reason,
        )
        return Receipt(status, sop_class, sop_instance, reason)

    # -- through the core and out -------------------------------------------------------------------------------
    async def _on_study(self, study: ReceivedStudy) -> None:
        """Answer the study; its spooled instances go once that is done, unless its results could not be kept
        (then the next start answers it again from the spool)."""
        try:
            kept = await self._answer(study)
        except Exception:
            await self._forget(study)  # a failure of the analysis itself is reported, not retried forever
            raise
        if kept:
            await self._forget(study)

    async def _forget(self, study: ReceivedStudy) -> None:
        if self.spool is not None:
            await asyncio.to_thread(self.spool.forget, list(study.instances.values()))

    async def _answer(self, study: ReceivedStudy) -> bool:
        instances = list(study.instances.values())
        self.audit.write(
            "received",
            study_ref=study.ref,
            study_instance_uid=study.study_uid,
            doors=sorted({i.door for i in instances}),
            calling_aes=sorted({i.calling_ae for i in instances if i.calling_ae}),
            peers=sorted({i.peer for i in instances if i.peer}),
            sop_instance_uids=[i.sop_instance_uid for i in instances],
        )
        outcome = await self.analyser.analyse(study)
        self._audit_answer(study, outcome)
        self.events.answered(len(instances), len(outcome.objects))
        if not outcome.objects:
            return True
        kept = await self._put(study, outcome)
        self.sender.wake()
        return kept

    def _audit_answer(self, study: ReceivedStudy, outcome: StudyOutcome) -> None:
        algorithm = self.analyser.algorithm
        fields: dict[str, Any] = {
            "study_ref": study.ref,
            "study_instance_uid": study.study_uid,
            "model": {
                "name": algorithm.name,
                "version": algorithm.version,
                "sha256": algorithm.sha256,
                "trained": algorithm.trained,
            },
            "thresholds": outcome.thresholds,
            "abstention": {
                "min_router_probability": self.predictor.policy.min_router_probability,
                "max_colourfulness": self.predictor.policy.max_colourfulness,
            },
            "study": outcome.study,
            "images": outcome.images,
            "not_analysed": outcome.refused,
            "produced": [
                {"sop_class_uid": o.sop_class_uid, "sop_instance_uid": o.sop_instance_uid} for o in outcome.objects
            ],
            "destination": self.destination.describe(),
        }
        self.audit.write("answered", **fields)

    async def _put(self, study: ReceivedStudy, outcome: StudyOutcome) -> bool:
        """Into the outbox, waiting out a database outage: these results exist nowhere else. False: given up.

        While running, it waits as long as the outage lasts; on shutdown at most SHUTDOWN_PUT_S, then the
        results are given up, loudly, in the log and the audit (with a spool, the next start makes them again).
        """
        delay = 0.5
        started = asyncio.get_running_loop().time()
        while True:
            try:
                await self.outbox.put(study.ref, self.destination.describe(), outcome.objects)
                return True
            except Exception as error:
                waited = asyncio.get_running_loop().time() - started
                if self.stopping and waited > SHUTDOWN_PUT_S:
                    log.error("study %s: results NOT kept: the outbox stayed unavailable at shutdown", study.ref)
                    self.audit.write(
                        "lost",
                        study_ref=study.ref,
                        study_instance_uid=study.study_uid,
                        sop_instance_uids=[o.sop_instance_uid for o in outcome.objects],
                        reason=f"outbox unavailable at shutdown ({type(error).__name__})",
                        spooled=self.spool is not None,
                    )
                    return False
                log.warning("study %s: results not yet in the outbox (%s); retrying in %g s", study.ref, error, delay)
                await asyncio.sleep(delay)
                delay = min(PUT_RETRY_MAX_S, delay * 2)
