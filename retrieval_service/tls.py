"""TLS settings and credentials: the gRPC server's own certificate, and TLS to Triton and to Milvus.

Files are PEM: a certificate chain (leaf first), its private key, and CA bundles. Three places use them:

* the retrieval gRPC server (`ServerTlsSettings` -> `server_credentials`): TLS when `cert_file` and `key_file`
  are set; with `client_ca_file` client certificates are verified against that CA, and with
  `require_client_auth` a client without one is refused during the handshake (mutual TLS);
* the Triton channel (`ClientTlsSettings` -> `channel_credentials`, passed to tritonclient's `creds=`);
* the Milvus client (`ClientTlsSettings` -> `milvus_tls_kwargs`, pymilvus 3.0.2 `MilvusClient` keyword
  arguments: `secure`, `server_pem_path` (one-way: the CA / server certificate to trust), or `ca_pem_path` +
  `client_pem_path` + `client_key_path` (mutual), and `server_name` (pymilvus' grpc_handler reads these)).

A missing or unreadable file is a startup error naming the setting (`TlsConfigError`), never a silent fallback to
plaintext.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TlsConfigError(ValueError):
    """A TLS setting names a file that is missing or unreadable, or the combination of settings is incomplete."""


class ServerTlsSettings(BaseModel):
    """TLS of the retrieval gRPC server. Both `cert_file` and `key_file` set = TLS; neither = plaintext."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path | None = Field(None, description="PEM certificate chain of the server (leaf first)")
    key_file: Path | None = Field(None, description="PEM private key of `cert_file`")
    client_ca_file: Path | None = Field(
        None, description="PEM CA bundle to verify client certificates against (mutual TLS)"
    )
    require_client_auth: bool = Field(
        False, description="refuse clients without a certificate signed by `client_ca_file`"
    )

    @model_validator(mode="after")
    def _complete(self) -> "ServerTlsSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file (client auth needs TLS)")
        if self.require_client_auth and self.client_ca_file is None:
            raise ValueError("tls.require_client_auth needs tls.client_ca_file to verify client certificates")
        return self

    @property
    def enabled(self) -> bool:
        """True when the server serves TLS."""
        return self.cert_file is not None


class ClientTlsSettings(BaseModel):
    """TLS from this service to a dependency (Triton or Milvus). Off unless `enabled`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="connect with TLS")
    ca_file: Path | None = Field(None, description="PEM CA bundle to trust; None = the system roots")
    cert_file: Path | None = Field(None, description="PEM client certificate chain (mutual TLS)")
    key_file: Path | None = Field(None, description="PEM private key of `cert_file`")
    server_name: str = Field("", description="expected server name in its certificate, when not the URL host")

    @model_validator(mode="after")
    def _complete(self) -> "ClientTlsSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        if not self.enabled and (self.ca_file or self.cert_file or self.server_name):
            raise ValueError("TLS files or server_name are set but enabled is false; set enabled: true")
        return self


def read_pem(path: Path | str, setting: str) -> bytes:
    """Read a PEM file named by setting `setting`.

    Raises:
        TlsConfigError: the file is missing, unreadable or holds no PEM block (the message names the setting).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{setting}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(tls: ServerTlsSettings) -> grpc.ServerCredentials | None:
    """gRPC server credentials for `tls`, or None when TLS is off (plaintext).

    Raises:
        TlsConfigError: a file is missing or not PEM.
    """
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    pair = (read_pem(tls.key_file, "tls.key_file"), read_pem(tls.cert_file, "tls.cert_file"))
    root = read_pem(tls.client_ca_file, "tls.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=tls.require_client_auth)


def channel_credentials(
    ca_file: Path | str | None = None, cert_file: Path | str | None = None, key_file: Path | str | None = None,
    *, prefix: str = "",
) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust `ca_file` (None = system roots), present `cert_file`/`key_file` if given.

    Args:
        prefix: setting name prefix for error messages (e.g. 'encoder_tls.').

    Raises:
        TlsConfigError: a file is missing or not PEM, or only one of cert_file / key_file is given.
    """
    if (cert_file is None) != (key_file is None):
        raise TlsConfigError(f"{prefix}cert_file and {prefix}key_file must be given together")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, f"{prefix}ca_file") if ca_file else None,
        private_key=read_pem(key_file, f"{prefix}key_file") if key_file else None,
        certificate_chain=read_pem(cert_file, f"{prefix}cert_file") if cert_file else None,
    )


def client_channel_credentials(tls: ClientTlsSettings, prefix: str = "") -> grpc.ChannelCredentials | None:
    """Channel credentials for a dependency, or None when `tls.enabled` is false. Raises TlsConfigError."""
    if not tls.enabled:
        return None
    return channel_credentials(tls.ca_file, tls.cert_file, tls.key_file, prefix=prefix)


def milvus_tls_kwargs(tls: ClientTlsSettings) -> dict[str, Any]:
    """pymilvus 3.0.2 `MilvusClient(**kwargs)` TLS arguments for `tls` ({} when off).

    pymilvus reads `server_pem_path` for one-way TLS and `ca_pem_path` + `client_pem_path` + `client_key_path`
    for mutual TLS (pymilvus/client/grpc_handler.py, `_setup_grpc_channel`). Files are checked here so a bad path
    fails at startup with the setting's name.

    Raises:
        TlsConfigError: a file is missing or not PEM; mutual TLS without ca_file (pymilvus needs all three).
    """
    if not tls.enabled:
        return {}
    kwargs: dict[str, Any] = {"secure": True}
    if tls.server_name:
        kwargs["server_name"] = tls.server_name
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if path is not None:
            read_pem(path, f"milvus_tls.{name}")
    if tls.cert_file is not None:
        if tls.ca_file is None:
            raise TlsConfigError("milvus_tls.cert_file (mutual TLS) needs milvus_tls.ca_file: pymilvus requires it")
        kwargs.update(ca_pem_path=str(tls.ca_file), client_pem_path=str(tls.cert_file),
                      client_key_path=str(tls.key_file))
    elif tls.ca_file is not None:
        kwargs["server_pem_path"] = str(tls.ca_file)
    return kwargs
