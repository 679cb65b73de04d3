"""Where the node's results go: the setting BFD_DICOM_DESTINATION, 'AETITLE@host:port' (a DIMSE storage SCP) or
an http(s) DICOMweb base URL (STOW-RS), parsed and checked once; `describe()` names it in logs, the audit and
the outbox without the URL's credentials."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

_MAX_AE_LENGTH = 16
_CREDENTIALS = re.compile(r"//[^/@\s]*@")


@dataclass(frozen=True, repr=False)
class Destination:
    """Where results go: a DIMSE storage SCP (`ae_title`, `host`, `port`) or a DICOMweb service (`url`)."""

    kind: Literal["dimse", "dicomweb"]
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None  # may hold user:password: describe() and repr() never show it

    @classmethod
    def parse(cls, text: str) -> Destination:
        """'AETITLE@host:port' (AE title 1..16 characters, port 1..65535) or an http(s):// DICOMweb base URL."""
        value = text.strip()
        if re.match(r"^https?://", value, flags=re.IGNORECASE):
            return cls(kind="dicomweb", url=_parse_url(value))
        if "://" in value or "@" not in value:
            raise ValueError(
                "BFD_DICOM_DESTINATION must be 'AETITLE@host:port' (C-STORE) or an http(s):// DICOMweb base URL "
                f"(STOW-RS), got {_redact(value)!r}"
            )
        ae_title, _, address = value.rpartition("@")
        validate_ae_title(ae_title, "the destination's AE title")
        host, port = _parse_address(address)
        return cls(kind="dimse", ae_title=ae_title.strip(), host=host, port=port)

    def describe(self) -> str:
        """For logs and the audit: the AE title and address, or the URL without credentials."""
        if self.kind == "dimse":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"{self.ae_title}@{host}:{self.port}"
        return _without_credentials(self.url or "")

    def __repr__(self) -> str:
        return f"Destination({self.kind}: {self.describe()})"


def validate_ae_title(ae_title: str, what: str = "AE title") -> None:
    """1..16 characters of the default repertoire, not all spaces, no backslash or control characters."""
    stripped = ae_title.strip(" ")
    if not stripped:
        raise ValueError(f"{what} must have 1 to {_MAX_AE_LENGTH} characters, got {ae_title!r}")
    if len(ae_title) > _MAX_AE_LENGTH:
        raise ValueError(f"{what} must have at most {_MAX_AE_LENGTH} characters, got {len(ae_title)}: {ae_title!r}")
    bad = [c for c in ae_title if c == "\\" or not (0x20 <= ord(c) < 0x7F)]
    if bad:
        raise ValueError(f"{what} may not hold backslashes, control or non-ASCII characters, got {ae_title!r}")


def _parse_address(address: str) -> tuple[str, int]:
    host, colon, port_text = address.rpartition(":")
    if not colon or not host:
        raise ValueError(f"the destination needs host:port after the AE title, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 literal
    if not host or any(c.isspace() or c in "/@[]" for c in host) or (":" in host and not address.startswith("[")):
        raise ValueError(f"the destination's host is not a host name or IP address: {host!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the destination's port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def _parse_url(value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked
    except ValueError as error:
        raise ValueError(f"the DICOMweb URL's port is not a number from 0 to 65535: {_redact(value)!r}") from error
    if not parts.hostname:
        raise ValueError(f"the DICOMweb URL names no host: {_redact(value)!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a DICOMweb base URL takes no query or fragment, got {_redact(value)!r}")
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _redact(text: str) -> str:
    return _CREDENTIALS.sub("//***@", text)
