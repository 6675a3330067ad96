"""Showing search results: a rich table in the terminal and a contact-sheet PNG."""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from vitrine.client import VitrineClient
from tools.contact_sheet import SheetItem, write_contact_sheet
from vitrine.v1 import retrieval_service_pb2 as pb


def metadata_dict(record: pb.ImageRecord) -> dict:
    """The record's metadata as a plain dict (integral numbers as ints)."""
    data = json_format.MessageToDict(record.metadata)
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in data.items()}


def print_results(console: Console, query: str, resp: pb.SearchImagesResponse) -> None:
    """Print rank, score, id prefix, filename and metadata of each result, and the server timings (ms)."""
    table = Table(title=f"{query!r}  (encode {resp.encode_ms:.1f} ms, search {resp.search_ms:.1f} ms)")
    for col in ("rank", "score", "image_id", "filename", "metadata"):
        table.add_column(col)
    for r in resp.results:
        table.add_row(str(r.rank + 1), f"{r.score:.4f}", r.image.image_id[:12], r.image.filename,
                      json.dumps(metadata_dict(r.image), ensure_ascii=False))
    console.print(table)
    if resp.next_page_token:
        console.print(f"next page: --page-token {resp.next_page_token}")


def results_contact_sheet(client: VitrineClient, path: Path, title: str, resp: pb.SearchImagesResponse,
                          query_image: bytes | None = None) -> Path:
    """Fetch each result's image with GetImage and write a contact sheet PNG to `path`."""
    items = []
    for r in resp.results:
        content = client.get_image(r.image.image_id).content
        meta = metadata_dict(r.image)
        label = f"  label {meta['label']}" if "label" in meta else ""
        items.append(SheetItem(content, f"#{r.rank + 1}  {r.score:.3f}{label}", r.image.filename[:24]))
    return write_contact_sheet(path, title, items, query_image=query_image)
