"""Service settings: every one from the command line or a `BFD_*` environment variable (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.engine import PROVIDER_NAMES, default_intra_op_threads


class Settings(BaseSettings):
    """Validated at construction; messages say which setting and what was got."""

    model_config = SettingsConfigDict(env_prefix="BFD_", extra="forbid")

    bundle: Path = Field(Path("models/demo"), description="bundle folder written by `bfd export`")
    # NoDecode: the environment gives comma-separated lists (BFD_PROVIDERS=cuda,cpu), not JSON
    providers: Annotated[list[str], NoDecode] = Field(
        ["auto"], description="onnxruntime providers in order: auto|cuda|tensorrt|cpu"
    )
    intra_op_threads: int | None = Field(None, ge=1, description="onnxruntime threads (default: all cores)")
    decode_threads: int | None = Field(None, ge=1, description="decode pool size (default: all cores)")
    ort_spinning: bool = Field(False, description="let idle onnxruntime threads spin (lower latency, steals cores)")
    max_batch_size: int = Field(16, ge=1, le=256)
    max_queue_size: int = Field(64, ge=1, description="images admitted but not yet running; more get 503")
    max_wait_ms: float = Field(0.0, ge=0.0, description="extra wait to fill a batch (accelerators); 0 on CPU")
    max_upload_bytes: int = Field(30_000_000, ge=1, description="request body limit; more gets 413")
    max_pixels: int = Field(50_000_000, ge=1, description="decoded pixel limit per image; more gets 413")
    max_images_per_request: int = Field(16, ge=1)
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
    api_key: SecretStr | None = Field(
        None, description="when set, every /v1 and /api request needs it (X-API-Key or Authorization: Bearer)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="browser origins allowed to call the API, e.g. https://x.org"
    )
    heatmap_max_side: int = Field(512, ge=32, le=4096, description="longer side of heatmap overlays, pixels")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):  # BFD_CORS_ORIGINS=https://a.org,https://b.org
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):  # BFD_PROVIDERS=cuda,cpu
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        names = [v.lower() for v in value]
        unknown = [n for n in names if n != "auto" and n not in PROVIDER_NAMES]
        if unknown or not names:
            raise ValueError(f"providers must be 'auto' or from {sorted(PROVIDER_NAMES)}, got {value}")
        return names

    def resolved_intra_op_threads(self) -> int:
        return self.intra_op_threads or default_intra_op_threads()

    def resolved_decode_threads(self) -> int:
        # Decoding (Pillow releases the GIL) and inference share the cores: the decode pool is as wide as
        # the machine so bursts decode in parallel, while the one inference thread keeps batches flowing.
        return self.decode_threads or default_intra_op_threads()
