"""Contact sheets: one PNG showing a query and its ranked results, for people to eyeball retrieval quality."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


@dataclass
class SheetItem:
    """One result tile: the image bytes and up to two caption lines."""

    content: bytes
    caption: str
    subcaption: str = ""


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _thumb(content: bytes, side: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(content)).convert("RGB")
    except Exception:  # noqa: BLE001 - an unreadable tile becomes grey, the sheet is still written
        return Image.new("RGB", (side, side), (200, 200, 200))
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (side, side), (255, 255, 255))
    tile.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return tile


def write_contact_sheet(path: Path, title: str, items: Sequence[SheetItem], *, query_image: bytes | None = None,
                        columns: int = 5, tile_px: int = 160) -> Path:
    """Write a PNG grid: a title line (and the query image when given), then `items` in rank order.

    Layout: `columns` tiles per row, each `tile_px` x `tile_px` pixels plus two caption lines. Returns `path`.
    """
    path = Path(path)
    pad, caption_h, title_h = 8, 40, 36
    head_h = title_h + (tile_px + pad if query_image is not None else 0)
    rows = max(1, -(-len(items) // columns))
    width = columns * (tile_px + pad) + pad
    height = head_h + rows * (tile_px + caption_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=_font(18))
    if query_image is not None:
        sheet.paste(_thumb(query_image, tile_px), (pad, title_h))
        draw.text((2 * pad + tile_px, title_h + tile_px // 2), "query image", fill=(90, 90, 90), font=_font(14))
    small = _font(13)
    for i, item in enumerate(items):
        x = pad + (i % columns) * (tile_px + pad)
        y = head_h + (i // columns) * (tile_px + caption_h + pad)
        sheet.paste(_thumb(item.content, tile_px), (x, y))
        draw.text((x, y + tile_px + 2), item.caption, fill=(0, 0, 0), font=small)
        if item.subcaption:
            draw.text((x, y + tile_px + 19), item.subcaption, fill=(80, 80, 80), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
