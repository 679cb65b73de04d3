"""Every UID the result objects create, under one root: the site's (BFD_DICOM_UID_ROOT) or the example default.

A UID is a root an organisation was given, a dot, and a suffix unique under it (PS3.5 9, B.2); at most 64
characters, components of digits without leading zeros. The default is pydicom's example root: any pydicom
user's objects carry it, so it identifies no organisation and is for research use only; a site or vendor sets
its own. The root is data handed to the builders (the core reads no settings), and checked for form here,
where the UIDs are made: the service's settings call `check_uid_root` at start-up so a bad root stops the
service before the first study, not in the middle of one.

Only the standard library and pydicom: the settings import this module.
"""

from __future__ import annotations

import re

from pydicom.uid import generate_uid

# pydicom's example root (pydicom.uid.PYDICOM_ROOT_UID without its dot): research use only.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498"
UID_MAX_CHARS = 64
# A random suffix as unguessable as a UUID4's 122 random bits needs 37 decimal digits (10**37 > 2**122): with
# the dot, a root of at most 64 - 1 - 37 = 26 characters leaves room for them. (pydicom's root has 25.)
SUFFIX_MIN_DIGITS = 37
UID_ROOT_MAX_CHARS = UID_MAX_CHARS - 1 - SUFFIX_MIN_DIGITS
_COMPONENT = r"(0|[1-9][0-9]*)"
_ROOT = re.compile(rf"{_COMPONENT}(\.{_COMPONENT})*")


def uid_root_problem(root: str) -> str | None:
    """What is wrong with `root` as a UID root (in words, naming what was expected), or None."""
    if not root:
        return "expected a UID root such as 1.2.826.0.1.3680043.8.498, got an empty value"
    if len(root) > UID_ROOT_MAX_CHARS:
        return (
            f"expected at most {UID_ROOT_MAX_CHARS} characters, so that a UID under it keeps "
            f"{SUFFIX_MIN_DIGITS} random digits within {UID_MAX_CHARS}; got {len(root)}"
        )
    if root.endswith("."):
        return "expected the root without a trailing dot (the dot before each suffix is added), got one"
    if not _ROOT.fullmatch(root):
        return (
            "expected digits in dot-separated components, each without a leading zero "
            "(PS3.5 9.1), e.g. 1.2.826.0.1.3680043.8.498"
        )
    return None


def check_uid_root(root: str) -> str:
    """`root` when it is a usable UID root; ValueError saying what was expected otherwise."""
    problem = uid_root_problem(root)
    if problem is not None:
        raise ValueError(problem)
    return root


def new_uid(root: str = DEFAULT_UID_ROOT) -> str:
    """A new random UID under `root` (a root `check_uid_root` accepts)."""
    return str(generate_uid(prefix=f"{check_uid_root(root)}."))


def derived_uid(root: str, *sources: str) -> str:
    """A UID under `root` derived from `sources` (SHA-512): the same sources give the same UID every time."""
    return str(generate_uid(prefix=f"{check_uid_root(root)}.", entropy_srcs=list(sources)))
