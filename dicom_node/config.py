"""What the DICOM node needs to know, as plain data (the service fills it from its `BFD_DICOM_*` settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.tls import TlsConfig
from inference.dicom_objects.uids import DEFAULT_UID_ROOT

RESULT_KINDS = ("sr", "gsps", "sc")


@dataclass(frozen=True)
class NodeConfig:
    destination: str  # 'AETITLE@host:port' (C-STORE) or an http(s) DICOMweb base URL (STOW-RS)
    port: int | None = None  # the storage SCP's port; None: no DIMSE listener (STOW-RS in only)
    host: str = "127.0.0.1"
    ae_title: str = "BFD"
    allowed_aes: tuple[str, ...] = ()  # calling AE titles let in; empty: any
    quiet_s: float = 5.0  # a study is answered when no instance of it arrived for this long...
    study_max_instances: int = 16  # ...or when it holds this many (the rest start a new batch)
    held_bytes_budget: int = 500_000_000  # held for studies not yet answered (or arriving); more: 'out of resources'
    max_instance_bytes: int = 100_000_000  # one instance larger than this is refused (while it arrives, over DIMSE)
    outputs: tuple[str, ...] = RESULT_KINDS
    uid_root: str = DEFAULT_UID_ROOT  # every UID of the result objects is under it (BFD_DICOM_UID_ROOT)
    build_processes: int = 1  # worker processes building the result objects (0: a thread of the service)
    audit_log: Path = field(default_factory=lambda: Path("bfd-dicom-audit.jsonl"))
    spool_dir: Path | None = None  # received instances kept on disk until answered (dicom_node.spool); None: off
    spool_bytes_budget: int = 2_000_000_000  # the spool's disk; more: 'out of resources'
    delivery_timeout_s: float = 30.0
    delivery_associations: int = 4  # batches sent at once (C-STORE associations or STOW-RS requests)
    retry_initial_s: float = 2.0
    retry_max_s: float = 300.0
    max_associations: int = 16  # associations the storage SCP serves at once; more are refused
    max_associations_per_peer: int = 8  # from one peer address at once, so one host cannot take every slot
    tls: TlsConfig = field(default_factory=TlsConfig)  # DICOM TLS for the SCP and/or the deliveries
    # a study is answered at the latest this long after its first instance, however its instances keep coming
    # (a re-sending sender kept one open for ever); None: 4 x quiet_s, at least 60 s (dicom_node.studies)
    study_max_wait_s: float | None = None
