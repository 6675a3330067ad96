"""Plan files for batch generation ("products x scenes"): the format, its validation and its expansion.

`load_plan(path)` reads a YAML or CSV plan and expands it into `PlanItem`s; `tools.generate.run_batch` runs
them. Nothing here talks to the service: a plan is checked completely (options included, against the proto's
own field names) before anything is generated.

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
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitrine.image_ids import is_image_id
from vitrine.v1 import retrieval_service_pb2 as pb

#: A row id (the first part of its item keys): a word character, then up to 99 word characters, "." or "-".
_ID = re.compile(r"\w[\w.\-]{0,99}")
#: Most characters of a scene slug in an item key.
_SLUG_MAX = 40

_Model = TypeVar("_Model", bound=BaseModel)


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
        bad = [v for v in value if not is_image_id(v)]
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


def _validated(model: type[_Model], data: object, where: str, not_a_mapping: str) -> _Model:
    """`model` validated from the mapping `data`.

    Raises:
        ValueError: `data` is not a dict (`"<where>: <not_a_mapping>"`) or fails validation (`"<where>: "` and
            pydantic's errors as one line).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {not_a_mapping}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{where}: {_errors(exc)}") from exc


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
    """The field names `template` uses; ValueError (prefixed `where`) for bad braces or a non-name field."""
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
    """The rows of a CSV file with a header line, keys and values stripped, empty cells left out (UTF-8, BOM
    allowed). Raises ValueError for a file without a header line."""
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
        plan = _validated(_PlanFile, data, str(path), "a YAML plan must be a mapping with at least `rows`")
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
        row = _validated(_Row, raw, where, f"a row must be a mapping of fields, got {raw!r}")
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
