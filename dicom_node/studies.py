"""Instances grouped into studies: a study is answered once it has been quiet, or once it is big enough.

PACS send a study as a stream of C-STORE requests (or STOW-RS parts) with no "end of study" marker, so the
node waits until no new instance of that Study Instance UID arrived for `quiet_s`, or until it holds
`max_instances` (the rest of the study then starts a new group and gets its own results). The same SOP
Instance UID sent twice while its study waits is kept once. Bytes held are counted, so the door can refuse
('out of resources') before memory runs out: an instance's received bytes until it has been analysed (the
node analyses each instance as it arrives), then what its analysis keeps for its study's answer (the overlay,
the model input: about a megabyte, `analysed`) until the study is answered. So studies kept open by a long
quiet time cannot hold more than the budget either.

A study is answered at the latest `max_wait_s` after its first instance, however often its instances keep
coming: a sender re-sending one instance (38 times in 20 s, seen) kept it open for ever, never answered.
One answer is about one patient: the first patient seen for a Study Instance UID is that study's
(`claim_patient`), remembered for the last PATIENTS_REMEMBERED studies, and the door refuses instances of
any other (a mis-merged or spoofed study). Patients are compared by a keyed hash of their ID and its issuer
(`patient_key`), whose key never leaves this process: nothing here can name a patient.
Everything here runs on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

Door = Literal["dimse", "stow-rs"]

MIN_MAX_WAIT_S = 60.0  # the default longest wait of a study: 4 quiet times, and at least this
PATIENTS_REMEMBERED = 4096  # studies whose patient is remembered (about 250 bytes each)
_PATIENT_KEY = secrets.token_bytes(32)  # this process's alone: a patient key means nothing outside it


def patient_key(patient_id: str, issuer: str) -> str:
    """Who an instance is about, comparable and unreadable: a keyed hash (HMAC-SHA256) of the Patient ID and
    the Issuer of Patient ID. Never written anywhere: it stays in this process's memory."""
    text = f"{issuer}\x00{patient_id}".encode("utf-8", "surrogatepass")
    return hmac.new(_PATIENT_KEY, text, hashlib.sha256).hexdigest()


def default_max_wait_s(quiet_s: float) -> float:
    """The longest a study waits from its first instance, when not set: four quiet times, at least a minute."""
    return max(MIN_MAX_WAIT_S, 4 * quiet_s)


@dataclass(eq=False)  # identity: `data` is let go (emptied) once the instance has been analysed
class ReceivedInstance:
    """One instance as it arrived (Part 10 bytes), with where it came from; no patient data outside `data`."""

    study_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes
    door: Door
    calling_ae: str | None = None
    peer: str | None = None
    spool_key: str | None = None  # its copy on disk until its study is answered (dicom_node.spool), if kept


@dataclass
class ReceivedStudy:
    """A group of one study's instances, answered together. `ref` names it in the audit and the outbox."""

    study_uid: str
    instances: dict[str, ReceivedInstance] = field(default_factory=dict)  # by SOP Instance UID
    ref: str = field(default_factory=lambda: uuid.uuid4().hex)
    opened_at: float = 0.0  # the event loop's time at its first instance: answered by `max_wait_s` after it


OnStudy = Callable[[ReceivedStudy], Awaitable[None]]


class StudyCollector:
    """Groups instances by study and hands each group to `on_study` when it is quiet, full or has waited
    `max_wait_s` (None: `default_max_wait_s(quiet_s)`)."""

    def __init__(
        self,
        on_study: OnStudy,
        *,
        quiet_s: float,
        max_instances: int,
        held_bytes_budget: int,
        max_wait_s: float | None = None,
    ) -> None:
        if quiet_s < 0 or max_instances < 1 or held_bytes_budget < 1:
            raise ValueError("quiet_s >= 0, max_instances >= 1 and held_bytes_budget >= 1 are needed")
        max_wait_s = default_max_wait_s(quiet_s) if max_wait_s is None else max_wait_s
        if max_wait_s < quiet_s:
            raise ValueError(
                f"a study's longest wait (max_wait_s, {max_wait_s:g} s) must be at least its quiet time "
                f"(quiet_s, {quiet_s:g} s), got less"
            )
        self.on_study = on_study
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self.max_instances = max_instances
        self.held_bytes_budget = held_bytes_budget
        self._open: dict[str, ReceivedStudy] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._held = 0
        self._charged: dict[ReceivedInstance, int] = {}  # what each held instance counts for, by identity
        self._patients: OrderedDict[str, str] = OrderedDict()  # Study Instance UID -> its patient's key, LRU

    @property
    def held_bytes(self) -> int:
        """Bytes held for instances whose study is not answered yet: received bytes until analysed, then what
        the analysis keeps (`analysed`)."""
        return self._held

    @property
    def waiting_studies(self) -> int:
        return len(self._open)

    def can_hold(self, size: int) -> bool:
        return self._held + size <= self.held_bytes_budget

    def add(self, instance: ReceivedInstance) -> ReceivedInstance | None:
        """Take one instance (the door checked `can_hold` first); it is answered with its study. Returns the
        instance it replaced (the same SOP Instance UID sent again while its study waits), if any."""
        study = self._open.get(instance.study_uid)
        if study is None:
            opened_at = asyncio.get_running_loop().time()
            study = self._open[instance.study_uid] = ReceivedStudy(instance.study_uid, opened_at=opened_at)
        previous = study.instances.get(instance.sop_instance_uid)
        if previous is not None:
            self.release(previous)
        study.instances[instance.sop_instance_uid] = instance
        self._charge(instance, len(instance.data))
        if len(study.instances) >= self.max_instances:
            self._close(instance.study_uid)
        else:
            self._rearm(instance.study_uid)
        return previous

    def analysed(self, instance: ReceivedInstance, kept_bytes: int) -> None:
        """The instance has been analysed: its received bytes go, and `kept_bytes` (what its analysis keeps until
        its study is answered) count instead. Nothing once its study was answered or it was replaced."""
        instance.data = b""
        if instance in self._charged:
            self._charge(instance, kept_bytes)

    def release(self, instance: ReceivedInstance) -> None:
        """The instance was replaced, or its study answered: nothing of it is held any more. Idempotent: what it
        counted for is counted off once."""
        self._held -= self._charged.pop(instance, 0)
        instance.data = b""

    def _charge(self, instance: ReceivedInstance, size: int) -> None:
        self._held += size - self._charged.get(instance, 0)
        self._charged[instance] = size

    def touch(self, study_uid: str) -> None:
        """An instance of this study is on its way (e.g. waiting for room): its study is not quiet yet, so the
        quiet time starts again. Without this, a sender held back by the budget split its study in two."""
        if study_uid in self._open:
            self._rearm(study_uid)

    def claim_patient(self, study_uid: str, patient: str) -> bool:
        """Whether an instance of `patient` (a `patient_key`) may join this study: yes for the first patient seen
        for the Study Instance UID, which becomes the study's, and for that patient again; no for any other.
        The door asks before it takes an instance, so one answer never combines two patients' instances."""
        known = self._patients.get(study_uid)
        if known is None:
            self._patients[study_uid] = patient
            if len(self._patients) > PATIENTS_REMEMBERED:
                self._patients.popitem(last=False)
            return True
        self._patients.move_to_end(study_uid)
        return hmac.compare_digest(known, patient)

    def _rearm(self, study_uid: str) -> None:
        """The study closes after the quiet time from now, but never later than `max_wait_s` after its first
        instance: duplicates and instances waiting for room cannot keep it open for ever."""
        timer = self._timers.pop(study_uid, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        when = min(loop.time() + self.quiet_s, self._open[study_uid].opened_at + self.max_wait_s)
        self._timers[study_uid] = loop.call_at(when, self._close, study_uid)

    def _close(self, study_uid: str) -> None:
        timer = self._timers.pop(study_uid, None)
        if timer is not None:
            timer.cancel()
        study = self._open.pop(study_uid, None)
        if study is None:
            return
        task = asyncio.get_running_loop().create_task(self._answer(study), name=f"study-{study.ref}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _answer(self, study: ReceivedStudy) -> None:
        try:
            await self.on_study(study)
        except Exception:  # the handler reports its own failures; this only keeps the collector alive
            log.exception("study %s: analysis failed", study.ref)
        finally:
            for instance in study.instances.values():
                self.release(instance)

    async def flush(self) -> None:
        """Answer every waiting study now and wait for all analyses (shutdown: nothing received is dropped)."""
        for study_uid in list(self._open):
            self._close(study_uid)
        await self.drain()

    async def drain(self) -> None:
        """Wait until every study handed over so far has been answered."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
