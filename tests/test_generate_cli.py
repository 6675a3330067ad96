"""`tools.generate` (one prompt, plan files, resumable batches) against the real stack: the in-process gRPC
service (real Triton encoder, Milvus Lite) with generation pointed at the local fake Gemini server
(tests/fake_gemini.py), the only stand-in. Plan expansion tests need no server.

The service runs in the session event loop, so the blocking client code runs in a thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from fake_gemini import FakeGemini, RecordedRequest
from PIL import Image

from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from vitrine.client import IngestFile, VitrineClient
from tools.generate import REPORT_COLUMNS, generate_one, run_batch
from tools.generate_plan import load_plan

API_KEY = "test-key-0123456789abcdef"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ID_A, ID_B = "a" * 64, "b" * 64


@dataclass
class Stack:
    target: str
    ids: list[str]  # image ids of `files`, in order
    files: list[IngestFile]


@pytest.fixture(scope="module")
def fake():
    with FakeGemini() as server:
        yield server


@pytest.fixture(scope="module")
async def stack(demo, encoder_server, fake, tmp_path_factory):
    """The service with 20 held-out digits ingested by VitrineClient.ingest, metadata {"label": digit}."""
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=str(tmp_path_factory.mktemp("gencli") / "milvus.db"),
                        blob_dir=tmp_path_factory.mktemp("gencliblobs"), port=0,
                        generation={"api_key": API_KEY, "base_url": fake.base_url, "max_retries": 0})
    server = create_server(settings)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    files = [IngestFile(demo.dataset / item.filename, {"label": item.label}) for item in demo.items[:20]]

    def ingest() -> dict[int, str]:
        with VitrineClient(target) as client:
            return {r.index: r.image_id for r in client.ingest(files)}

    ids = await asyncio.to_thread(ingest)
    yield Stack(target, [ids[i] for i in range(len(files))], files)
    await server.stop(grace_s=1)


def _generate(target: str, prompt: str, **kwargs):
    with VitrineClient(target) as client:
        return generate_one(client, prompt, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# generate_one


async def test_generate_one_writes_png_and_text_and_records_references(stack, fake, tmp_path):
    label, count = Counter(f.metadata["label"] for f in stack.files).most_common(1)[0]
    assert count >= 2
    fake.reset()
    result = await asyncio.to_thread(
        _generate, stack.target, "turn this digit into a neon sign",
        reference_text=f"a handwritten digit {DIGIT_WORDS[label]}", reference_count=2,
        filter=f'metadata["label"] == {label}', options={"seed": 7, "aspect_ratio": "16:9"},
        out_dir=tmp_path, stem="neon")

    assert [p.name for p in result.images] == ["neon_0.png"]
    with Image.open(result.images[0]) as image:
        assert image.format == "PNG" and image.width > image.height  # 16:9 reached the fake
    assert result.text_file == tmp_path / "neon.txt"
    assert result.text_file.read_text() == result.text and "Local fake Gemini" in result.text
    assert result.finish_reason == "STOP" and not result.blocked and result.total_tokens > 0

    by_name = {f.path.name: f for f in stack.files}
    assert len(result.references) == 2
    assert all(by_name[r.filename].metadata["label"] == label for r in result.references)  # filter applied
    assert all(r.image_id in stack.ids and 0 < r.score <= 1 for r in result.references)
    (recorded,) = fake.requests
    assert [data for data, _ in recorded.inline_images] == [by_name[r.filename].path.read_bytes()
                                                            for r in result.references]
    assert recorded.body["generationConfig"]["seed"] == 7


@pytest.mark.parametrize("source", ["ids", "image"])
async def test_generate_one_with_explicit_ids_or_an_image_query(stack, fake, tmp_path, source):
    fake.reset()
    if source == "ids":
        kwargs = {"reference_ids": stack.ids[3:5]}
        expected = stack.ids[3:5]
    else:
        kwargs = {"reference_image": stack.files[6].path.read_bytes()}
        expected = stack.ids[6:7]  # the same bytes: the stored image is the nearest
    result = await asyncio.to_thread(_generate, stack.target, "a poster", out_dir=tmp_path, stem="poster",
                                     **kwargs)
    assert [r.image_id for r in result.references] == expected
    assert len(fake.requests[0].inline_images) == len(expected)
    assert (tmp_path / "poster_0.png").is_file()


async def test_generate_one_raises_the_rpc_status(stack, fake, tmp_path):
    fake.reset()
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(_generate, stack.target, "[fake:status=429] a cape", out_dir=tmp_path,
                                stem="x")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert list(tmp_path.iterdir()) == []


def test_generate_one_rejects_two_reference_sources(tmp_path):
    with VitrineClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="at most one reference"):
        generate_one(client, "x", reference_text="seven", reference_ids=[ID_A], out_dir=tmp_path, stem="x")


# ----------------------------------------------------------------------------------------------------------
# plans


def _write_yaml(path: Path, plan: dict) -> Path:
    path.write_text(yaml.safe_dump(plan, allow_unicode=True, sort_keys=False))
    return path


def test_yaml_plan_expands_rows_times_scenes_in_order(tmp_path):
    (tmp_path / "sketches").mkdir()
    (tmp_path / "sketches" / "lamp.png").write_bytes(b"png")
    plan = load_plan(_write_yaml(tmp_path / "plan.yaml", {
        "prompt_template": "Place {product} in {scene}, studio light",
        "scenes": ["a beach at sunset", "A marble kitchen!", "海滩"],
        "options": {"temperature": 0.4, "seed": 7},
        "filter": 'metadata["label"] == 3',
        "concurrency": 3,
        "rows": [
            {"id": "p1", "product": "red silk cape", "reference_query": "red silk cape",
             "reference_count": 2},
            {"id": 2, "product": "gold watch", "reference_ids": [ID_A, ID_B], "options": {"seed": 9}},
            {"id": "p3", "product": "a lamp", "reference_image": "sketches/lamp.png"},
        ],
    }))
    assert plan.concurrency == 3
    assert [i.key for i in plan.items] == [
        "p1__a-beach-at-sunset", "p1__a-marble-kitchen", "p1__海滩",
        "2__a-beach-at-sunset", "2__a-marble-kitchen", "2__海滩",
        "p3__a-beach-at-sunset", "p3__a-marble-kitchen", "p3__海滩",
    ]
    p1, watch, lamp = plan.items[0], plan.items[4], plan.items[8]
    assert p1.prompt == "Place red silk cape in a beach at sunset, studio light"
    assert (p1.reference_text, p1.reference_count) == ("red silk cape", 2)
    assert p1.filter == 'metadata["label"] == 3'
    assert watch.prompt == "Place gold watch in A marble kitchen!, studio light"
    assert watch.reference_ids == (ID_A, ID_B) and watch.filter == ""  # the filter is for queries only
    assert dict(watch.options) == {"temperature": 0.4, "seed": 9} and dict(p1.options)["seed"] == 7
    assert lamp.reference_image == tmp_path / "sketches" / "lamp.png" and lamp.scene == "海滩"
    assert load_plan(tmp_path / "plan.yaml").items == plan.items  # deterministic


def test_csv_plan_one_item_per_row(tmp_path):
    path = tmp_path / "plan.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt", "product", "scene", "reference_query", "reference_ids",
                         "reference_count"])
        writer.writerow(["p1", "Place {product} in {scene}", "red cape", "a beach", "red cape", "", "2"])
        writer.writerow(["p2", "A {product}, {{literal}}", "gold watch", "", "", f"{ID_A}; {ID_B}", ""])
    items = load_plan(path).items
    assert [i.key for i in items] == ["p1", "p2"]
    assert items[0].prompt == "Place red cape in a beach" and items[0].reference_count == 2
    assert items[0].reference_text == "red cape" and items[0].scene == "a beach"
    assert items[1].prompt == "A gold watch, {literal}" and items[1].reference_ids == (ID_A, ID_B)
    assert items[1].reference_text is None and items[1].scene is None


def test_yaml_plan_takes_rows_from_a_csv_file(tmp_path):
    (tmp_path / "rows.csv").write_text("id,product\nwatch,gold watch\ncape,red cape\n")
    plan = load_plan(_write_yaml(tmp_path / "plan.yml", {
        "prompt_template": "{product} on {scene}", "scenes": ["sand", "snow"], "rows": "rows.csv"}))
    assert [(i.key, i.prompt) for i in plan.items] == [
        ("watch__sand", "gold watch on sand"), ("watch__snow", "gold watch on snow"),
        ("cape__sand", "red cape on sand"), ("cape__snow", "red cape on snow")]


@pytest.mark.parametrize("plan,message", [
    ({"prompt_template": "{product} in {color}", "rows": [{"id": "p1", "product": "cape", "color": "red"},
                                                          {"id": "p2", "product": "watch"}]},
     r"row 2 \(id 'p2'\): unknown placeholder \{color\}"),
    ({"prompt_template": "{product}", "rows": [{"product": "cape"}]}, r"row 1: id: Field required"),
    ({"prompt_template": "{product}", "rows": [{"id": "p1", "product": "a"}, {"id": "p1", "product": "b"}]},
     r"row 2 \(id 'p1'\): duplicate item key 'p1'"),
    ({"prompt_template": "{product} {scene}", "scenes": ["a beach", "A beach!"],
      "rows": [{"id": "p1", "product": "a"}]}, r"row 1 \(id 'p1'\): duplicate item key 'p1__a-beach'"),
    ({"prompt_template": "x", "rows": [{"id": "p1", "reference_query": "cape", "reference_ids": [ID_A]}]},
     r"row 1 \(id 'p1'\).*at most one of reference_query, reference_ids, reference_image"),
    ({"prompt_template": "x", "rows": [{"id": "p1", "reference_ids": ["abc"]}]},
     r"row 1 \(id 'p1'\).*64 lowercase hex"),
    ({"prompt_template": "x", "rows": [{"id": "p1", "reference_image": "missing.png"}]},
     r"row 1 \(id 'p1'\): reference_image .*missing.png' is not a file"),
    ({"prompt_template": "x", "rows": [{"id": "p1", "options": {"temprature": 1}}]},
     r"row 1 \(id 'p1'\): options: .*temprature"),
    ({"prompt_template": "x", "options": {"seed": "many"}, "rows": [{"id": "p1"}]}, r"plan.yaml: options:"),
    ({"prompt_templat": "x", "rows": [{"id": "p1"}]}, r"prompt_templat: Extra inputs"),
    ({"rows": [{"id": "p1"}]}, r"row 1 \(id 'p1'\): no prompt"),
    ({"prompt_template": "x {scene}", "scenes": ["a"], "rows": [{"id": "p1", "scene": "b"}]},
     r"row 1 \(id 'p1'\): the row has a `scene` and the plan has `scenes`"),
    ({"prompt_template": "x", "rows": [{"id": "has space"}]}, r"row 1 \(id 'has space'\): id: .*must be"),
    ({"prompt_template": "x", "rows": []}, r"the plan has no rows"),
], ids=["unknown-placeholder", "missing-id", "duplicate-id", "duplicate-scene-slug", "two-reference-sources",
        "bad-reference-id", "missing-reference-image", "unknown-option", "bad-plan-option",
        "unknown-plan-key", "no-prompt", "scene-and-scenes", "bad-id", "no-rows"])
def test_bad_plans_name_the_row_and_the_problem(tmp_path, plan, message):
    with pytest.raises(ValueError, match=message):
        load_plan(_write_yaml(tmp_path / "plan.yaml", plan))


def test_bad_csv_plan_names_the_row(tmp_path):
    path = tmp_path / "plan.csv"
    path.write_text("id,prompt,product\np1,make {product},cape\np2,make {product} {size},watch\n")
    with pytest.raises(ValueError, match=r"plan.csv row 2 \(id 'p2'\): unknown placeholder \{size\}"):
        load_plan(path)


# ----------------------------------------------------------------------------------------------------------
# batches


def _report(out_dir: Path) -> tuple[dict[str, dict], list[dict[str, str]]]:
    data = json.loads((out_dir / "report.json").read_text())
    with (out_dir / "report.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {item["key"]: item for item in data["items"]}, rows


def _prompts(requests: list[RecordedRequest]) -> list[str]:
    return sorted(r.prompt for r in requests)


async def test_run_batch_records_failures_and_resumes_only_unfinished_items(stack, fake, tmp_path):
    rows = [
        {"id": "ok1", "product": "a neon seven", "reference_query": "a handwritten digit seven"},
        {"id": "ok2", "product": "a chalk three", "reference_ids": [stack.ids[0]]},
        {"id": "ok3", "product": "a paper crane"},
        {"id": "quota", "product": "[fake:status=429] a cape"},
        # HTTP 500 once; the service is set to retry 0 times
        {"id": "flaky", "product": "[fake:fail-first=1] a lamp"},
        {"id": "nsfw", "product": "[fake:blocked] something"},
    ]
    plan = {"prompt_template": "{product}, product photo", "concurrency": 3, "rows": rows}
    plan_path = _write_yaml(tmp_path / "plan.yaml", plan)
    out = tmp_path / "out"
    fake.reset()

    first = await asyncio.to_thread(run_batch, stack.target, plan_path, out, progress=False)
    assert first.counts == {"ok": 3, "failed": 2, "skipped": 0, "blocked": 1}
    items, csv_rows = _report(out)
    assert [(r["key"], r["status"], r["code"]) for r in csv_rows] == [
        ("ok1", "ok", "OK"), ("ok2", "ok", "OK"), ("ok3", "ok", "OK"),
        ("quota", "failed", "RESOURCE_EXHAUSTED"), ("flaky", "failed", "UNAVAILABLE"),
        ("nsfw", "blocked", "OK")]
    assert tuple(csv_rows[0]) == REPORT_COLUMNS
    assert items["quota"]["message"] and items["nsfw"]["message"]  # the status details, the block reason
    for key in ("ok1", "ok2", "ok3"):
        assert items[key]["images"] == [f"{key}_0.png"] and items[key]["total_ms"] > 0
        with Image.open(out / f"{key}_0.png") as image:
            assert image.format == "PNG"
        assert (out / f"{key}.txt").is_file()
    done = {p.name for p in out.glob("*.done.json")}
    assert done == {"ok1.done.json", "ok2.done.json", "ok3.done.json", "nsfw.done.json"}
    assert len(fake.requests) == 6

    seen = len(fake.requests)
    second = await asyncio.to_thread(run_batch, stack.target, plan_path, out, progress=False)
    assert second.counts == {"ok": 1, "failed": 1, "skipped": 4, "blocked": 0}
    assert _prompts(fake.requests[seen:]) == ["[fake:fail-first=1] a lamp, product photo",
                                              "[fake:status=429] a cape, product photo"]
    items, _ = _report(out)
    assert items["flaky"]["status"] == "ok" and items["flaky"]["images"] == ["flaky_0.png"]
    assert items["quota"]["code"] == "RESOURCE_EXHAUSTED"
    assert items["ok1"]["status"] == "skipped" and items["ok1"]["images"] == ["ok1_0.png"]

    # a changed request is not done: only the edited row runs again
    rows[2]["product"] = "a paper boat"
    _write_yaml(plan_path, plan)
    seen = len(fake.requests)
    third = await asyncio.to_thread(run_batch, stack.target, plan_path, out, progress=False)
    assert third.counts == {"ok": 1, "failed": 1, "skipped": 4, "blocked": 0}
    assert third.outcome("ok3").status == "ok" and third.outcome("flaky").status == "skipped"
    assert _prompts(fake.requests[seen:]) == ["[fake:status=429] a cape, product photo",
                                              "a paper boat, product photo"]


def _most_in_flight(requests: list[RecordedRequest]) -> int:
    """Most requests the fake had open at once, from their received/ended monotonic times."""
    events = sorted([(r.received_at, 1) for r in requests] + [(r.ended_at, -1) for r in requests])
    in_flight = most = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        in_flight += step
        most = max(most, in_flight)
    return most


async def test_run_batch_keeps_at_most_concurrency_requests_in_flight(stack, fake, tmp_path):
    plan_path = _write_yaml(tmp_path / "plan.yaml", {
        "prompt_template": "[fake:delay=300] item {id}", "concurrency": 6,  # the argument below wins
        "rows": [{"id": f"i{n}"} for n in range(6)]})
    fake.reset()
    report = await asyncio.to_thread(run_batch, stack.target, plan_path, tmp_path / "out", concurrency=2,
                                     progress=False)
    assert report.counts["ok"] == 6 and report.concurrency == 2
    requests = fake.requests
    assert len(requests) == 6 and all(r.ended_at is not None for r in requests)
    assert _most_in_flight(requests) == 2
