"""Talking to a running service over HTTP (httpx only): what clients of the API share.

`bfd predict --url` and the desktop window read error answers the same way. Nothing here imports the
server or its framework, so a client needs only httpx.
"""

from __future__ import annotations

from typing import Any


def reason_of(response: Any) -> str:
    """The reason in an error answer (an httpx response): the service's `detail`, else the body as text.

    Something other than the service may answer too (a proxy's HTML 502), and its text is then the best
    reason there is.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("detail"):
        detail = body["detail"]
        return detail if isinstance(detail, str) else str(detail)
    return str(response.text).strip()[:500] or response.reason_phrase or f"HTTP {response.status_code}"
