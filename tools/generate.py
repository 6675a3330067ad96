"""Retrieval-augmented generation, client side: one prompt (`generate_one`) or a plan file (`run_batch`).

Both call `vitrine.v1.RetrievalService/GenerateImages`: the service retrieves reference images from the
collection (by a text or image query, or by explicit ids), sends them with the prompt to Gemini, and streams
text and images back. Outputs of one generation with stem `S` in `out_dir`:

    S_0.png, S_1.png ...   each generated image as it arrives (suffix from its MIME type)
    S.txt                  the generated text (candidates in order, separated by a blank line), if any

Plan files (their format, `load_plan`): `tools/generate_plan.py`.

Batch runs
----------
`run_batch` runs the items with bounded concurrency (a thread pool over one gRPC channel) and a tqdm progress
bar. After an item's outputs are written, `<key>.done.json` (its result and the fingerprint of its request) is
written atomically, last; a later run skips items whose done file matches the item's request and whose images
are present, so an interrupted or partly failed batch is resumed by running it again. Failures of one item
(any gRPC status, e.g. RESOURCE_EXHAUSTED from a Gemini quota, or a stream that ends without its `finished`
message) are recorded and do not stop the batch; they are retried by the next run. A generation that Gemini
blocked is final (status `blocked`, done file written): delete its done file to try again. Every run writes
`report.json` and `report.csv` in `out_dir` (one row per item, in plan order: key, status
ok/failed/skipped/blocked, code, message, images, first_part_ms, total_ms).
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from tools.generate_plan import PlanItem, generation_options, load_plan
from vitrine.client import VitrineClient, guess_suffix
from vitrine.v1 import retrieval_service_pb2 as pb

#: Requests in flight when neither the caller nor the plan says.
DEFAULT_CONCURRENCY = 4
#: Deadline of one GenerateImages call in a batch, seconds (the service's own Gemini deadline is 120 s).
DEFAULT_ITEM_TIMEOUT_S = 300.0
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
REPORT_COLUMNS = ("key", "status", "code", "message", "images", "first_part_ms", "total_ms")
DONE_SUFFIX = ".done.json"


class IncompleteStreamError(RuntimeError):
    """The GenerateImages stream ended cleanly without its `finished` message (a service fault)."""


# ----------------------------------------------------------------------------------------------------------
# one generation


@dataclass(frozen=True)
class Reference:
    """A reference image the service sent to Gemini; `score` is the cosine similarity (0 for explicit ids)."""

    image_id: str
    score: float
    filename: str


@dataclass
class GenerationResult:
    """What one GenerateImages call produced and where it was written.

    Attributes:
        references: the reference images, in the order they were sent to Gemini.
        text: the generated text, candidates in order separated by a blank line ("" when none).
        text_file: `<stem>.txt`, or None when there was no text.
        images: the image files written, `<stem>_<n>.<ext>` in arrival order.
        finish_reason: Gemini's finish reason ("STOP", "SAFETY", "IMAGE_SAFETY", ...).
        blocked / block_reason: Gemini blocked the prompt or the output, and why.
        prompt_tokens / candidates_tokens / total_tokens: Gemini's token usage.
        retrieval_ms: server time spent finding the references, milliseconds.
        first_part_ms / total_ms: server time from the request to the first streamed part and to the end, ms.
    """

    references: list[Reference]
    text: str
    text_file: Path | None
    images: list[Path]
    finish_reason: str
    blocked: bool
    block_reason: str
    prompt_tokens: int
    candidates_tokens: int
    total_tokens: int
    retrieval_ms: float
    first_part_ms: float
    total_ms: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; file paths as names relative to the output folder."""
        data = asdict(self)
        data["text_file"] = self.text_file.name if self.text_file else None
        data["images"] = [p.name for p in self.images]
        return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`, so readers see
    either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate_one(client: VitrineClient, prompt: str, *, reference_text: str | None = None,
                 reference_image: bytes | None = None, reference_ids: Sequence[str] = (),
                 reference_count: int = 1, filter: str = "", min_score: float | None = None, model: str = "",
                 options: Mapping[str, Any] | None = None, out_dir: Path, stem: str,
                 timeout_s: float | None = None) -> GenerationResult:
    """Run one GenerateImages call and write its outputs to `out_dir` as they arrive.

    Args:
        client: a connected client.
        prompt: the instruction for the image model (markers such as `[fake:status=429]` pass through).
        reference_text / reference_image / reference_ids: at most one reference source (see
            `VitrineClient.generate`); `reference_image` is encoded image bytes.
        reference_count: references a query retrieves (1..the service's `max_reference_images`).
        filter / min_score: Milvus filter and minimum cosine similarity of a reference query.
        model: Gemini model name ("" = the service default).
        options: GenerationOptions fields, e.g. {"temperature": 0.4, "seed": 7, "aspect_ratio": "4:3"}.
        out_dir: output folder (created if missing).
        stem: output file stem: images `<stem>_<n>.<ext>`, text `<stem>.txt`.
        timeout_s: deadline of the call in seconds (None: no deadline).

    Raises:
        ValueError: bad `stem`, reference arguments or options.
        grpc.RpcError: the call failed (codes as documented on GenerateImages); images that arrived before
            the failure stay written.
        IncompleteStreamError: the stream ended without its `finished` message.
        OSError: writing an output failed.
    """
    if not stem or stem in {".", ".."} or "/" in stem or os.sep in stem:
        raise ValueError(f"stem must be a plain file-name stem, got {stem!r}")
    request_options = generation_options(options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    references: list[Reference] = []
    retrieval_ms = 0.0
    texts: dict[int, list[str]] = {}
    images: list[Path] = []
    finished: pb.GenerationFinished | None = None
    query_count = reference_count if reference_text is not None or reference_image is not None else 0
    for msg in client.generate(prompt, reference_text=reference_text, reference_image=reference_image,
                               reference_ids=reference_ids, reference_count=query_count, filter=filter,
                               min_score=min_score, model=model, options=request_options,
                               timeout_s=timeout_s):
        kind = msg.WhichOneof("event")
        if kind == "references":
            retrieval_ms = msg.references.retrieval_ms
            references = [Reference(r.image.image_id, r.score, r.image.filename)
                          for r in msg.references.references]
        elif kind == "text":
            texts.setdefault(msg.text.candidate_index, []).append(msg.text.text)
        elif kind == "image":
            path = out_dir / f"{stem}_{len(images)}{guess_suffix(msg.image.mime_type)}"
            write_atomic(path, msg.image.data)
            images.append(path)
        elif kind == "finished":
            finished = msg.finished
    if finished is None:
        raise IncompleteStreamError(f"GenerateImages stream for {stem!r} ended without a finished message")
    text = "\n\n".join("".join(texts[i]) for i in sorted(texts))
    text_file = None
    if text:
        text_file = out_dir / f"{stem}.txt"
        write_atomic(text_file, text.encode())
    return GenerationResult(
        references=references, text=text, text_file=text_file, images=images,
        finish_reason=finished.finish_reason, blocked=finished.blocked, block_reason=finished.block_reason,
        prompt_tokens=finished.prompt_tokens, candidates_tokens=finished.candidates_tokens,
        total_tokens=finished.total_tokens, retrieval_ms=retrieval_ms, first_part_ms=finished.first_part_ms,
        total_ms=finished.total_ms,
    )


# ----------------------------------------------------------------------------------------------------------
# batches


@dataclass
class ItemOutcome:
    """One row of the batch report.

    Attributes:
        status: 'ok', 'blocked' (Gemini blocked it; final), 'failed' (retried by the next run) or 'skipped'
            (done by an earlier run).
        code: the gRPC status name ('OK', 'RESOURCE_EXHAUSTED', ...; '' for skipped items).
        images: image file names in the output folder.
        first_part_ms / total_ms: server timings of the generation, milliseconds (0 when it failed).
    """

    key: str
    status: str
    code: str = ""
    message: str = ""
    images: list[str] = field(default_factory=list)
    first_part_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class BatchReport:
    """What a `run_batch` call did: per-item outcomes in plan order and where the report files are."""

    items: list[ItemOutcome]
    report_json: Path
    report_csv: Path
    concurrency: int
    wall_s: float

    @property
    def counts(self) -> dict[str, int]:
        """Items per status: {'ok': n, 'failed': n, 'skipped': n, 'blocked': n}."""
        counted = Counter(o.status for o in self.items)
        return {s: counted.get(s, 0) for s in ("ok", "failed", "skipped", "blocked")}

    def outcome(self, key: str) -> ItemOutcome:
        """The outcome of the item `key`. Raises KeyError for a key not in the plan."""
        for o in self.items:
            if o.key == key:
                return o
        raise KeyError(key)


def _done_path(out_dir: Path, key: str) -> Path:
    """`<out_dir>/<key>.done.json`: written last, when an item's outputs are complete."""
    return out_dir / f"{key}{DONE_SUFFIX}"


def _read_done(out_dir: Path, item: PlanItem) -> dict[str, Any] | None:
    """The item's done record if it is complete and current: written for this request, images present."""
    try:
        done = json.loads(_done_path(out_dir, item.key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("fingerprint") != item.fingerprint():
        return None
    if not all((out_dir / name).is_file() for name in done.get("result", {}).get("images", [])):
        return None
    return done


def _run_item(client: VitrineClient, item: PlanItem, out_dir: Path, timeout_s: float) -> ItemOutcome:
    """Generate one item; record any failure instead of raising it."""
    try:
        result = generate_one(
            client, item.prompt, reference_text=item.reference_text,
            reference_image=item.reference_image.read_bytes() if item.reference_image else None,
            reference_ids=item.reference_ids, reference_count=item.reference_count, filter=item.filter,
            model=item.model, options=item.options, out_dir=out_dir, stem=item.key, timeout_s=timeout_s,
        )
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        return ItemOutcome(item.key, "failed", code, details or "")
    except IncompleteStreamError as exc:
        return ItemOutcome(item.key, "failed", "INCOMPLETE_STREAM", str(exc))
    except OSError as exc:
        return ItemOutcome(item.key, "failed", "OS_ERROR", str(exc))
    status = "blocked" if result.blocked else "ok"
    record = {"key": item.key, "status": status, "fingerprint": item.fingerprint(), "prompt": item.prompt,
              "result": result.to_json()}
    write_atomic(_done_path(out_dir, item.key), json.dumps(record, indent=2, ensure_ascii=False).encode())
    return ItemOutcome(item.key, status, "OK", result.block_reason, [p.name for p in result.images],
                       result.first_part_ms, result.total_ms)


def _write_report(report: BatchReport, plan_path: Path, target: str) -> None:
    """Write `report.json` (run summary and every outcome) and `report.csv` (`REPORT_COLUMNS`), atomically."""
    payload = {"plan": str(plan_path), "target": target, "concurrency": report.concurrency,
               "wall_s": round(report.wall_s, 3), "counts": report.counts,
               "items": [asdict(o) for o in report.items]}
    write_atomic(report.report_json, json.dumps(payload, indent=2, ensure_ascii=False).encode())
    table = io.StringIO(newline="")
    writer = csv.writer(table)  # rows end in "\r\n" (RFC 4180)
    writer.writerow(REPORT_COLUMNS)
    for o in report.items:
        writer.writerow([o.key, o.status, o.code, o.message, ";".join(o.images), f"{o.first_part_ms:.1f}",
                         f"{o.total_ms:.1f}"])
    write_atomic(report.report_csv, table.getvalue().encode("utf-8"))


def run_batch(target: str, plan_path: Path, out_dir: Path, *, concurrency: int | None = None,
              progress: bool = True, timeout_s: float = DEFAULT_ITEM_TIMEOUT_S) -> BatchReport:
    """Generate every item of a plan against the service at `target` ('host:port'), resumably.

    Items already done (a current `<key>.done.json` with its images in `out_dir`) are skipped; the rest run
    with at most `concurrency` (else the plan's `concurrency`, else `DEFAULT_CONCURRENCY`) calls in flight,
    each with a deadline of `timeout_s` seconds. Per-item failures are recorded, never raised. `report.json`
    and `report.csv` are written to `out_dir` at the end, also when the run is interrupted (Ctrl-C closes the
    channel, cancelling the calls in flight; items that did not finish are reported failed, CANCELLED).

    Returns:
        The report: outcomes in plan order, `counts` per status.

    Raises:
        FileNotFoundError / ValueError: the plan cannot be read or is invalid (nothing is generated);
            `concurrency` < 1.
    """
    plan = load_plan(plan_path)
    workers = concurrency if concurrency is not None else plan.concurrency or DEFAULT_CONCURRENCY
    if workers < 1:
        raise ValueError(f"concurrency must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, ItemOutcome] = {}
    todo: list[PlanItem] = []
    for item in plan.items:
        done = _read_done(out_dir, item)
        if done is None:
            todo.append(item)
            continue
        result = done.get("result", {})
        outcomes[item.key] = ItemOutcome(
            item.key, "skipped", "", f"done earlier ({done.get('status')})", list(result.get("images", [])),
            float(result.get("first_part_ms", 0.0)), float(result.get("total_ms", 0.0)))
    started = time.perf_counter()
    client = VitrineClient(target)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vitrine-generate")
    bar = tqdm(total=len(plan.items), initial=len(plan.items) - len(todo), disable=not progress, unit="item",
               desc="generate")
    failed = 0
    try:
        futures: list[Future[ItemOutcome]] = [pool.submit(_run_item, client, item, out_dir, timeout_s)
                                              for item in todo]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[outcome.key] = outcome
            failed += outcome.status == "failed"
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()  # cancels calls still in flight when the loop was interrupted
        pool.shutdown(wait=True)
        bar.close()
        unfinished = "the batch was interrupted before this item finished"
        report = BatchReport(
            items=[outcomes.get(item.key) or ItemOutcome(item.key, "failed", "CANCELLED", unfinished)
                   for item in plan.items],
            report_json=out_dir / REPORT_JSON, report_csv=out_dir / REPORT_CSV, concurrency=workers,
            wall_s=time.perf_counter() - started,
        )
        _write_report(report, plan.path, target)
    return report
