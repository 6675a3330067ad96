"""Fuzz every RPC with hypothesis against one running service (`vitrine serve` as a child process, real Triton,
Milvus Lite): random bytes, truncated PNG/JPEG, decompression-bomb headers, odd images, empty/huge/odd-unicode
text, bad filters, extreme top_k / min_score / page_token / rerank, bad ids, odd ingest metadata and filenames.

Only OK, INVALID_ARGUMENT, or NOT_FOUND for a request naming a missing id may come back; IngestImages answers
every item (REJECTED items carry INVALID_ARGUMENT) and never fails the stream; the server stays SERVING; search,
get and bad deletes leave the stored count unchanged. Requests fuzzed and statuses by code are printed on a
`FIGURES` line (`pytest -s`).
"""

from __future__ import annotations

import base64
import collections
import io
import json
import math
import struct
import zlib

import grpc
import pytest
from google.rpc import code_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stack_helpers import SERVING, png_bytes, start_service, unique_images, wait_health_sync
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

Outcome = pb.IngestImagesResponse.Outcome
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])
STATUSES: collections.Counter = collections.Counter()  # (rpc, code name) -> count, for the FIGURES line
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


# --- the service under test -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_target(demo, encoder_server, tmp_path_factory):
    """(stub, stored ids) of a running service holding 12 demo digits."""
    tmp = tmp_path_factory.mktemp("fuzz")
    svc = start_service(demo.repository, encoder_server.grpc_url, str(tmp / "m.db"), tmp / "blobs", tmp)
    try:
        with grpc.insecure_channel(svc.target, options=[("grpc.max_send_message_length", 64 << 20),
                                                        ("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.RetrievalServiceStub(ch)
            items = unique_images(demo, 12)
            reqs = []
            for i, (content, filename, meta) in enumerate(items):
                req = pb.IngestImagesRequest(index=i, content=content, filename=filename)
                req.metadata.update(meta)
                reqs.append(req)
            answers = list(stub.IngestImages(iter(reqs)))
            assert {a.outcome for a in answers} == {Outcome.INSERTED}
            yield stub, [a.image_id for a in answers]
            wait_health_sync(svc.target, SERVING, timeout_s=10)  # still up and healthy after all of it
        total = sum(STATUSES.values())
        by_code: dict[str, int] = collections.Counter()
        for (_, code), n in STATUSES.items():
            by_code[code] += n
        print("FIGURES", json.dumps({"test": "fuzz_total", "requests_fuzzed": total, "by_code": by_code,
                                     "by_rpc": {f"{r}:{c}": n for (r, c), n in sorted(STATUSES.items())}}))
    finally:
        assert svc.child.stop() == 0, svc.child.tail()


def call(rpc: str, fn, request, allowed=ALLOWED):  # noqa: ANN001
    """Make one unary call; record and check its status; return the response or None."""
    try:
        response = fn(request, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        response, code = None, exc.code()
        assert code in allowed, f"{rpc} answered {code.name}: {exc.details()}"
    STATUSES[(rpc, code.name)] += 1
    return response


def stored_count(stub) -> int:  # noqa: ANN001
    return stub.GetCollectionStats(pb.GetCollectionStatsRequest(), timeout=30).image_count


# --- strategies ---------------------------------------------------------------------------------------------------

# Any Unicode scalar value protobuf strings can carry (no surrogates), odd ones on purpose.
ODD_CHARS = st.characters(blacklist_categories=("Cs",))
TEXTS = st.one_of(
    st.text(ODD_CHARS, max_size=60),
    st.text(ODD_CHARS, min_size=950, max_size=1100),  # around max_text_chars (1000)
    st.sampled_from(["", " ", "\t\n", "\x00", "\u200b\u200d\ufeff", "手写数字七", "\U0001F600" * 300,
                     "a\u0301" * 600, "\U0010FFFF", "x" * 100_000]),
)
SMALL_INTS = st.integers(-3, 20)
INT32 = st.integers(-(2**31), 2**31 - 1)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb when huge) with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def encoded(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    """A valid `fmt` file of a solid `mode` image (b"" when Pillow cannot write that mode in that format)."""
    img = Image.new(mode, size, seed % 256 if mode in ("L", "P", "1", "I;16") else None)
    if mode in ("RGB", "RGBA", "CMYK"):
        img = Image.new(mode, size, tuple((seed * (i + 3)) % 256 for i in range(len(mode))))
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError):
        return b""
    return buf.getvalue()


_BASE_PNG = png_bytes(Image.radial_gradient("L").resize((48, 48)).convert("RGB"))
_BASE_JPEG = encoded("JPEG", "RGB", (64, 48), 7)

VALID_IMAGES = st.builds(
    encoded,
    st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]),
    st.sampled_from(["RGB", "L", "RGBA", "P", "1"]),
    st.tuples(st.sampled_from([1, 2, 3, 31, 32, 33, 500]), st.sampled_from([1, 2, 7, 32, 64, 999])),
    st.integers(0, 10_000),
).filter(lambda b: len(b) > 0)
IMAGES = st.one_of(
    st.binary(max_size=4096),
    st.integers(0, len(_BASE_PNG) - 1).map(lambda n: _BASE_PNG[:n]),  # truncated PNG
    st.integers(0, len(_BASE_JPEG) - 1).map(lambda n: _BASE_JPEG[:n]),  # truncated JPEG
    st.tuples(st.sampled_from([_BASE_PNG, _BASE_JPEG]), st.integers(0, 10_000), st.integers(0, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]),  # one byte changed
    st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda wh: bomb_png(*wh)),
    st.sampled_from([bomb_png(100_000, 100_000), bomb_png(7000, 7000), bomb_png(1, 2**31 - 1),
                     encoded("JPEG", "CMYK", (16, 16), 3), encoded("PNG", "I;16", (16, 16), 9),
                     png_bytes(Image.new("L", (1, 2_000_000))), png_bytes(Image.new("L", (2_000_000, 1))),
                     b"GIF89a", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBP"]),
    VALID_IMAGES,
)
HEX_IDS = st.text("0123456789abcdef", min_size=64, max_size=64)
IDS = st.one_of(HEX_IDS, st.text(ODD_CHARS, max_size=80), st.text("0123456789abcdefABCDEF", min_size=63, max_size=65))
FILTERS = st.one_of(
    st.just(""),
    st.text(ODD_CHARS, max_size=80),
    st.sampled_from([
        'metadata["label"] == 3', 'filename like "orig_%"', "ingest_time > 0", 'metadata["label"] in [1, 2]',
        "metadata[", "label == 3", "nosuch == 1", "id in [", '"', "((((", "embedding == 1", "1", "true",
        'metadata["label"] == 3 or', "ingest_time > 99999999999999999999999999", "json_contains(metadata, 1)",
        'id != "" or 1 == 1', "count(*) > 0", "metadata['label'] == 3; drop collection", "\x00",
        "ingest_time / 0 > 1", 'filename like "%' + "%" * 500 + '"', "not " * 200 + "true",
    ]),
    st.builds(lambda field, op, value: f"{field} {op} {value}",
              st.sampled_from(["id", "filename", "ingest_time", 'metadata["label"]', "metadata", "other", "$meta"]),
              st.sampled_from(["==", "!=", ">", "<=", "like", "in", "+", "&&", "%"]),
              st.one_of(st.integers().map(str), st.floats().map(str), st.text(ODD_CHARS, max_size=12).map(json.dumps),
                        st.just("[]"), st.just("[1, 2"))),
)


def _token(offset: object, owner: object) -> str:
    raw = json.dumps({"o": offset, "q": owner}, allow_nan=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


PAGE_TOKENS = st.one_of(
    st.just(""),
    st.text(ODD_CHARS, max_size=60),
    st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.builds(_token, st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.none(), st.lists(st.integers())),
              st.one_of(st.text(max_size=30), st.integers())),
)
FLOATS32 = st.floats(width=32)
RERANKS = st.one_of(
    st.none(),
    st.builds(lambda m, n, lam: pb.RerankOptions(method=m, top_n=n, **({} if lam is None else {"mmr_lambda": lam})),
              st.integers(0, 6), st.one_of(SMALL_INTS, INT32), st.one_of(st.none(), FLOATS32)),
)


@st.composite
def search_requests(draw) -> pb.SearchImagesRequest:
    req = pb.SearchImagesRequest(top_k=draw(st.one_of(SMALL_INTS, INT32, st.just(1000), st.just(1001))),
                                 filter=draw(FILTERS), page_token=draw(PAGE_TOKENS))
    kind = draw(st.sampled_from(["text", "text", "image", "image_id", "none"]))
    if kind == "text":
        req.text = draw(TEXTS)
    elif kind == "image":
        req.image = draw(IMAGES)
    elif kind == "image_id":
        req.image_id = draw(IDS)
    score = draw(st.one_of(st.none(), FLOATS32))
    if score is not None:
        req.min_score = score
    rerank = draw(RERANKS)
    if rerank is not None:
        req.rerank.CopyFrom(rerank)
    return req


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**70), 2**70),
                        st.text(ODD_CHARS, max_size=30))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(ODD_CHARS, max_size=10), inner, max_size=4)), max_leaves=12)


def _deep(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"d": value}
    return value


METADATA = st.one_of(
    st.none(),
    st.dictionaries(st.text(ODD_CHARS, max_size=20), JSON_VALUES, max_size=6),
    # Deeper than ~30 levels a Struct exceeds protobuf's decoder recursion limit (100 message levels): gRPC then
    # fails the call before the service sees it (UNKNOWN, 'Error parsing message'); see the report.
    st.integers(1, 25).map(_deep),
    st.sampled_from([{"big": "x" * 70_000}, {"label": float("nan")}, {"label": float("inf")}, {"": ""},
                     {"k" * 5000: 1}, {"list": list(range(10_000))}]),
)
FILENAMES = st.one_of(st.text(ODD_CHARS, max_size=40), st.sampled_from(["", "a" * 1024, "a" * 1025, "七" * 400,
                                                                          "七" * 1024, "../../etc/passwd", "\x00"]))


@st.composite
def ingest_items(draw, index: int) -> pb.IngestImagesRequest:
    req = pb.IngestImagesRequest(index=draw(st.one_of(st.just(index), st.integers(-(2**63), 2**63 - 1))),
                                 content=draw(IMAGES), filename=draw(FILENAMES))
    meta = draw(METADATA)
    if meta is not None:
        req.metadata.update(meta)
    return req


# --- the fuzz tests -------------------------------------------------------------------------------------------------

def test_fuzz_search(fuzz_target):
    stub, _ = fuzz_target
    before = stored_count(stub)

    @settings(FUZZ, max_examples=1500)
    @given(search_requests())
    def run(req: pb.SearchImagesRequest) -> None:
        allowed = ALLOWED | ({grpc.StatusCode.NOT_FOUND} if req.WhichOneof("query") == "image_id" else set())
        resp = call("SearchImages", stub.SearchImages, req, allowed)
        if resp is not None:
            assert len(resp.results) <= (req.top_k or 10)
            scores = [r.score for r in resp.results]
            assert all(math.isfinite(s) and -1.0001 <= s <= 1.0001 for s in scores), scores
            assert scores == sorted(scores, reverse=True) or req.rerank.method == pb.RerankOptions.MMR

    run()
    assert stored_count(stub) == before


def test_fuzz_search_by_stored_id_and_pages(fuzz_target):
    """Valid queries with random pagination: follow next_page_token until the end; pages never overlap."""
    stub, ids = fuzz_target
    before = stored_count(stub)

    @settings(FUZZ, max_examples=150)
    @given(st.sampled_from(ids), st.integers(1, 5), st.one_of(st.just(""), FILTERS))
    def run(image_id: str, top_k: int, filter_expr: str) -> None:
        seen: list[str] = []
        token = ""
        for _ in range(20):
            resp = call("SearchImages", stub.SearchImages,
                        pb.SearchImagesRequest(image_id=image_id, top_k=top_k, filter=filter_expr, page_token=token))
            if resp is None:
                return
            seen.extend(r.image.image_id for r in resp.results)
            token = resp.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)), "pages overlap"

    run()
    assert stored_count(stub) == before


def test_fuzz_get_and_delete(fuzz_target):
    stub, _ = fuzz_target
    before = stored_count(stub)
    missing_ok = ALLOWED | {grpc.StatusCode.NOT_FOUND}
    bad_filters = st.one_of(st.sampled_from(["metadata[", "nosuch == 1", "((((", "label == 3", '"', "\x00",
                                             'metadata["label"] == 123456']),
                            st.text(ODD_CHARS, max_size=40).map(lambda t: "(" + t))  # never balanced

    @settings(FUZZ, max_examples=400)
    @given(IDS, st.lists(IDS, max_size=5), bad_filters, st.booleans())
    def run(image_id: str, delete_ids: list[str], filter_expr: str, by_filter: bool) -> None:
        call("GetImage", stub.GetImage, pb.GetImageRequest(image_id=image_id), missing_ok)
        req = pb.DeleteImagesRequest(filter=filter_expr) if by_filter else pb.DeleteImagesRequest(image_ids=delete_ids)
        resp = call("DeleteImages", stub.DeleteImages, req)
        if resp is not None:
            assert resp.deleted_count == 0  # nothing fuzzed names a stored image

    run()
    assert stored_count(stub) == before


def test_fuzz_ingest(fuzz_target):
    stub, _ = fuzz_target
    items_seen = collections.Counter()

    @settings(FUZZ, max_examples=300)
    @given(st.integers(1, 4).flatmap(lambda n: st.tuples(*[ingest_items(i) for i in range(n)])))
    def run(reqs: tuple[pb.IngestImagesRequest, ...]) -> None:
        try:
            answers = list(stub.IngestImages(iter(reqs), timeout=60))
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            STATUSES[("IngestImages", code.name)] += 1
            raise AssertionError(f"the ingest stream failed: {code.name}: {exc.details()}") from exc
        STATUSES[("IngestImages", code.name)] += 1
        assert sorted(a.index for a in answers) == sorted(r.index for r in reqs), "every item answered once"
        for a in answers:
            if a.outcome == Outcome.REJECTED:
                assert a.error.code == code_pb2.INVALID_ARGUMENT, a.error
                items_seen["REJECTED_INVALID_ARGUMENT"] += 1
            else:
                assert a.outcome in (Outcome.INSERTED, Outcome.ALREADY_PRESENT), a
                items_seen[Outcome.Name(a.outcome)] += 1

    run()
    print("FIGURES", json.dumps({"test": "fuzz_ingest_items", **items_seen}))
