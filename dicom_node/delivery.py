"""Delivery of result objects to the destination PACS: one C-STORE association or one STOW-RS request a batch.

`deliver` sends Part 10 files to a `Destination` (`dicom_node.destination`) and answers which were stored
with which status, or raises `DeliveryError` saying whether trying again later may help (destination down,
association refused or aborted, timeouts, out of resources) or not (the destination refuses these objects).
It is synchronous: callers run it in a thread. Logs name SOP Instance UIDs and `Destination.describe()` only:
never patient data, never credentials.
"""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.destination import Destination, validate_ae_title
from dicom_node.tcp import no_delay_on_open

log = logging.getLogger(__name__)

# Warning statuses mean the object was stored (PS3.4 B.2.3, PS3.7 C): coercion, elements discarded,
# data set does not match the SOP class; 0x0001, 0x0107 and 0x0116 are the general warnings.
_WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116})
# Failures that may pass: out of resources (0xA7xx), resource limitation, cancel. Not 0x0110 (processing
# failure): Orthanc's STOW-RS gives it for an instance of another study than the URL's, which never passes.
_PASSING_FAILURES = frozenset({0x0213, 0xFE00})
# Native (uncompressed) encodings pynetdicom converts between; anything else needs its own presentation context.
_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
_MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context ids are odd numbers 1..255


@dataclass(frozen=True)
class Delivered:
    sop_instance_uid: str
    status: int | None  # the DIMSE status (0x0000 or a warning) or the HTTP status of the STOW-RS answer


class DeliveryError(Exception):
    """Nothing, or not everything, was delivered; `reason` is safe for logs, `retriable` says whether to try again.

    `delivered` are the objects stored before the failure (delivering them again is harmless: the SOP Instance
    UID is the same) and `failed` the SOP Instance UIDs the destination refused, when it said which.
    """

    def __init__(
        self,
        reason: str,
        *,
        retriable: bool,
        delivered: Sequence[Delivered] = (),
        failed: Sequence[str] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable
        self.delivered = tuple(delivered)
        self.failed = tuple(failed)


def deliver(
    destination: Destination,
    instances: Sequence[bytes],
    *,
    calling_ae: str = "BFD",
    timeout_s: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[Delivered]:
    """Send Part 10 files to the destination in one association (C-STORE) or one STOW-RS request.

    `tls` (`dicom_node.tls.client_context`): a C-STORE association goes over TLS with it.

    Returns one `Delivered` per instance, in order; raises DeliveryError when any was not stored.
    """
    validate_ae_title(calling_ae, "the calling AE title")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if not instances:
        return []
    datasets = [_read_instance(data, index, len(instances)) for index, data in enumerate(instances)]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    log.debug("delivering %d object(s) to %s: %s", len(uids), destination.describe(), ", ".join(uids))
    if destination.kind == "dimse":
        delivered = _deliver_dimse(destination, datasets, calling_ae, timeout_s, tls)
    else:
        delivered = _deliver_dicomweb(destination, datasets, timeout_s)
    log.info("delivered %d object(s) to %s", len(delivered), destination.describe())
    return delivered


def _read_instance(data: bytes, index: int, count: int) -> Dataset:
    where = f"object {index + 1} of {count}"
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError) as error:
        raise DeliveryError(f"{where} is not a DICOM Part 10 file ({type(error).__name__})", retriable=False) from error
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
    if not ds.file_meta.get("TransferSyntaxUID"):
        missing.append("TransferSyntaxUID (file meta)")
    if missing:
        raise DeliveryError(f"{where} lacks {', '.join(missing)}", retriable=False)
    return ds


# --- statuses --------------------------------------------------------------------------------------------------


def _stored(status: int) -> bool:
    return status == 0x0000 or status in _WARNING_STATUSES or 0xB000 <= status <= 0xBFFF


def _passes(status: int) -> bool:
    """Whether a failure status may pass if the object is sent again later."""
    return 0xA700 <= status <= 0xA7FF or status in _PASSING_FAILURES


def _status_text(status: int) -> str:
    if 0xA700 <= status <= 0xA7FF:
        return f"{status:#06x} out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return f"{status:#06x} data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return f"{status:#06x} cannot understand"
    names = {0x0110: "processing failure", 0x0117: "invalid SOP instance", 0x0122: "SOP class not supported",
             0x0124: "not authorised", 0x0211: "unrecognised operation", 0x0213: "resource limitation",
             0xFE00: "cancelled"}  # fmt: skip
    return f"{status:#06x} {names.get(status, 'failure')}"


def _refusal(
    failures: Mapping[str, int | None], delivered: Sequence[Delivered], total: int, where: str
) -> DeliveryError:
    """One error for the objects the destination refused: retriable only when every refusal may pass."""
    retriable = all(status is not None and _passes(status) for status in failures.values())
    texts = sorted({_status_text(s) if s is not None else "no reason given" for s in failures.values()})
    reason = f"{len(failures)} of {total} object(s) refused by {where}: {'; '.join(texts)}"
    log.warning("%s (SOP Instance UIDs %s)", reason, ", ".join(failures))
    return DeliveryError(reason, retriable=retriable, delivered=delivered, failed=list(failures))


# --- DIMSE -----------------------------------------------------------------------------------------------------


def _contexts(datasets: Sequence[Dataset]) -> list[tuple[UID, list[UID]]]:
    """Presentation contexts for exactly the SOP classes sent: native ones in Explicit and Implicit VR LE,
    and each other transfer syntax used (compressed pixel data cannot be converted) in a context of its own."""
    contexts: dict[tuple[UID, UID | None], list[UID]] = {}
    for ds in datasets:
        sop_class = UID(ds.SOPClassUID)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        contexts.setdefault((sop_class, None), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if syntax not in _NATIVE_SYNTAXES:
            contexts.setdefault((sop_class, syntax), [syntax])
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in contexts.items()]


def _deliver_dimse(
    destination: Destination,
    datasets: Sequence[Dataset],
    calling_ae: str,
    timeout_s: float,
    tls: ssl.SSLContext | None,
) -> list[Delivered]:
    where = destination.describe()
    contexts = _contexts(datasets)
    if len(contexts) > _MAX_CONTEXTS:
        raise DeliveryError(f"{len(contexts)} presentation contexts needed, at most {_MAX_CONTEXTS} fit one "
                            "association: send fewer SOP classes a batch", retriable=False)  # fmt: skip
    try:
        assoc, seen = open_association(destination, calling_ae, contexts, timeout_s, tls)
    except (OSError, RuntimeError) as error:
        raise DeliveryError(f"cannot reach {where} ({type(error).__name__})", retriable=True) from error
    if not assoc.is_established:
        raise _not_associated(where, assoc.is_rejected, seen, datasets)
    delivered: list[Delivered] = []
    failures: dict[str, int | None] = {}
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            try:
                answer = assoc.send_c_store(ds)
            except ValueError:  # no accepted presentation context for this SOP class and transfer syntax
                log.warning("%s accepted no presentation context for %s (SOP Instance UID %s)", where,
                            UID(ds.SOPClassUID).name, uid)  # fmt: skip
                failures[uid] = 0x0122
                continue
            status = answer.get("Status") if answer else None
            if status is None:  # no valid answer: the peer aborted, the link dropped or the DIMSE timeout passed
                raise DeliveryError(f"{where} gave no C-STORE answer (association aborted or timed out) after "
                                    f"{len(delivered)} of {len(datasets)} object(s)", retriable=True,
                                    delivered=delivered)  # fmt: skip
            if _stored(int(status)):
                delivered.append(Delivered(uid, int(status)))
            else:
                failures[uid] = int(status)
    except (OSError, RuntimeError) as error:
        raise DeliveryError(f"connection to {where} lost ({type(error).__name__})", retriable=True,
                            delivered=delivered) from error  # fmt: skip
    finally:
        if assoc.is_established:
            assoc.release()
    if failures:
        raise _refusal(failures, delivered, len(datasets), where)
    return delivered


def open_association(
    destination: Destination,
    calling_ae: str,
    contexts: Sequence[tuple[str, Sequence[str] | None]],
    timeout_s: float,
    tls: ssl.SSLContext | None,
) -> tuple[Any, set[str]]:
    """An association to a DIMSE destination with these presentation contexts (None: pynetdicom's default
    transfer syntaxes), Nagle off, over TLS with `tls`; established or not, with what was `seen` of it:
    'connected' and 'accepted' (pynetdicom reports a refused connection as an abort: these tell them apart).
    Raises what pynetdicom raises when it cannot even try (OSError, RuntimeError)."""
    from pynetdicom import AE, evt  # imported here: only DIMSE destinations need it

    assert destination.host is not None
    assert destination.port is not None
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntaxes in contexts:
        if syntaxes is None:
            ae.add_requested_context(sop_class)
        else:
            ae.add_requested_context(sop_class, list(syntaxes))
    seen: set[str] = set()

    def connected(event: Any) -> None:
        seen.add("connected")
        no_delay_on_open(event)  # dicom_node.tcp: each message's last segment goes out at once

    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, connected),
        (evt.EVT_ACCEPTED, lambda _: seen.add("accepted")),
    ]
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title or "ANY-SCP",
        evt_handlers=handlers,
        tls_args=(tls, destination.host) if tls is not None else None,
    )
    return assoc, seen


def _not_associated(where: str, rejected: bool, seen: set[str], datasets: Sequence[Dataset]) -> DeliveryError:
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if "accepted" in seen:  # it took the association but none of the SOP classes: sending again cannot help
        classes = sorted({UID(ds.SOPClassUID).name for ds in datasets})
        reason = f"{where} accepts none of the SOP classes sent ({', '.join(classes)})"
        log.warning("%s (SOP Instance UIDs %s)", reason, ", ".join(uids))
        return DeliveryError(reason, retriable=False, failed=uids)
    if rejected:
        reason = f"{where} rejected the association (called or calling AE title not accepted, or busy)"
    elif "connected" not in seen:
        reason = f"cannot connect to {where} (refused, unreachable or timed out)"
    else:
        reason = f"{where} aborted the association or did not answer it"
    log.warning("%s (SOP Instance UIDs %s)", reason, ", ".join(uids))
    return DeliveryError(reason, retriable=True)


# --- DICOMweb --------------------------------------------------------------------------------------------------


def _deliver_dicomweb(destination: Destination, datasets: Sequence[Dataset], timeout_s: float) -> list[Delivered]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    where = destination.describe()
    session = dicomweb_session(destination)
    statuses: list[int] = []

    def remember(response: Any, *args: Any, **kwargs: Any) -> Any:
        statuses.append(int(response.status_code))
        return response

    client = DICOMwebClient(url=where, session=session, timeout=timeout_s, callback=remember)
    client.set_http_retry_params(retry=False)  # the caller's queue retries, with its own back-off
    try:
        answer = client.store_instances(list(datasets))
    except requests.HTTPError as error:
        code = int(error.response.status_code) if error.response is not None else 0
        failed = _failed_sop(_json_dataset(error.response))
        if failed:  # 409 Conflict: the destination said which it refused and why
            raise _refusal(failed, [], len(datasets), f"{where} (HTTP {code})") from error
        retriable = code >= 500 or code in (408, 429)
        reason = f"{where} answered HTTP {code} to STOW-RS"
        log.warning("%s (SOP Instance UIDs %s)", reason, ", ".join(str(ds.SOPInstanceUID) for ds in datasets))
        raise DeliveryError(reason, retriable=retriable) from error
    except (requests.ConnectionError, requests.Timeout) as error:
        raise DeliveryError(f"cannot reach {where} ({type(error).__name__})", retriable=True) from error
    except (requests.RequestException, ValueError, KeyError, TypeError) as error:  # an unreadable answer
        raise DeliveryError(f"{where} sent an unreadable STOW-RS answer ({type(error).__name__})",
                            retriable=True) from error  # fmt: skip
    finally:
        session.close()
    status = statuses[-1] if statuses else None
    failed = _failed_sop(answer)
    delivered = [Delivered(str(ds.SOPInstanceUID), status) for ds in datasets if str(ds.SOPInstanceUID) not in failed]
    if failed:
        raise _refusal(failed, delivered, len(datasets), f"{where} (HTTP {status})")
    return delivered


def dicomweb_session(destination: Destination) -> Any:
    """A requests session for a DICOMweb destination: the URL's credentials go in the session, never in a URL
    that reaches a log."""
    import requests

    parts = urlsplit(destination.url or "")
    session = requests.Session()
    if parts.username is not None:
        session.auth = (unquote(parts.username), unquote(parts.password or ""))
    return session


def _json_dataset(response: Any) -> Dataset | None:
    if response is None or not response.content:
        return None
    try:
        return Dataset.from_json(response.json())
    except Exception:  # any JSON at all may come with an error status (Orthanc's own error objects, HTML...)
        return None


def _failed_sop(answer: Dataset | None) -> dict[str, int | None]:
    """SOP Instance UID -> Failure Reason for each item of the store response's FailedSOPSequence."""
    if answer is None:
        return {}
    failed: dict[str, int | None] = {}
    for item in answer.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failed[str(item.get("ReferencedSOPInstanceUID", "?"))] = int(reason) if reason is not None else None
    return failed
