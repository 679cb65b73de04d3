"""The service's settings: from `BFD_*` environment variables (pydantic-settings), some also from `bfd serve` flags.

The DICOM node's are the `dicom_*` ones (`BFD_DICOM_PORT`, `BFD_DICOM_DESTINATION`, ...: README "DICOM node").

Validated at construction with messages that say which setting is wrong and what came; what the settings
alone cannot show (names that must resolve, paths that must be of the right kind, mistyped `BFD_*` names) is
checked by `service.startup_checks.check_environment()`, which `bfd serve` runs before it loads the bundle.
Either way it stops with exit 2 and a line per problem (`startup_checks.problem_lines`), not later with a
traceback. The core's part of them is handed
over as plain data (`predictor_config()`): the core never reads settings itself.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dicom_node.config import RESULT_KINDS, NodeConfig
from dicom_node.tls import TlsConfig
from inference.config import PredictorConfig
from inference.dicom_objects.uids import DEFAULT_UID_ROOT, UID_ROOT_MAX_CHARS, check_uid_root
from inference.memory_budget import REQUEST_BODY_COPIES
from inference.providers import PROVIDER_NAMES

ENV_PREFIX = "BFD_"

# Threads and worker processes: nothing is gained beyond the cores, and the largest common servers have up to 256
# hardware threads. Unbounded, BFD_INTRA_OP_THREADS=100000 hung start-up at about 32,400 threads after it had used
# up the machine's process table (threads count against it), for every other program too.
MAX_THREADS = 256


class Settings(BaseSettings):
    """Validated at construction; messages say which setting and what was got."""

    # allow_inf_nan=False: no float setting means anything at inf or nan (BFD_MAX_WAIT_MS=inf crashed the batcher
    # after the bundle had loaded)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", allow_inf_nan=False)

    bundle: Path = Field(Path("models/demo"), description="bundle folder written by `bfd export`")
    # NoDecode: the environment gives comma-separated lists (BFD_PROVIDERS=cuda,cpu), not JSON
    providers: Annotated[list[str], NoDecode] = Field(
        ["auto"], description="onnxruntime providers in order: auto|cuda|tensorrt|cpu"
    )
    intra_op_threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, description="onnxruntime threads (default: all cores)"
    )
    decode_threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="decode pool size (default: all cores)")
    decode_processes: int | None = Field(
        None,
        ge=0,
        le=MAX_THREADS,
        description="worker processes for compressed DICOM codecs, which hold the GIL (default: as decode_threads; "
        "0: decode them in the decode threads)",
    )
    ort_spinning: bool = Field(False, description="let idle onnxruntime threads spin (lower latency, steals cores)")
    max_batch_size: int = Field(16, ge=1, le=256)
    # le: every lone image waits this long; a few ms pay on an accelerator, seconds never do
    max_wait_ms: float = Field(
        0.0, ge=0.0, le=10_000.0, description="extra wait to fill a batch (accelerators); 0 on CPU"
    )
    # Admission: work is taken on only when it can start within a deadline (inference.batching, README).
    max_queue_wait_ms: float = Field(
        700.0,
        gt=0.0,
        le=600_000.0,  # 10 min: longer than any HTTP client or DICOM sender waits for its answer
        description="longest an accepted image is expected to wait before its batch starts; more gets 503",
    )
    max_queue_size: int = Field(
        256, ge=1, description="hard bound on images admitted and not yet running (backstop); more get 503"
    )
    # Memory: request bodies and decodes are budgeted by bytes, so N parallel requests cannot exceed it.
    max_upload_bytes: int = Field(30_000_000, ge=1, description="request body limit; more gets 413")
    request_memory_budget_bytes: int = Field(
        300_000_000, ge=1, description="bytes of request bodies held at once (read, not yet answered); more get 503"
    )
    max_pixels: int = Field(50_000_000, ge=1, description="decoded pixel limit per image; more gets 413")
    max_image_decode_bytes: int = Field(
        400_000_000, ge=1, description="estimated working memory of one image's decode; more gets 413"
    )
    decode_memory_budget_bytes: int = Field(
        800_000_000, ge=1, description="estimated working memory of all decodes in flight; the rest wait their turn"
    )
    max_images_per_request: int = Field(16, ge=1)
    # Slow or silent clients: bodies must keep coming, headers must arrive (service.http_server).
    # Upper bounds: an hour (a 30 MB body at the minimum rate takes 25 min); headers are a few hundred bytes.
    upload_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="a request body must be complete within this; else 408"
    )
    upload_min_bytes_per_s: float = Field(
        20_000.0, ge=0.0, description="after the first 5 s a body must average this rate; else 408 (0: no check)"
    )
    header_timeout_s: float = Field(10.0, gt=0.0, le=300.0, description="request headers must be complete within this")
    keep_alive_timeout_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="idle keep-alive connections are closed after this"
    )
    # ge=8: uvicorn refuses a request when its open connections (the request's own included) or its running tasks
    # reach the limit, so 1 answered 503 to everything. 8 lets in a client's request next to the liveness and
    # readiness probes, a metrics scrape and the idle keep-alive connections they leave open for a few seconds.
    limit_concurrency: int = Field(
        1024, ge=8, description="connections plus requests the HTTP server takes at once; more get 503"
    )
    abstain_min_router_probability: float | None = Field(
        None, ge=0.0, le=1.0, description="abstain under this router top probability (default: bundle, else 0.5)"
    )
    abstain_max_colourfulness: float | None = Field(
        None, ge=0.0, description="abstain above this colourfulness, 0..170 (default: bundle, else 12)"
    )
    database_url: str = Field(
        "sqlite+aiosqlite:///bfd-results.sqlite3",
        description="results store: sqlite+aiosqlite:///FILE (default, embedded) or postgresql+asyncpg://...",
    )
    store_images: bool = Field(False, description="also keep the uploaded image bytes in the results store")
    store_identifiable_images: bool = Field(
        False, description="with store_images: keep DICOM as received, patient data included (default: de-identified)"
    )
    api_key: SecretStr | None = Field(
        None, description="when set, every /v1 and /api request needs it (X-API-Key or Authorization: Bearer)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="browser origins allowed to call the API, e.g. https://x.org"
    )
    heatmap_max_side: int = Field(512, ge=32, le=4096, description="longer side of heatmap overlays, pixels")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # The DICOM node (dicom_node/, README "DICOM node"): on when a destination is set; listens when a port is too.
    dicom_port: int | None = Field(
        None, ge=0, le=65535, description="storage SCP port (C-ECHO, C-STORE); unset: no DIMSE listener"
    )
    dicom_host: str | None = Field(None, description="storage SCP bind address (default: as host)")
    dicom_ae_title: str = Field("BFD", description="this node's AE title (DICOM AE: 1..16 printable ASCII, no \\)")
    dicom_allowed_aes: Annotated[list[str], NoDecode] = Field(
        [], description="calling AE titles let in, comma-separated; empty: any"
    )
    dicom_destination: str | None = Field(
        None, description="where results go: AETITLE@host:port (C-STORE) or an http(s) DICOMweb URL (STOW-RS)"
    )
    dicom_quiet_s: float = Field(5.0, ge=0.0, le=3600.0, description="a study is answered after this quiet time")
    dicom_study_max_wait_s: float | None = Field(
        None,
        gt=0.0,
        le=86400.0,
        description="a study is answered at the latest this long after its first instance, however its instances "
        "keep coming (re-sends cannot extend it); unset: 4 x dicom_quiet_s, at least 60 s",
    )
    dicom_study_max_instances: int = Field(
        16, ge=1, le=1000, description="...or once it holds this many instances (the rest form a new group)"
    )
    dicom_held_bytes_budget: int = Field(
        500_000_000, ge=1, description="memory held for studies not yet answered; more: 'out of resources' (0xA700)"
    )
    dicom_max_instance_bytes: int = Field(
        100_000_000,
        ge=1,
        description="one instance larger than this (or than the held-bytes budget) is refused (0xA700); over DIMSE "
        "as soon as it passes the limit",
    )
    dicom_outputs: Annotated[list[str], NoDecode] = Field(
        ["sr", "gsps", "sc"], description="result objects to send: sr, gsps, sc (comma-separated)"
    )
    dicom_uid_root: str = Field(
        DEFAULT_UID_ROOT,
        description="root of every UID the result objects get (SOP Instance, Series): your organisation's, at most "
        f"{UID_ROOT_MAX_CHARS} characters, no trailing dot; the default is pydicom's example root, for research use "
        "only",
    )
    dicom_build_processes: int = Field(
        1, ge=0, le=16, description="worker processes building the result objects (0: a thread of the service)"
    )
    dicom_audit_log: Path = Field(Path("bfd-dicom-audit.jsonl"), description="the node's audit log (JSON lines)")
    dicom_spool_dir: Path | None = Field(
        None,
        description="keep received instances here until their study is answered, so a crash loses none "
        "(they hold patient data; unset: memory only)",
    )
    dicom_spool_bytes_budget: int = Field(
        2_000_000_000, ge=1, description="disk the spool may use; more: 'out of resources' (0xA700)"
    )
    dicom_delivery_associations: int = Field(
        4, ge=1, le=64, description="result batches sent at once (C-STORE associations or STOW-RS requests)"
    )
    dicom_retry_initial_s: float = Field(
        2.0, gt=0.0, le=3600.0, description="first delivery retry after this; doubling"
    )
    dicom_retry_max_s: float = Field(
        300.0, gt=0.0, le=86_400.0, description="longest wait between delivery retries (at most a day)"
    )
    # The storage SCP's association limits (dicom_node/scp.py); each association holds a thread and up to a few
    # PDUs of memory, so the 256 above which threads are refused bounds them too.
    dicom_max_associations: int = Field(
        16, ge=1, le=MAX_THREADS, description="associations the storage SCP serves at once; more are refused"
    )
    dicom_max_associations_per_peer: int = Field(
        8,
        ge=1,
        le=MAX_THREADS,
        description="associations from one peer address at once, so one host cannot take every slot",
    )
    # DICOM TLS (dicom_node/tls.py, README "DICOM node"): PEM files from the site's PKI.
    dicom_tls: bool = Field(False, description="the storage SCP speaks TLS only")
    dicom_destination_tls: bool = Field(False, description="C-STORE deliveries go over TLS")
    dicom_tls_certificate: Path | None = Field(None, description="this node's certificate (PEM, with its chain)")
    dicom_tls_private_key: Path | None = Field(None, description="its private key (PEM, unencrypted)")
    dicom_tls_trusted_certificates: Path | None = Field(
        None, description="CA certificates (PEM) that peers' certificates must chain to"
    )
    dicom_tls_require_client_certificate: bool = Field(
        True, description="senders must present a certificate the trusted CAs issued (mutual TLS)"
    )

    @field_validator("cors_origins", "providers", "dicom_allowed_aes", "dicom_outputs", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        # the environment gives comma-separated lists: BFD_PROVIDERS=cuda,cpu, BFD_DICOM_ALLOWED_AES=A,B
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title_is_dicom(cls, value: str) -> str:
        from dicom_node.destination import validate_ae_title  # one rule for every AE title the node uses

        validate_ae_title(value, "the AE title")
        return value.strip(" ")  # leading and trailing spaces are not significant (PS3.5, AE)

    @field_validator("dicom_allowed_aes")
    @classmethod
    def _allowed_aes_are_dicom(cls, value: list[str]) -> list[str]:
        from dicom_node.destination import validate_ae_title

        for index, title in enumerate(value):
            validate_ae_title(title, f"allowed AE title {index + 1}")
        return [title.strip(" ") for title in value]

    @field_validator("dicom_uid_root")
    @classmethod
    def _uid_root_is_dicom(cls, value: str) -> str:
        return check_uid_root(value.strip())  # one rule, where the UIDs are made

    @field_validator("dicom_outputs")
    @classmethod
    def _known_outputs(cls, value: list[str]) -> list[str]:
        names = [v.lower() for v in value]
        unknown = [n for n in names if n not in RESULT_KINDS]
        if unknown or not names:
            raise ValueError(f"dicom_outputs must be some of {list(RESULT_KINDS)}, got {value}")
        return names

    @field_validator(
        "dicom_spool_dir",
        "dicom_tls_certificate",
        "dicom_tls_private_key",
        "dicom_tls_trusted_certificates",
        mode="before",
    )
    @classmethod
    def _blank_path_is_none(cls, value: object) -> object:
        # Path("") is the working directory: an empty BFD_DICOM_SPOOL_DIR (a template's blank) means 'off'
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("dicom_destination")
    @classmethod
    def _destination_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from dicom_node.destination import Destination  # the DIMSE library loads only when a node is set up

            Destination.parse(value)  # ValueError says what is wrong
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_empty_key(cls, value: object) -> object:
        # An empty key once meant 'no key', which silently turned authentication off (BFD_API_KEY="" from a
        # template or a missing secret): refused, so that only an unset key runs the service open.
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str) and not raw.strip():
            got = "an empty value" if not raw else "only whitespace"
            raise ValueError(
                f"api_key (BFD_API_KEY) must be a real key or unset, got {got}: set a long random key, "
                "or unset BFD_API_KEY to run without one (then bind a loopback address only)"
            )
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        names = [v.lower() for v in value]
        unknown = [n for n in names if n != "auto" and n not in PROVIDER_NAMES]
        if unknown or not names:
            raise ValueError(f"providers must be 'auto' or from {sorted(PROVIDER_NAMES)}, got {value}")
        return names

    @model_validator(mode="after")
    def _budgets_fit(self) -> Settings:
        """A budget smaller than the largest thing it must hold would refuse that thing for ever."""
        if self.max_image_decode_bytes > self.decode_memory_budget_bytes:
            raise ValueError(
                f"max_image_decode_bytes ({self.max_image_decode_bytes}) must not exceed decode_memory_budget_bytes "
                f"({self.decode_memory_budget_bytes}): the largest allowed decode must fit the budget"
            )
        needed = REQUEST_BODY_COPIES * self.max_upload_bytes
        if needed > self.request_memory_budget_bytes:
            raise ValueError(
                f"request_memory_budget_bytes ({self.request_memory_budget_bytes}) must be at least "
                f"{REQUEST_BODY_COPIES} x max_upload_bytes = {needed}: a request of the largest allowed size must fit"
            )
        return self

    @model_validator(mode="after")
    def _tls_is_complete(self) -> Settings:
        self.tls_config().check()  # what TLS needs is named now; the files load when the node starts
        return self

    @model_validator(mode="after")
    def _study_wait_is_longer_than_quiet(self) -> Settings:
        if self.dicom_study_max_wait_s is not None and self.dicom_study_max_wait_s < self.dicom_quiet_s:
            raise ValueError(
                f"dicom_study_max_wait_s (BFD_DICOM_STUDY_MAX_WAIT_S) must be at least dicom_quiet_s "
                f"(BFD_DICOM_QUIET_S, {self.dicom_quiet_s:g}), got {self.dicom_study_max_wait_s:g}"
            )
        return self

    @model_validator(mode="after")
    def _node_has_a_destination(self) -> Settings:
        if self.dicom_port is not None and self.dicom_destination is None:
            raise ValueError(
                "dicom_port (BFD_DICOM_PORT) is set but dicom_destination (BFD_DICOM_DESTINATION) is not: "
                "the node needs somewhere to send its results (AETITLE@host:port or a DICOMweb URL)"
            )
        return self

    @model_validator(mode="after")
    def _ports_are_distinct(self) -> Settings:
        """Two listeners on one address and port: the second bind fails after the bundle has loaded."""
        if self.dicom_port is None or self.dicom_port != self.port or self.port == 0:  # 0: any free port
            return self
        dicom_host = self.dicom_host if self.dicom_host is not None else self.host
        if dicom_host == self.host or _is_wildcard(dicom_host) or _is_wildcard(self.host):
            raise ValueError(
                f"dicom_port (BFD_DICOM_PORT) and port (BFD_PORT) are both {self.port} on overlapping addresses "
                f"(BFD_HOST={self.host!r}, BFD_DICOM_HOST={dicom_host!r}): give the DICOM node a port of its own"
            )
        return self

    @model_validator(mode="after")
    def _retries_in_order(self) -> Settings:
        if self.dicom_retry_initial_s > self.dicom_retry_max_s:
            raise ValueError(
                f"dicom_retry_initial_s (BFD_DICOM_RETRY_INITIAL_S, {self.dicom_retry_initial_s:g}) must not exceed "
                f"dicom_retry_max_s (BFD_DICOM_RETRY_MAX_S, {self.dicom_retry_max_s:g}): the wait doubles up to it"
            )
        return self

    @model_validator(mode="after")
    def _per_peer_within_total(self) -> Settings:
        if self.dicom_max_associations_per_peer > self.dicom_max_associations:
            raise ValueError(
                f"dicom_max_associations_per_peer (BFD_DICOM_MAX_ASSOCIATIONS_PER_PEER, "
                f"{self.dicom_max_associations_per_peer}) must not exceed dicom_max_associations "
                f"(BFD_DICOM_MAX_ASSOCIATIONS, {self.dicom_max_associations})"
            )
        return self

    def node_config(self) -> NodeConfig | None:
        """The DICOM node's part of the settings; None when the node is off (no destination)."""
        if self.dicom_destination is None:
            return None
        return NodeConfig(
            destination=self.dicom_destination,
            port=self.dicom_port,
            host=self.dicom_host or self.host,
            ae_title=self.dicom_ae_title,
            allowed_aes=tuple(self.dicom_allowed_aes),
            quiet_s=self.dicom_quiet_s,
            study_max_wait_s=self.dicom_study_max_wait_s,
            study_max_instances=self.dicom_study_max_instances,
            held_bytes_budget=self.dicom_held_bytes_budget,
            max_instance_bytes=self.dicom_max_instance_bytes,
            outputs=tuple(self.dicom_outputs),
            uid_root=self.dicom_uid_root,
            build_processes=self.dicom_build_processes,
            audit_log=self.dicom_audit_log,
            spool_dir=self.dicom_spool_dir,
            spool_bytes_budget=self.dicom_spool_bytes_budget,
            delivery_associations=self.dicom_delivery_associations,
            retry_initial_s=self.dicom_retry_initial_s,
            retry_max_s=self.dicom_retry_max_s,
            max_associations=self.dicom_max_associations,
            max_associations_per_peer=self.dicom_max_associations_per_peer,
            tls=self.tls_config(),
        )

    def tls_config(self) -> TlsConfig:
        """The DICOM node's TLS material and where it is used (BFD_DICOM_TLS*)."""
        return TlsConfig(
            certificate=self.dicom_tls_certificate,
            private_key=self.dicom_tls_private_key,
            trusted_certificates=self.dicom_tls_trusted_certificates,
            require_client_certificate=self.dicom_tls_require_client_certificate,
            listen=self.dicom_tls,
            deliver=self.dicom_destination_tls,
        )

    def predictor_config(self) -> PredictorConfig:
        """The core's part of the settings."""
        fields = PredictorConfig.__dataclass_fields__
        return PredictorConfig(**{name: getattr(self, name) for name in fields})

    def resolved_intra_op_threads(self) -> int:
        return self.predictor_config().resolved_intra_op_threads()

    def resolved_decode_threads(self) -> int:
        return self.predictor_config().resolved_decode_threads()


def env_name(field: str) -> str:
    """The environment variable of a setting: `dicom_ae_title` -> `BFD_DICOM_AE_TITLE`."""
    return ENV_PREFIX + field.upper()


def _is_wildcard(host: str) -> bool:
    """'' and 0.0.0.0 or :: bind every interface, so they overlap any other address of the port."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
