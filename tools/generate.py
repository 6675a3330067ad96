"""Retrieval-augmented generation, client side: one prompt (`generate_one`) or a plan file (`run_batch`).

Both call `vitrine.v1.RetrievalService/GenerateImages`: the service retrieves reference images from the
collection (by a text or image query, or by explicit ids), sends them with the prompt to Gemini, and streams
text and images back. Outputs of one generation with stem `S` in `out_dir`:

    S_0.png, S_1.png ...   each generated image as it arrives (suffix from its MIME type)
    S.txt                  the generated text (candidates in order, separated by a blank line), if any

Plan files: "products x scenes" batch generation
-----------------------------------------------
A plan expands to a deterministic list of items, each with a stable key used as the output stem. YAML:

    prompt_template: "Place {product} in {scene}, studio light"
    scenes: ["a beach at sunset", "a marble kitchen counter"]      # optional: the cross product rows x scenes
    model: gemini-2.5-flash-image                                   # optional (service default)
    options: {temperature: 0.4, seed: 7, aspect_ratio: "4:3"}       # optional, GenerationOptions fields
    concurrency: 4                                                  # optional, requests in flight
    filter: 'metadata["kind"] == "product"'                         # optional, for reference queries
    rows:
      - {id: p1, product: "red silk cape", reference_query: "red silk cape", reference_count: 2}
      - {id: p2, product: "gold pocket watch", reference_ids: ["<64 hex>", "<64 hex>"]}
      - {id: p3, product: "the sketched lamp", reference_image: sketches/lamp.png, options: {seed: 3}}

`rows` may instead be the path of a CSV file (relative to the plan) with the columns described below.
Row fields:

    id                 required; letters, digits, '_', '.', '-' (Unicode letters allowed), at most 100 chars
    prompt             optional: this row's prompt instead of `prompt_template`
    reference_query    text query for the references (at most one of the three reference fields)
    reference_ids      stored image ids, in order (CSV: separated by ';')
    reference_image    image file (relative to the plan file) used as an image query
    reference_count    references a query retrieves (default 1)
    filter             Milvus filter of this row's reference query (default: the plan's `filter`)
    scene              a single scene for this row (not with a plan-level `scenes` list)
    options            (YAML only) GenerationOptions overriding the plan's `options`
    anything else      a template field: `{product}` in the prompt takes the row's `product`

The prompt (the row's `prompt`, else `prompt_template`) is filled with `str.format` from the row's fields,
`id` and `scene`; write `{{` and `}}` for literal braces. Item keys: the row id, or `<id>__<scene slug>` in a
cross product (slug: the scene lower-cased, runs of non-word characters replaced by '-', at most 40 chars), so
`p1__a-beach-at-sunset`. Items are ordered row by row, scene by scene.

A CSV plan is a table of rows with a header line; it has no plan-level settings, so every row carries its
prompt (a `prompt` column, which may use placeholders filled from the other columns):

    id,prompt,product,scene,reference_query,reference_count
    p1,"Place {product} in {scene}, studio light",red silk cape,a beach at sunset,red silk cape,2
    p2,"Place {product} in {scene}, studio light",gold pocket watch,a beach at sunset,gold pocket watch,1

Empty cells count as absent. Problems (a missing id, an unknown placeholder, duplicate keys, two reference
sources, a missing reference image file, unknown options) raise ValueError naming the file and the row.

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
import hashlib
import json
import os
import re
import string
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

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

_ID = re.compile(r"\w[\w.\-]{0,99}")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_SLUG_MAX = 40


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


def generation_options(options: Mapping[str, Any] | None) -> pb.GenerationOptions:
    """Convert a dict of GenerationOptions fields (`temperature`, `seed`, `aspect_ratio`, ...; snake_case or
    lowerCamelCase) into the proto message.

    Raises:
        ValueError: an unknown field or a value of the wrong type (ranges are checked by the service).
    """
    try:
        return json_format.ParseDict(dict(options or {}), pb.GenerationOptions())
    except json_format.ParseError as exc:
        raise ValueError(f"options: {exc}") from exc


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
# plans


@dataclass(frozen=True)
class PlanItem:
    """One generation of a plan: its key (the output stem), the filled prompt and its references."""

    key: str
    row_id: str
    scene: str | None
    prompt: str
    reference_text: str | None = None
    reference_image: Path | None = None
    reference_ids: tuple[str, ...] = ()
    reference_count: int = 1
    filter: str = ""
    model: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 hex of the request this item sends (prompt, references, model, options): a done file
        written for another request is stale."""
        data = asdict(self)
        data["reference_image"] = str(self.reference_image) if self.reference_image else None
        data["options"] = dict(self.options)
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    """A loaded plan: its items in order and its `concurrency` (None when the plan does not set one)."""

    path: Path
    items: list[PlanItem]
    concurrency: int | None = None


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)

    id: str
    prompt: str | None = None
    reference_query: str | None = None
    reference_ids: list[str] = Field(default_factory=list)
    reference_image: str | None = None
    reference_count: int = Field(1, ge=1)
    filter: str | None = None
    scene: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _ID.fullmatch(value):
            raise ValueError(f"id {value!r} must be 1..100 letters, digits, '_', '.' or '-', starting with a "
                             "letter, digit or '_'")
        return value

    @field_validator("reference_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(";") if v.strip()] if isinstance(value, str) else value

    @field_validator("reference_ids")
    @classmethod
    def _check_ids(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not _IMAGE_ID.fullmatch(v)]
        if bad:
            raise ValueError(f"image ids are 64 lowercase hex characters (sha256), got {bad[0]!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> _Row:
        sources = ("reference_query", "reference_ids", "reference_image")
        given = [name for name in sources if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(sources)}; got {' and '.join(given)}")
        if self.filter and not self.reference_query:
            raise ValueError("filter applies only to a reference_query")
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, (str, int, float, bool)):
                raise ValueError(f"template field {name!r} must be a string or a number, got {value!r}")
        return self

    def fields(self) -> dict[str, str]:
        """Template fields: the extra columns plus `id`."""
        return {**{k: str(v) for k, v in (self.model_extra or {}).items()}, "id": self.id}


class _PlanFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_template: str | None = None
    rows: list[Any] | str  # each row is checked by `_expand`, which names it in errors
    scenes: list[str] = Field(default_factory=list)
    model: str = ""
    options: dict[str, Any] = Field(default_factory=dict)
    filter: str = ""
    concurrency: int | None = Field(None, ge=1, le=256)


def _errors(exc: ValidationError) -> str:
    """Pydantic's errors as one line: 'field: problem; ...'."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def scene_slug(scene: str) -> str:
    """The key part of a scene: lower-cased, runs of non-word characters as '-', at most 40 characters
    ("A beach at sunset!" -> "a-beach-at-sunset")."""
    return re.sub(r"[^\w]+", "-", scene.lower()).strip("-_")[:_SLUG_MAX].strip("-_")


def _placeholders(template: str, where: str) -> set[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{where}: bad prompt template {template!r}: {exc}") from exc
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"{where}: placeholder {{{name}}} in the prompt must be a field name such as "
                             "{product}; write {{ and }} for literal braces")
    return names


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty CSV plan (a header line is required)")
        return [{k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip()}
                for row in reader]


def load_plan(path: Path) -> Plan:
    """Read a YAML (.yaml/.yml) or CSV (.csv) plan and expand it into items (format: the module docstring).

    Raises:
        FileNotFoundError: the plan (or its `rows` CSV) does not exist.
        ValueError: a bad plan; the message names the file and, for row problems, the row (number and id).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in {".yaml", ".yml"}:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a YAML plan must be a mapping with at least `rows`")
        try:
            plan = _PlanFile.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"{path}: {_errors(exc)}") from exc
        rows_source = path
        if isinstance(plan.rows, str):
            rows_source = path.parent / plan.rows
            rows = _read_csv(rows_source)
        else:
            rows = plan.rows
    elif suffix == ".csv":
        plan = _PlanFile(rows=[])
        rows_source = path
        rows = _read_csv(path)
    else:
        raise ValueError(f"{path}: a plan must be a .yaml, .yml or .csv file")
    try:
        generation_options(plan.options)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return Plan(path=path, items=_expand(plan, rows, rows_source), concurrency=plan.concurrency)


def _expand(plan: _PlanFile, rows: list[Any], source: Path) -> list[PlanItem]:
    """Rows x scenes -> items; `source` (the file the rows come from) names rows in errors."""
    if not rows:
        raise ValueError(f"{source}: the plan has no rows")
    scenes: list[str | None] = list(plan.scenes) or [None]
    slugs: dict[str, str] = {}
    for scene in plan.scenes:
        slugs[scene] = scene_slug(scene)
        if not slugs[scene]:
            raise ValueError(f"{source}: scene {scene!r} has no letters or digits to make an item key from")
    items: list[PlanItem] = []
    seen: dict[str, str] = {}
    for n, raw in enumerate(rows, start=1):
        named = isinstance(raw, dict) and "id" in raw
        where = f"{source} row {n}" + (f" (id {raw['id']!r})" if named else "")
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: a row must be a mapping of fields, got {raw!r}")
        try:
            row = _Row.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"{where}: {_errors(exc)}") from exc
        if row.scene is not None and plan.scenes:
            raise ValueError(f"{where}: the row has a `scene` and the plan has `scenes`; use one of them")
        template = row.prompt if row.prompt is not None else plan.prompt_template
        if not template:
            raise ValueError(f"{where}: no prompt: give the row a `prompt` or the plan a `prompt_template`")
        names = _placeholders(template, where)
        options = {**plan.options, **row.options}
        try:
            generation_options(options)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        image = None
        if row.reference_image:
            image = source.parent / row.reference_image
            if not image.is_file():
                raise ValueError(f"{where}: reference_image {str(image)!r} is not a file")
        for plan_scene in scenes:
            scene = plan_scene if plan_scene is not None else row.scene
            fields = row.fields() | ({"scene": scene} if scene is not None else {})
            missing = sorted(names - fields.keys())
            if missing:
                given = ", ".join(sorted(fields))
                raise ValueError(f"{where}: unknown placeholder {{{missing[0]}}} in the prompt; "
                                 f"this row gives {given}")
            key = f"{row.id}__{slugs[plan_scene]}" if plan_scene is not None else row.id
            if key in seen:
                raise ValueError(f"{where}: duplicate item key {key!r} (also from {seen[key]})")
            seen[key] = where
            items.append(PlanItem(
                key=key, row_id=row.id, scene=scene, prompt=template.format(**fields),
                reference_text=row.reference_query, reference_image=image,
                reference_ids=tuple(row.reference_ids), reference_count=row.reference_count,
                filter=(row.filter if row.filter is not None else plan.filter) if row.reference_query else "",
                model=plan.model, options=options,
            ))
    return items


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
    payload = {"plan": str(plan_path), "target": target, "concurrency": report.concurrency,
               "wall_s": round(report.wall_s, 3), "counts": report.counts,
               "items": [asdict(o) for o in report.items]}
    write_atomic(report.report_json, json.dumps(payload, indent=2, ensure_ascii=False).encode())
    tmp = report.report_csv.with_name(f".{report.report_csv.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(REPORT_COLUMNS)
        for o in report.items:
            writer.writerow([o.key, o.status, o.code, o.message, ";".join(o.images), f"{o.first_part_ms:.1f}",
                             f"{o.total_ms:.1f}"])
    os.replace(tmp, report.report_csv)


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
