"""Small input bugs, each pinned by a test: page tokens whose offset is not a JSON integer, and image headers
above Pillow's own decompression-bomb threshold (~179 MP) refused with Pillow's message instead of the
configured `max_image_pixels`.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from retrieval_service.adapters.milvus import MILVUS_MAX_WINDOW
from retrieval_service.errors import FieldError, ImageRejectedError
from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from retrieval_service.usecases.pagination import decode_page_token, encode_page_token, query_fingerprint
from retrieval_service.usecases.preprocess import ImageLimits, decode_image, image_format
from stack_helpers import SERVING, wait_health
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

FP = query_fingerprint("text", "seven", "", None)
#: "exceeds limit of 178956970 pixels": Pillow's default DecompressionBombError message
PILLOW_LIMIT = str(2 * 89_478_485)


def token_of(raw: str) -> str:
    """A page token carrying the JSON text `raw` (the encoding `encode_page_token` uses)."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


# --- page tokens --------------------------------------------------------------------------------------------

def test_a_page_token_round_trips():
    assert decode_page_token("", FP) == 0
    assert decode_page_token(encode_page_token(5, FP), FP) == 5
    assert decode_page_token(token_of(json.dumps({"o": 0, "q": FP})), FP) == 0


@pytest.mark.parametrize("offset", ["true", "false", '"5"', "2.5", "5.0", "1e400", "-1e400", "null", "[1]",
                                    '{"n": 1}'])
def test_a_page_token_offset_must_be_a_json_integer(offset):
    """Before: true -> 1, "5" -> 5, 2.5 -> 2 were accepted (int() of anything int-like)."""
    with pytest.raises(FieldError) as info:
        decode_page_token(token_of(f'{{"o": {offset}, "q": "{FP}"}}'), FP)
    assert info.value.field == "page_token"
    assert "malformed" in str(info.value)


@pytest.mark.parametrize("offset", [-1, MILVUS_MAX_WINDOW, 10**30])
def test_a_page_token_offset_must_be_in_the_window(offset):
    with pytest.raises(FieldError, match="out of range") as info:
        decode_page_token(token_of(json.dumps({"o": offset, "q": FP})), FP)
    assert info.value.field == "page_token"


def test_a_page_token_fingerprint_must_be_a_string():
    numeric = "123456"
    assert decode_page_token(encode_page_token(3, numeric), numeric) == 3
    for owner in ("123456", "true", "null", "[1]"):  # str(123456) == "123456" was accepted before
        with pytest.raises(FieldError, match="malformed"):
            decode_page_token(token_of(f'{{"o": 3, "q": {owner}}}'), numeric)
    with pytest.raises(FieldError, match="different query"):
        decode_page_token(encode_page_token(3, "another"), numeric)


@pytest.mark.parametrize("raw", ["", "[]", "3", '"x"', '{"o": 1}', '{"q": "x"}', "[" * 100_000, "{" * 50])
def test_malformed_page_tokens_are_field_errors(raw):
    with pytest.raises(FieldError, match="malformed") as info:
        decode_page_token(token_of(raw) or "=", FP)
    assert info.value.field == "page_token"


# --- image headers above Pillow's threshold -----------------------------------------------------------------

def png_with_size(width: int, height: int) -> bytes:
    """A real 8x8 grayscale PNG whose IHDR claims width x height (CRC recomputed, pixel data unchanged): the
    bytes of a huge image without its pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    return bytes(png)


def gif_with_screen(width: int, height: int) -> bytes:
    """A real 1x1 GIF whose logical screen claims width x height."""
    buf = io.BytesIO()
    Image.new("L", (1, 1), 7).save(buf, format="GIF")
    gif = bytearray(buf.getvalue())
    assert gif[:6] in (b"GIF87a", b"GIF89a")
    gif[6:10] = struct.pack("<HH", width, height)
    return bytes(gif)


def gif_with_frame(width: int, height: int) -> bytes:
    """A 1x1-screen GIF whose first frame descriptor claims width x height (Pillow grows the image to the
    frame while reading the header, and its guard fires inside the GIF plugin itself)."""
    gif = bytearray(gif_with_screen(1, 1))
    at = gif.index(b",")  # the image descriptor: ',' x0 y0 w h flags
    gif[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(gif)


def rejection(data: bytes, max_pixels: int) -> ImageRejectedError:
    with pytest.raises(ImageRejectedError) as info:
        decode_image(data, ImageLimits(max_pixels=max_pixels))
    return info.value


@pytest.mark.parametrize("make", [png_with_size, gif_with_screen, gif_with_frame])
def test_a_header_above_pillows_threshold_is_refused_by_the_configured_limit(make):
    error = rejection(make(20_000, 20_000), max_pixels=40_000_000)
    assert error.reason == "too_many_pixels"
    message = str(error)
    assert "400000000" in message and "40000000" in message, message  # the image's pixels and the limit
    assert PILLOW_LIMIT not in message, message


def test_a_configured_limit_above_pillows_threshold_is_honoured(monkeypatch):
    # Pillow's guard lowered to 2 MP so the test needs no large image: a 1500 x 1500 (2.25 MP) header
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(Image.DecompressionBombError):  # what Pillow alone does with it
        Image.open(io.BytesIO(gif_with_screen(1500, 1500)))
    image = decode_image(gif_with_screen(1500, 1500), ImageLimits(max_pixels=3_000_000))
    assert image.size == (1500, 1500) and image.mode == "RGB"
    assert image_format(gif_with_screen(1500, 1500)) == "image/gif"
    # the PNG header passes too; its 8x8 payload then fails as truncated, proving the header check let it by
    assert rejection(png_with_size(1500, 1500), max_pixels=3_000_000).reason == "undecodable"
    error = rejection(png_with_size(1500, 1500), max_pixels=2_000_000)
    assert error.reason == "too_many_pixels" and "2250000" in str(error) and "2000000" in str(error)


# --- the same through SearchImages over gRPC ----------------------------------------------------------------

def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def error_details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo reason, BadRequest fields) of a failed call."""
    reason, fields = "", []
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return reason, fields


@pytest.mark.asyncio(loop_scope="session")
async def test_search_images_refuses_bad_tokens_and_huge_headers_as_invalid_argument(
        demo, encoder_server, tmp_path):
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=str(tmp_path / "milvus.db"), blob_dir=tmp_path / "blobs", port=0,
                        health_interval_s=0.2, max_image_pixels=40_000_000)
    server = create_server(settings)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        await wait_health(target, SERVING, 120)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            async def images():
                for i, color in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
                    yield pb.IngestImagesRequest(index=i, content=png(color))

            outcomes = [r.outcome async for r in stub.IngestImages(images())]
            assert outcomes == [pb.IngestImagesResponse.INSERTED] * 3
            first = await stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=1))
            assert first.next_page_token
            data = json.loads(base64.urlsafe_b64decode(first.next_page_token + "=" * 4))
            second = await stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=1,
                                                                    page_token=first.next_page_token))
            assert second.results[0].image.image_id != first.results[0].image.image_id
            for offset in (True, "1", 1.5, 1.0):
                forged = token_of(json.dumps({"o": offset, "q": data["q"]}))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=1, page_token=forged))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (offset, info.value.details())
                assert error_details(info.value)[1] == ["page_token"]

            for bomb in (png_with_size(20_000, 20_000), gif_with_screen(20_000, 20_000)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SearchImages(pb.SearchImagesRequest(image=bomb, top_k=1))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                details = info.value.details()
                assert "400000000" in details and "40000000" in details, details
                assert PILLOW_LIMIT not in details, details
                assert error_details(info.value)[0] == "IMAGE_TOO_MANY_PIXELS"
    finally:
        await server.stop(grace_s=1)
