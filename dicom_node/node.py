"""The DICOM node: instances in (C-STORE, STOW-RS), studies through the core, result objects out via the
outbox, every step in the audit log.

One node per service process, on the service's Predictor, so DICOM and HTTP traffic share one admission and
one set of models. `receive()` is the one entry for both doors. On stop, the SCP stops listening first, then
every waiting study is answered and put in the outbox (nothing acknowledged is dropped), then the delivery
loop stops; what it did not deliver is sent after the next start.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from dicom_node.analysis import StudyAnalyser, StudyOutcome
from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.delivery import Destination
from dicom_node.object_builder import ObjectBuilder
from dicom_node.outbox import Outbox
from dicom_node.scope import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    sop_class_refusal,
    transfer_syntax_refusal,
)
from dicom_node.scp import StorageSCP
from dicom_node.sender import DeliveryLoop
from dicom_node.studies import Door, ReceivedInstance, ReceivedStudy, StudyCollector
from inference.batching import BatcherClosedError, QueueFullError
from inference.dicom_header import read_dataset
from inference.errors import ImageError
from inference.predictor import Predictor

log = logging.getLogger(__name__)

PUT_RETRY_MAX_S = 30.0
SHUTDOWN_PUT_S = 30.0
ROOM_WAIT_S = 5.0  # how long an instance's answer may wait for room before 0xA700
ROOM_POLL_S = 0.05


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
    def __init__(self, predictor: Predictor, outbox: Outbox, config: NodeConfig) -> None:
        self.predictor = predictor
        self.outbox = outbox
        self.config = config
        self.destination = Destination.parse(config.destination)
        self.audit = AuditLog(config.audit_log)
        self.builder = ObjectBuilder(config.build_processes)
        self.analyser = StudyAnalyser(predictor, config.outputs, self.builder)
        self.collector = StudyCollector(
            self._on_study,
            quiet_s=config.quiet_s,
            max_instances=config.study_max_instances,
            held_bytes_budget=config.held_bytes_budget,
        )
        self.sender = DeliveryLoop(
            outbox,
            self.audit,
            [self.destination],
            calling_ae=config.ae_title,
            timeout_s=config.delivery_timeout_s,
            retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s,
            parallel=config.delivery_associations,
        )
        self.scp: StorageSCP | None = None
        self.stopping = False

    async def start(self) -> None:
        await asyncio.to_thread(self.builder.start)
        self.sender.start()
        if self.config.port is not None:
            self.scp = StorageSCP(self.config, asyncio.get_running_loop(), self._receive_dimse)
            await asyncio.to_thread(self.scp.start)
        log.info("DICOM node on: results to %s", self.destination.describe())

    async def stop(self) -> None:
        self.stopping = True
        if self.scp is not None:
            await asyncio.to_thread(self.scp.stop)
        await self.collector.flush()
        await self.sender.stop()
        await asyncio.to_thread(self.builder.close)

    # -- in -----------------------------------------------------------------------------------------------------
    async def _receive_dimse(self, data: bytes, calling_ae: str | None, peer: str | None) -> int:
        return (await self.receive(data, "dimse", calling_ae=calling_ae, peer=peer)).status

    async def receive(
        self, data: bytes, door: Door, *, calling_ae: str | None = None, peer: str | None = None
    ) -> Receipt:
        """Take one Part 10 instance for analysis with its study, or say why not (a C-STORE status)."""
        try:  # the core's guards: a deflate bomb is refused before it inflates, a broken file has a reason
            header = read_dataset(
                data,
                force=door == "dimse",
                max_inflated_bytes=self.predictor.config.max_image_decode_bytes,
                stop_before_pixels=True,
            )
            meta = getattr(header, "file_meta", None)
            sop_class = str(header.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
            sop_instance = str(header.get("SOPInstanceUID", ""))
            study_uid = str(header.get("StudyInstanceUID", ""))
            syntax = str(getattr(meta, "TransferSyntaxUID", ""))
        except ImageError as error:
            return Receipt(CANNOT_UNDERSTAND, "", "", f"not a readable DICOM Part 10 instance: {error}")
        if not (sop_class and sop_instance and study_uid):
            return Receipt(
                CANNOT_UNDERSTAND, sop_class, sop_instance, "SOP Class, SOP Instance and Study Instance UIDs needed"
            )
        if (reason := sop_class_refusal(sop_class)) is not None:
            return self._refused(SOP_CLASS_NOT_SUPPORTED, sop_class, sop_instance, reason, door, calling_ae)
        if syntax and (reason := transfer_syntax_refusal(syntax)) is not None:
            return self._refused(CANNOT_UNDERSTAND, sop_class, sop_instance, reason, door, calling_ae)
        if self.stopping:
            return self._refused(OUT_OF_RESOURCES, sop_class, sop_instance, "shutting down", door, calling_ae)
        if (reason := await self._wait_for_room(len(data), study_uid)) is not None:
            return self._refused(OUT_OF_RESOURCES, sop_class, sop_instance, reason, door, calling_ae)
        instance = ReceivedInstance(study_uid, sop_class, sop_instance, data, door, calling_ae, peer)
        self.analyser.begin(instance, self.collector.release)  # analysed while the rest of its study arrives
        replaced = self.collector.add(instance)
        if replaced is not None:
            self.analyser.drop(replaced)
        return Receipt(SUCCESS, sop_class, sop_instance)

    async def _wait_for_room(self, size: int, study_uid: str) -> str | None:
        """None once the core can take an image in time and the held bytes can take `size`; else, after waiting
        up to ROOM_WAIT_S, why not. The wait is back-pressure: the sender has already sent the instance's bytes,
        so holding the answer a little costs less than refusing it and receiving it all again. Meanwhile its
        study is kept open (the quiet time runs from the end of the wait), so it is not answered in two parts."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + ROOM_WAIT_S
        while self._no_room(size, count=False) is not None:
            if self.stopping or loop.time() >= give_up_at:
                return self._no_room(size, count=True)
            self.collector.touch(study_uid)
            await asyncio.sleep(ROOM_POLL_S)
        return None

    def _no_room(self, size: int, *, count: bool) -> str | None:
        try:
            if count:
                self.predictor.check_capacity(1)  # counted in the refusal metrics
            else:
                self.predictor.batcher.check(1)
        except (QueueFullError, BatcherClosedError) as error:
            return str(error)
        if not self.collector.can_hold(size):
            return f"held instances at the node's budget ({self.config.held_bytes_budget} bytes); retry later"
        return None

    def _refused(
        self, status: int, sop_class: str, sop_instance: str, reason: str, door: Door, calling_ae: str | None
    ) -> Receipt:
        self.audit.write(
            "refused",
            door=door,
            calling_ae=calling_ae,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            status=f"{status:#06x}",
            reason=reason,
        )
        return Receipt(status, sop_class, sop_instance, reason)

    # -- through the core and out -------------------------------------------------------------------------------
    async def _on_study(self, study: ReceivedStudy) -> None:
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
        if outcome.objects:
            await self._put(study, outcome)
            self.sender.wake()

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

    async def _put(self, study: ReceivedStudy, outcome: StudyOutcome) -> None:
        """Into the outbox, waiting out a database outage: these results exist nowhere else.

        While running, it waits as long as the outage lasts; on shutdown at most SHUTDOWN_PUT_S, then the
        results are given up, loudly, in the log and the audit (they can be made again from the study).
        """
        delay = 0.5
        started = asyncio.get_running_loop().time()
        while True:
            try:
                await self.outbox.put(study.ref, self.destination.describe(), outcome.objects)
                return
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
                    )
                    return
                log.warning("study %s: results not yet in the outbox (%s); retrying in %g s", study.ref, error, delay)
                await asyncio.sleep(delay)
                delay = min(PUT_RETRY_MAX_S, delay * 2)
