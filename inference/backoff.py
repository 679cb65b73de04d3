"""Back-off between retries, doubling to a maximum, for whatever retries (DICOM deliveries, the results store).

The exponent is capped, so the wait stays finite however many tries have failed: `2.0 ** 1024` overflows
(OverflowError), and a destination down for a long weekend at a minute a try, or a database at one probe per
30 s, fails more often than that. Standard library only.
"""

from __future__ import annotations

MAX_DOUBLINGS = 64  # 2**64 times any sane initial wait is past any maximum, and far from overflowing


def retry_delay_s(attempts: int, initial_s: float, max_s: float) -> float:
    """The wait after `attempts` failed tries in a row: `initial_s` doubling per try after the first, up to
    `max_s`."""
    doublings = min(max(attempts - 1, 0), MAX_DOUBLINGS)
    return min(max_s, initial_s * 2.0**doublings)
