"""Can the node reach where its results go? A C-ECHO with the node's own AE title (and TLS, when it delivers
over TLS), or for a DICOMweb destination a one-study QIDO-RS search with the URL's credentials: the first
thing to try when a PACS is being connected (`bfd dicom-echo`). Nothing here names a patient or a credential.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from dicom_node.delivery import dicomweb_session, open_association
from dicom_node.destination import Destination, validate_ae_title

SUCCESS = 0x0000


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str  # what happened, for a person
    seconds: float


def echo(
    destination: Destination, *, calling_ae: str, timeout_s: float = 10.0, tls: ssl.SSLContext | None = None
) -> EchoResult:
    """Verify the destination answers: C-ECHO (DIMSE, over TLS with `tls`) or QIDO-RS (DICOMweb)."""
    validate_ae_title(calling_ae, "the calling AE title")
    started = time.monotonic()
    ok, detail = _echo_dimse(destination, calling_ae, timeout_s, tls) if destination.kind == "dimse" else (
        _search_dicomweb(destination, timeout_s)
    )  # fmt: skip
    return EchoResult(ok, detail, time.monotonic() - started)


def _echo_dimse(
    destination: Destination, calling_ae: str, timeout_s: float, tls: ssl.SSLContext | None
) -> tuple[bool, str]:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    try:
        assoc, seen = open_association(destination, calling_ae, [(Verification, None)], timeout_s, tls)
    except (OSError, RuntimeError) as error:
        return False, f"cannot connect ({_why(error)})"
    if not assoc.is_established:
        if assoc.is_rejected:
            return False, (
                f"association rejected: is {calling_ae!r} a known calling AE there, and is "
                f"{destination.ae_title!r} its AE title?"
            )
        if "connected" not in seen:
            return False, "cannot connect (refused, unreachable, timed out" + (
                ", or the TLS handshake failed)" if tls is not None else ")"
            )
        return False, "connected, but the association was aborted or not answered" + (
            " (a TLS peer that refused this node's certificate?)" if tls is not None else " (a TLS-only port?)"
        )
    try:
        answer = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = answer.get("Status") if answer else None
    if status is None:
        return False, "no C-ECHO answer (aborted or timed out)"
    if int(status) != SUCCESS:
        return False, f"C-ECHO answered {int(status):#06x}"
    return True, f"C-ECHO answered {SUCCESS:#06x} (Success)" + (" over TLS" if tls is not None else "")


def _search_dicomweb(destination: Destination, timeout_s: float) -> tuple[bool, str]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = dicomweb_session(destination)
    try:
        client = DICOMwebClient(url=destination.describe(), session=session, timeout=timeout_s)
        client.set_http_retry_params(retry=False)
        client.search_for_studies(limit=1)
    except requests.HTTPError as error:
        code = error.response.status_code if error.response is not None else "?"
        return False, f"QIDO-RS search answered HTTP {code}"
    except requests.RequestException as error:
        return False, f"cannot reach it ({type(error).__name__})"
    except (ValueError, KeyError, TypeError) as error:
        return False, f"unreadable QIDO-RS answer ({type(error).__name__})"
    finally:
        session.close()
    return True, "QIDO-RS search answered"


def _why(error: BaseException) -> str:
    return str(getattr(error, "strerror", None) or getattr(error, "reason", None) or type(error).__name__)
