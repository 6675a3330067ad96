"""Security of the retrieval service over real gRPC on loopback: TLS and mutual TLS (certificates made here with
`cryptography`), bearer-token auth on every RPC (health and reflection open, tokens never logged), the concurrent
RPC limit, request limits (decompression bombs refused from the header) and filter validation end to end."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import io
import logging
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

from retrieval_service.grpc.auth import TokenAuthInterceptor
from retrieval_service.settings import AuthSettings
from retrieval_service.errors import ImageRejectedError
from retrieval_service.usecases.preprocess import ImageLimits, decode_image
from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from retrieval_service.tls import ClientTlsSettings, ServerTlsSettings, TlsConfigError, milvus_tls_kwargs
from retrieval_service.adapters.triton.channel import TritonChannel
from vitrine.client import VitrineClient
from tools.processes import free_port
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

Outcome = pb.IngestImagesResponse.Outcome
TOKEN = secrets.token_hex(32)
FILE_TOKEN = secrets.token_urlsafe(32)
WRONG_TOKEN = secrets.token_hex(32)


# --- certificates --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key=None) -> tuple[Path, Path | None]:
    cert_path = folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = folder / f"{name}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "rogue", "rogue_client")}
    ca, _ = _write(folder, "ca", _cert("Vitrine test CA", keys["ca"], "Vitrine test CA", keys["ca"], ca=True))
    server = _write(folder, "server", _cert("127.0.0.1", keys["server"], "Vitrine test CA", keys["ca"], server=True),
                    keys["server"])
    client = _write(folder, "client", _cert("client", keys["client"], "Vitrine test CA", keys["ca"]), keys["client"])
    rogue, _ = _write(folder, "rogue", _cert("Rogue CA", keys["rogue"], "Rogue CA", keys["rogue"], ca=True))
    rogue_client = _write(folder, "rogue_client",
                          _cert("client", keys["rogue_client"], "Rogue CA", keys["rogue"]), keys["rogue_client"])
    return Pki(ca, server[0], server[1], client[0], client[1], rogue, rogue_client[0], rogue_client[1])


def _creds(pki: Pki, *, ca: Path | None = None, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )


# --- helpers -------------------------------------------------------------------------------------------------

def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose IHDR claims width x height RGB pixels (30 GB decoded); its IDAT is one empty row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def base_settings(demo, folder: Path, encoder_url: str | None = None, **overrides) -> Settings:
    return Settings(model_repository=demo.repository, encoder_url=encoder_url or f"127.0.0.1:{free_port()}",
                    milvus_uri=str(folder / "milvus.db"), blob_dir=folder / "blobs", port=0, health_interval_s=2,
                    encoder_timeout_s=5, **overrides)


async def stored(server) -> int:
    """Rows in the server's collection (Strong count, straight from Milvus)."""
    return await asyncio.to_thread(server.store.count)


async def health_check(channel: grpc.aio.Channel, **kwargs) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10,
                                                            **kwargs)).status


async def expect_code(call, code: grpc.StatusCode, *needles: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for needle in needles:
        assert needle in (info.value.details() or ""), info.value.details()
    return info.value


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture(scope="module")
def log_lines():
    """Every log record of this module's servers, at DEBUG, formatted (message, args and tracebacks)."""
    handler = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(old_level)


# --- bearer-token auth -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def auth_server(demo, encoder_server, tmp_path_factory, log_lines):
    folder = tmp_path_factory.mktemp("auth")
    tokens_file = folder / "tokens.txt"
    tokens_file.write_text(f"# service tokens\n\n{FILE_TOKEN}\n")
    settings = base_settings(demo, folder, encoder_server.grpc_url,
                             auth=AuthSettings(tokens=[TOKEN], tokens_file=tokens_file))
    server = create_server(settings)
    await server.start()
    yield server
    await server.stop(grace_s=1)


@pytest.fixture(scope="module")
async def auth_channel(auth_server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{auth_server.port}") as channel:
        yield channel


def _calls(stub: pb_grpc.RetrievalServiceStub, metadata):
    """One call of every RPC (unary, client-, server- and bidi-streaming), as awaitables ending in a status."""

    async def ingest():
        async def requests():
            yield pb.IngestImagesRequest(index=0, content=png_bytes((1, 2, 3)), filename="x.png")
        return [r async for r in stub.IngestImages(requests(), metadata=metadata)]

    async def generate():
        return [r async for r in stub.GenerateImages(pb.GenerateImagesRequest(prompt="a cape"), metadata=metadata)]

    return {
        "SearchImages": stub.SearchImages(pb.SearchImagesRequest(text="seven"), metadata=metadata),
        "GetImage": stub.GetImage(pb.GetImageRequest(image_id="0" * 64), metadata=metadata),
        "DeleteImages": stub.DeleteImages(pb.DeleteImagesRequest(filter='filename == "none"'), metadata=metadata),
        "GetCollectionStats": stub.GetCollectionStats(pb.GetCollectionStatsRequest(), metadata=metadata),
        "IngestImages": ingest(),
        "GenerateImages": generate(),
    }


@pytest.mark.parametrize("metadata,needle", [
    (None, "missing 'authorization: Bearer <token>'"),
    ((("authorization", f"Bearer {WRONG_TOKEN}"),), "invalid bearer token"),
    ((("authorization", f"Basic {TOKEN}"),), "must be 'Bearer <token>'"),
    ((("authorization", "Bearer"),), "must be 'Bearer <token>'"),
    ((("authorization", f"Bearer {TOKEN[:-1]}"),), "invalid bearer token"),
])
async def test_every_rpc_without_a_valid_token_is_unauthenticated(auth_server, auth_channel, metadata, needle):
    before = await stored(auth_server)
    stub = pb_grpc.RetrievalServiceStub(auth_channel)
    for name, call in _calls(stub, metadata).items():
        err = await expect_code(call, grpc.StatusCode.UNAUTHENTICATED, needle, name)
        assert TOKEN not in err.details() and WRONG_TOKEN not in err.details()
    assert await stored(auth_server) == before  # the ingest never ran


async def test_valid_tokens_pass_on_every_rpc(auth_server, auth_channel):
    stub = pb_grpc.RetrievalServiceStub(auth_channel)
    for token in (TOKEN, FILE_TOKEN):
        calls = _calls(stub, (("authorization", f"Bearer {token}"),))
        results: dict[str, object] = {}
        for name, call in calls.items():
            try:
                results[name] = await call
            except grpc.aio.AioRpcError as exc:
                results[name] = exc.code()
        assert isinstance(results["SearchImages"], pb.SearchImagesResponse)
        assert results["GetImage"] == grpc.StatusCode.NOT_FOUND  # past auth: the handler answered
        assert isinstance(results["DeleteImages"], pb.DeleteImagesResponse)
        assert isinstance(results["GetCollectionStats"], pb.GetCollectionStatsResponse)
        assert [r.outcome for r in results["IngestImages"]] in ([Outcome.INSERTED], [Outcome.ALREADY_PRESENT])
        assert results["GenerateImages"] == grpc.StatusCode.FAILED_PRECONDITION  # no Gemini key: past auth


async def test_health_and_reflection_stay_open(auth_channel):
    assert await health_check(auth_channel) in (health_pb2.HealthCheckResponse.SERVING,
                                                health_pb2.HealthCheckResponse.NOT_SERVING)
    stub = reflection_pb2_grpc.ServerReflectionStub(auth_channel)

    async def one():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    responses = [r async for r in stub.ServerReflectionInfo(one())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert "vitrine.v1.RetrievalService" in names


async def test_vitrine_client_sends_the_token(auth_server, monkeypatch):
    target = f"127.0.0.1:{auth_server.port}"

    def stats(**kwargs) -> int:
        with VitrineClient(target, **kwargs) as client:
            return client.stats().image_count

    assert await asyncio.to_thread(stats, token=TOKEN) >= 0
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(stats)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.setenv("VITRINE_TOKEN", FILE_TOKEN)  # what `vitrine --token` / env VITRINE_TOKEN set
    assert await asyncio.to_thread(stats) >= 0


def test_auth_settings_refuse_weak_tokens(tmp_path):
    with pytest.raises(ValueError, match="at least 32 characters"):
        AuthSettings(tokens=["short"]).load_tokens()
    bad = tmp_path / "tokens.txt"
    bad.write_text(f"{TOKEN}\nhas space {TOKEN}\n")
    with pytest.raises(ValueError, match=r"tokens.txt:2") as info:
        AuthSettings(tokens_file=bad).load_tokens()
    assert TOKEN not in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        AuthSettings(tokens_file=tmp_path / "missing.txt").load_tokens()
    assert TokenAuthInterceptor.from_settings(AuthSettings()) is None  # nothing configured: open server


# --- request limits and filters, end to end --------------------------------------------------------------------

def test_decompression_bomb_is_refused_from_its_header():
    bomb = png_header_bomb()
    assert len(bomb) < 100
    with pytest.raises(ImageRejectedError) as info:
        decode_image(bomb, ImageLimits(max_pixels=40_000_000))
    # 'too_many_pixels', not 'undecodable': the size was refused before the (bogus) pixel data was read
    assert info.value.reason == "too_many_pixels"
    small = png_header_bomb(8000, 8000)  # 64 MP: under Pillow's own bomb limit, over ours
    with pytest.raises(ImageRejectedError) as info:
        decode_image(small, ImageLimits(max_pixels=40_000_000))
    assert info.value.reason == "too_many_pixels" and "8000x8000" in str(info.value)


async def test_request_limits_over_grpc(auth_server, auth_channel):
    stub = pb_grpc.RetrievalServiceStub(auth_channel)
    md = (("authorization", f"Bearer {TOKEN}"),)
    s = auth_server.settings
    await expect_code(stub.SearchImages(pb.SearchImagesRequest(image=png_header_bomb()), metadata=md),
                      grpc.StatusCode.INVALID_ARGUMENT, "pixels")
    await expect_code(stub.SearchImages(pb.SearchImagesRequest(text="x" * (s.max_text_chars + 1)), metadata=md),
                      grpc.StatusCode.INVALID_ARGUMENT, "characters")
    await expect_code(stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=s.max_top_k + 1), metadata=md),
                      grpc.StatusCode.INVALID_ARGUMENT, "top_k")

    async def bomb():
        yield pb.IngestImagesRequest(index=0, content=png_header_bomb(), filename="bomb.png")

    (resp,) = [r async for r in stub.IngestImages(bomb(), metadata=md)]
    assert resp.outcome == Outcome.REJECTED and "pixels" in resp.error.message


@pytest.mark.parametrize("expr,token,position", [
    ("embedding == 1", "embedding", 0),
    ('json_contains(metadata["tags"], "x")', "json_contains", 0),
    ('metadata["label"] == 1 or other_collection.id == "a"', "other_collection", 26),
    ('filename == "a" ; drop', ";", 16),
])
async def test_bad_filters_are_invalid_argument_naming_the_token(auth_server, auth_channel, expr, token, position):
    stub = pb_grpc.RetrievalServiceStub(auth_channel)
    md = (("authorization", f"Bearer {TOKEN}"),)
    before = await stored(auth_server)
    needle = f"{token!r} at position {position}"
    await expect_code(stub.SearchImages(pb.SearchImagesRequest(text="seven", filter=expr), metadata=md),
                      grpc.StatusCode.INVALID_ARGUMENT, needle)
    await expect_code(stub.DeleteImages(pb.DeleteImagesRequest(filter=expr), metadata=md),
                      grpc.StatusCode.INVALID_ARGUMENT, needle)
    assert await stored(auth_server) == before


async def test_in_on_metadata_works_end_to_end(auth_server, auth_channel):
    stub = pb_grpc.RetrievalServiceStub(auth_channel)
    md = (("authorization", f"Bearer {TOKEN}"),)

    async def requests():
        for i in range(6):
            req = pb.IngestImagesRequest(index=i, content=png_bytes((40 * i, 255 - 30 * i, 7)), filename=f"c{i}.png")
            req.metadata.update({"label": 200 + i % 3})
            yield req

    assert {r.outcome for r in [r async for r in stub.IngestImages(requests(), metadata=md)]} <= {
        Outcome.INSERTED, Outcome.ALREADY_PRESENT}
    resp = await stub.SearchImages(pb.SearchImagesRequest(text="a colour", top_k=20,
                                                          filter='metadata["label"] in [200, 202]'), metadata=md)
    labels = sorted(int(r.image.metadata["label"]) for r in resp.results)
    assert labels == [200, 200, 202, 202]


async def test_tokens_never_reach_the_logs(auth_server, log_lines):
    text = "\n".join(log_lines)
    assert "security: transport=PLAINTEXT auth=bearer token (2 accepted)" in text
    assert "unauthenticated call to /vitrine.v1.RetrievalService/SearchImages: invalid bearer token" in text
    for secret in (TOKEN, FILE_TOKEN, WRONG_TOKEN, TOKEN[:-1]):
        assert secret not in text
    assert TOKEN not in repr(auth_server.settings) and TOKEN not in str(auth_server.settings.model_dump())


# --- concurrent RPC limit --------------------------------------------------------------------------------------

async def test_concurrent_rpcs_beyond_the_limit_get_resource_exhausted(demo, tmp_path, log_lines):
    server = create_server(base_settings(demo, tmp_path, max_concurrent_rpcs=2))
    await server.start()
    try:
        assert any("auth=NONE (open" in line for line in log_lines)  # an open server says so
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            release = asyncio.Event()

            async def held_open():
                yield pb.IngestImagesRequest(index=0, content=b"not an image", filename="x")
                await release.wait()

            streams = [stub.IngestImages(held_open()) for _ in range(2)]
            for stream in streams:  # each stream answered its first item: both are running on the server
                assert (await stream.read()).outcome == Outcome.REJECTED
            await expect_code(stub.GetCollectionStats(pb.GetCollectionStatsRequest()),
                              grpc.StatusCode.RESOURCE_EXHAUSTED)
            await expect_code(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()),
                              grpc.StatusCode.RESOURCE_EXHAUSTED)
            release.set()
            for stream in streams:
                assert await stream.code() == grpc.StatusCode.OK
            stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())  # the slots are free again
            assert stats.image_count == 0
    finally:
        await server.stop(grace_s=1)


# --- TLS -------------------------------------------------------------------------------------------------------

async def test_tls_server(demo, tmp_path, pki):
    tls = ServerTlsSettings(cert_file=pki.server_cert, key_file=pki.server_key)
    server = create_server(base_settings(demo, tmp_path, tls=tls))
    await server.start()
    try:
        for host in ("127.0.0.1", "localhost"):
            async with grpc.aio.secure_channel(f"{host}:{server.port}", _creds(pki)) as channel:
                await health_check(channel)
                stats = await pb_grpc.RetrievalServiceStub(channel).GetCollectionStats(pb.GetCollectionStatsRequest())
                assert stats.image_count == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # plaintext client
            await expect_code(health_check(channel), grpc.StatusCode.UNAVAILABLE)
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", _creds(pki, ca=pki.rogue_ca)) as channel:
            await expect_code(health_check(channel), grpc.StatusCode.UNAVAILABLE)  # server not trusted

        def stats(**kwargs) -> int:
            with VitrineClient(f"127.0.0.1:{server.port}", **kwargs) as client:
                return client.stats().image_count

        assert await asyncio.to_thread(stats, tls_ca=pki.ca) == 0
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(stats, tls=False)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        # The Triton channel's TLS: tritonclient over TLS reaches this (non-Triton) TLS server, which answers
        # UNIMPLEMENTED; without TLS, or trusting another CA, the handshake fails (UNAVAILABLE).
        async def triton_live(tls_settings: ClientTlsSettings | None) -> str:
            channel = TritonChannel(f"127.0.0.1:{server.port}", tls=tls_settings)
            try:
                await channel._get_client().is_server_live(client_timeout=10)
                return "OK"
            except InferenceServerException as exc:
                return str(exc.status())
            finally:
                await channel.close()

        assert "UNIMPLEMENTED" in await triton_live(ClientTlsSettings(enabled=True, ca_file=pki.ca))
        assert "UNAVAILABLE" in await triton_live(None)
        assert "UNAVAILABLE" in await triton_live(ClientTlsSettings(enabled=True, ca_file=pki.rogue_ca))
    finally:
        await server.stop(grace_s=1)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(demo, tmp_path, pki):
    tls = ServerTlsSettings(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca,
                            require_client_auth=True)
    server = create_server(base_settings(demo, tmp_path, tls=tls))
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        async with grpc.aio.secure_channel(target, _creds(pki, client=(pki.client_cert, pki.client_key))) as ch:
            await health_check(ch)
        async with grpc.aio.secure_channel(target, _creds(pki)) as channel:  # no client certificate
            await expect_code(health_check(channel), grpc.StatusCode.UNAVAILABLE)
        rogue = (pki.rogue_client_cert, pki.rogue_client_key)
        async with grpc.aio.secure_channel(target, _creds(pki, client=rogue)) as channel:
            await expect_code(health_check(channel), grpc.StatusCode.UNAVAILABLE)

        def stats(**kwargs) -> int:
            with VitrineClient(target, **kwargs) as client:
                return client.stats().image_count

        assert await asyncio.to_thread(stats, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) == 0
    finally:
        await server.stop(grace_s=1)


def test_tls_settings_are_checked(demo, tmp_path, pki):
    with pytest.raises(ValueError, match="set together"):
        ServerTlsSettings(cert_file=pki.server_cert)
    with pytest.raises(ValueError, match="require_client_auth needs tls.client_ca_file"):
        ServerTlsSettings(cert_file=pki.server_cert, key_file=pki.server_key, require_client_auth=True)
    with pytest.raises(ValueError, match="enabled is false"):
        ClientTlsSettings(ca_file=pki.ca)
    missing = ServerTlsSettings(cert_file=tmp_path / "nope.pem", key_file=pki.server_key)
    with pytest.raises(TlsConfigError, match="tls.cert_file: cannot read"):
        create_server(base_settings(demo, tmp_path, tls=missing))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(TlsConfigError, match="encoder_tls.ca_file: .* is not a PEM file"):
        create_server(base_settings(demo, tmp_path, encoder_tls=ClientTlsSettings(enabled=True, ca_file=not_pem)))


def test_milvus_tls_arguments(pki):
    assert milvus_tls_kwargs(ClientTlsSettings()) == {}
    assert milvus_tls_kwargs(ClientTlsSettings(enabled=True)) == {"secure": True}
    assert milvus_tls_kwargs(ClientTlsSettings(enabled=True, ca_file=pki.ca, server_name="milvus")) == {
        "secure": True, "server_pem_path": str(pki.ca), "server_name": "milvus"}
    assert milvus_tls_kwargs(ClientTlsSettings(enabled=True, ca_file=pki.ca, cert_file=pki.client_cert,
                                               key_file=pki.client_key)) == {
        "secure": True, "ca_pem_path": str(pki.ca), "client_pem_path": str(pki.client_cert),
        "client_key_path": str(pki.client_key)}
    with pytest.raises(TlsConfigError, match="needs milvus_tls.ca_file"):
        milvus_tls_kwargs(ClientTlsSettings(enabled=True, cert_file=pki.client_cert, key_file=pki.client_key))
