"""One typed settings object for the retrieval service, read once (by the wiring, grpc/server.py, and the CLI) and
passed down as sections and plain limits. Sections live with the layer that uses them (IndexSettings in
adapters/milvus, RerankSettings in usecases/rerank, TLS in tls.py); the transport's AuthSettings and the generation
section are here, so that nothing below the transport imports it.

Sources, highest priority first: explicit keyword arguments (CLI flags), environment variables
`VITRINE_<FIELD>` (nested: `VITRINE_INDEX__INDEX_TYPE=HNSW`), a YAML file (`--config vitrine.yaml` or
`VITRINE_CONFIG_FILE`), then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from retrieval_service.adapters.gemini import DEFAULT_MODEL
from retrieval_service.adapters.milvus import IndexSettings, is_lite_uri
from retrieval_service.tls import ClientTlsSettings, ServerTlsSettings
from retrieval_service.usecases.embedding_cache import CacheSettings
from retrieval_service.usecases.rerank import RerankSettings

MiB = 1024 * 1024
#: Shortest token accepted in settings, characters (~128 bits as hex / ~190 as base64).
MIN_TOKEN_CHARS = 32


class AuthSettings(BaseModel):
    """Bearer tokens accepted by the server. None configured = no authentication."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[SecretStr] = Field(default_factory=list, description="accepted bearer tokens (secrets)")
    tokens_file: Path | None = Field(None, description="file of accepted tokens, one per line, '#' comments")

    def load_tokens(self) -> list[str]:
        """All configured tokens: `tokens` then the lines of `tokens_file`.

        Raises:
            ValueError: the file cannot be read, or a token is shorter than MIN_TOKEN_CHARS or contains
                whitespace (the message gives the file and line, never the token).
        """
        found: list[tuple[str, str]] = [(t.get_secret_value(), f"auth.tokens[{i}]") for i, t in enumerate(self.tokens)]
        if self.tokens_file is not None:
            try:
                lines = self.tokens_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"auth.tokens_file: cannot read {self.tokens_file}: {exc.strerror or exc}") from None
            found += [(line.strip(), f"{self.tokens_file}:{n}") for n, line in enumerate(lines, start=1)
                      if line.strip() and not line.lstrip().startswith("#")]
        for token, where in found:
            if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
                raise ValueError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters without "
                                 "whitespace (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
        return [t for t, _ in found]



class GenerationSettings(BaseModel):
    """Gemini image generation (GenerateImages): the client's options (adapters/gemini) and the use case's
    reference limit (usecases/generate). The API key is a secret: never logged or echoed."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    api_key: SecretStr = Field(SecretStr(""), description="Gemini API key; empty = GenerateImages answers "
                                                          "FAILED_PRECONDITION (env VITRINE_GENERATION__API_KEY)")
    base_url: str = Field("", description="Gemini API base URL; empty = Google's endpoint")
    model: str = Field(DEFAULT_MODEL, description="default Gemini model")
    max_reference_images: int = Field(4, ge=1, le=16, description="most reference images per generation")
    max_retries: int = Field(2, ge=0, le=10, description="retries on 5xx / connection errors before any output")
    timeout_s: float = Field(120.0, gt=0, description="deadline of one Gemini call, seconds")


class Settings(BaseSettings):
    """Retrieval-service configuration. Units are in the field names or descriptions."""

    model_config = SettingsConfigDict(
        env_prefix="VITRINE_", env_nested_delimiter="__", extra="forbid", protected_namespaces=()
    )

    # --- where things are -------------------------------------------------------------------------------
    model_repository: Path = Field(
        Path(".cache/demo/model_repository"),
        description="Vitrine model repository (manifest.json + tokenizer.json); the one Triton serves",
    )
    encoder_url: str = Field("127.0.0.1:8001", description="Triton KServe v2 gRPC endpoint host:port")
    encoder_timeout_s: float = Field(30.0, gt=0, description="deadline of one encoder call, seconds; cut short by the "
                                                                  "caller's remaining gRPC deadline")
    milvus_uri: str = Field(
        "var/milvus.db",
        description="Milvus Lite file (path ending .db) or a Milvus server URI such as http://host:19530",
    )
    milvus_token: SecretStr = Field(SecretStr(""), description="Milvus token 'user:password' or API key")
    milvus_timeout_s: float = Field(10.0, gt=0, description="deadline of one Milvus call, seconds, cut short by the "
                                                                 "caller's remaining gRPC deadline (Milvus Lite "
                                                           "writes and flushes get at least 60 s)")
    collection: str = Field("", description="Milvus collection; empty = derived from the model id")
    index: IndexSettings = Field(default_factory=IndexSettings)
    blob_dir: Path = Field(Path("var/blobs"), description="content-addressed store of original image bytes")
    rerank: RerankSettings = Field(default_factory=RerankSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings,
                                 description="query embedding cache: in-process LRU, optionally shared in Redis")
    text_length_buckets: list[int] = Field(
        default_factory=list,
        description="token lengths a text query is padded up to (the smallest that fits), e.g. [8, 16, 32, 77]; "
                    "empty = the manifest's `text.length_buckets`. Only for a repository whose text tower takes "
                    "a dynamic length; the largest must be the context length",
    )
    generation: GenerationSettings = Field(default_factory=GenerationSettings)

    # --- the gRPC server -----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address of the gRPC server")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    max_message_bytes: int = Field(64 * MiB, gt=0, description="largest gRPC message accepted/sent, bytes")
    health_interval_s: float = Field(1.0, gt=0, description="dependency health probe period, seconds")

    # --- security (retrieval_service/tls.py, retrieval_service/grpc/auth.py) ---------------------------------------
    tls: ServerTlsSettings = Field(default_factory=ServerTlsSettings,
                                   description="server TLS (cert_file, key_file; client_ca_file for mutual TLS)")
    auth: AuthSettings = Field(default_factory=AuthSettings,
                               description="bearer tokens; none configured = open server (logged at startup)")
    encoder_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings, description="TLS to Triton")
    milvus_tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings,
                                          description="TLS to a Milvus server (an https:// milvus_uri also turns "
                                                      "it on, trusting the system roots)")
    max_concurrent_rpcs: int = Field(
        1000, ge=0, description="most RPCs in progress at once (streams included); more get RESOURCE_EXHAUSTED; "
                                "0 = unlimited",
    )

    # --- observability (retrieval_service/metrics.py, retrieval_service/logs.py) --------------------------------
    metrics_port: int = Field(
        9464, ge=-1, le=65535,
        description="Prometheus /metrics HTTP port (9464, the OpenTelemetry Prometheus exporter's default port); "
                    "0 picks a free one, -1 disables. A port in use is logged as an error, the service still runs",
    )
    metrics_host: str = Field("", description="bind address of the metrics endpoint; empty = `host`")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per line (ts, level, logger, message, request_id, rpc, ...)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="lowest level logged")

    # --- request limits ------------------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * MiB, gt=0, description="largest encoded image accepted, bytes")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest width*height accepted, pixels")
    min_image_side: int = Field(1, ge=1, description="smallest width or height accepted, pixels")
    max_text_chars: int = Field(1000, gt=0, description="longest text query accepted, characters")
    max_top_k: int = Field(1000, ge=1, le=16384, description="largest top_k (results per page)")
    max_filename_chars: int = Field(1024, ge=1)
    max_embed_items: int = Field(256, ge=1, le=4096, description="most texts or images in one EmbedTexts / "
                                                                  "EmbedImages call")

    # --- ingest pipeline -----------------------------------------------------------------------------------
    ingest_batch_size: int = Field(32, ge=1, description="images per encoder call during ingest")
    ingest_batch_wait_ms: float = Field(20.0, ge=0, description="longest wait to fill an ingest batch, ms")
    ingest_max_inflight_batches: int = Field(
        3, ge=1, description="ingest batches in flight per stream (decode, encode and insert overlap)"
    )
    decode_threads: int = Field(
        default_factory=lambda: max(2, os.cpu_count() or 2), ge=1, description="image decode threads"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("VITRINE_CONFIG_FILE")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | str | None = None, **overrides: Any) -> "Settings":
        """Build settings from `overrides` (None values ignored) > env > YAML `config_file` > defaults.

        Raises:
            pydantic.ValidationError: a value is out of range or of the wrong type (the message names it).
            FileNotFoundError: `config_file` does not exist.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        if config_file is None:
            return cls(**given)
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"settings file {path} not found")

        class _FromFile(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(cls, settings_cls, init_settings, env_settings, *_):  # noqa: ANN001
                return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=path))

        return _FromFile(**given)

    @property
    def milvus_is_lite(self) -> bool:
        """True when `milvus_uri` names an embedded Milvus Lite file (a '.db' path, `is_lite_uri`), not a server."""
        return is_lite_uri(self.milvus_uri)
