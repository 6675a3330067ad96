"""A local fake of the Gemini REST API (`generateContent`, `streamGenerateContent?alt=sse`): tests and demo.

It is a stand-in, not Google's service: it speaks the wire format the google-genai SDK uses
(https://ai.google.dev/api/generate-content), so the real SDK can be pointed at it with
`genai.Client(api_key=..., http_options=types.HttpOptions(base_url=fake.base_url))`.

Default answer: three text chunks, then one generated PNG (a tinted collage of the inline reference images it
received, so the output visibly depends on them; a gradient when there are none) as `inlineData`, then a last
chunk with `finishReason: STOP` and `usageMetadata`. One set of parts per candidate when `candidateCount` > 1;
`imageConfig.aspectRatio` sets the PNG's shape.

Scripted behaviours, chosen per request by markers in the prompt text (the first text part):

    [fake:status=CODE]      answer HTTP CODE with Gemini's error body {"error": {"code", "message", "status"}}
    [fake:invalid-key]      HTTP 400 with reason API_KEY_INVALID, Gemini's answer to a wrong API key
    [fake:fail-first=N]     the first N requests with this exact prompt get HTTP 500, later ones succeed
    [fake:blocked]          prompt blocked: one chunk with promptFeedback.blockReason = SAFETY, no candidates
    [fake:blocked-output]   output blocked: a candidate with finishReason IMAGE_SAFETY and no parts
    [fake:slow] / =MS       30 text chunks every MS (default 200) milliseconds, then the image and STOP
    [fake:break-after=N]    drop the TCP connection after N chunks (mid chunked body)
    [fake:delay=MS]         wait MS milliseconds before answering (response headers included)
    [fake:no-finish]        a clean stream that never sends a finishReason

Every request is recorded (`RecordedRequest`: path, model, method, query, headers without the API key, JSON
body, and how it ended: 'completed', 'error_status', 'client_disconnected' with the time the client went
away, or 'dropped_by_server').

Use from tests: `with FakeGemini() as fake: ... fake.base_url ... fake.requests` (a background thread with its
own event loop on a free loopback port), or the `fake_gemini_server` fixture. Standalone:
`python tests/fake_gemini.py --port 8765` prints one ready line and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import math
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

API_KEY_HEADER = "x-goog-api-key"

#: google.rpc.Code names Gemini puts in `error.status` for each HTTP status
#: (https://ai.google.dev/gemini-api/docs/troubleshooting#error-codes).
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_STATUS_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials.",
    403: "Method doesn't allow unregistered callers (callers without established identity).",
    404: "models/unknown is not found for API version v1beta.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}

#: Token accounting of the fake (approximations of Gemini's, for plausible usageMetadata): an input image of
#: <= 384 px per side counts 258 tokens (https://ai.google.dev/gemini-api/docs/tokens#multimodal-tokens); an
#: output image of Gemini 2.5 Flash Image counts 1290 tokens (https://ai.google.dev/gemini-api/docs/pricing).
INPUT_IMAGE_TOKENS = 258
OUTPUT_IMAGE_TOKENS = 1290

_MARKER = re.compile(r"\[fake:([a-z-]+)(?:=([^\]]*))?\]")
_PATH = re.compile(
    r"/(?P<version>[^/]+)/models/(?P<model>[^/:]+):(?P<method>streamGenerateContent|generateContent)"
)
_TINTS = [(255, 120, 40), (40, 160, 255), (120, 220, 80), (230, 60, 160), (250, 210, 40), (140, 90, 240)]
_SLOW_TEXT_CHUNKS = 30


@dataclass
class RecordedRequest:
    """One request the fake received. `headers` never contains the API key; `api_key` holds what was sent."""

    path: str
    model: str
    method: str  # 'streamGenerateContent' or 'generateContent'
    query: dict[str, str]
    headers: dict[str, str]
    api_key: str | None
    body: dict[str, Any]
    received_at: float  # time.monotonic()
    status: int = 200
    outcome: str = "in_progress"  # 'completed' | 'error_status' | 'client_disconnected' | 'dropped_by_server'
    chunks_sent: int = 0
    ended_at: float | None = None  # time.monotonic() when the outcome was decided
    peer: tuple[str, int] | None = None  # client (host, port): equal on one kept-alive connection

    @property
    def parts(self) -> list[dict[str, Any]]:
        """The parts of the (last) user content, in request order."""
        contents = self.body.get("contents") or []
        return list(contents[-1].get("parts") or []) if contents else []

    @property
    def prompt(self) -> str:
        """The first text part."""
        return next((p["text"] for p in self.parts if "text" in p), "")

    @property
    def inline_images(self) -> list[tuple[bytes, str]]:
        """The inline-data parts, base64-decoded: [(bytes, mimeType)] in request order."""
        out = []
        for p in self.parts:
            blob = p.get("inlineData") or p.get("inline_data")
            if blob:
                out.append((decode_base64(blob["data"]), blob.get("mimeType") or blob.get("mime_type") or ""))
        return out


@dataclass
class _Recorder:
    requests: list[RecordedRequest] = field(default_factory=list)
    fail_counts: dict[str, int] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    verbose: bool = False

    def add(self, rec: RecordedRequest) -> None:
        with self.cond:
            self.requests.append(rec)
            self.cond.notify_all()

    def end(self, rec: RecordedRequest, outcome: str, status: int | None = None) -> None:
        with self.cond:
            rec.outcome = outcome
            rec.ended_at = time.monotonic()
            if status is not None:
                rec.status = status
            self.cond.notify_all()
        if self.verbose:
            print(
                f"fake-gemini: {rec.method} model={rec.model} refs={len(rec.inline_images)} "
                f"status={rec.status} outcome={outcome} chunks={rec.chunks_sent}",
                file=sys.stderr,
                flush=True,
            )

    def bump(self, key: str) -> int:
        with self.cond:
            self.fail_counts[key] = self.fail_counts.get(key, 0) + 1
            return self.fail_counts[key]


def decode_base64(text: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not, as proto3 JSON `bytes` fields accept
    (https://protobuf.dev/programming-guides/json/); the google-genai SDK sends URL-safe base64.

    Raises:
        binascii.Error: not base64.
    """
    normalized = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(normalized + "=" * (-len(normalized) % 4), validate=True)


def parse_markers(prompt: str) -> dict[str, str]:
    """{'status': '429', 'slow': '', ...} from the `[fake:name=value]` markers of a prompt."""
    return {m.group(1): m.group(2) or "" for m in _MARKER.finditer(prompt)}


def error_body(code: int, message: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Gemini's JSON error body for an HTTP status; with a google.rpc.ErrorInfo detail if `reason` is set."""
    error: dict[str, Any] = {
        "code": code,
        "message": message or _STATUS_MESSAGES.get(code, f"fake error {code}"),
        "status": _STATUS_NAMES.get(code, "UNKNOWN"),
    }
    if reason:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return {"error": error}


# ----------------------------------------------------------------------------------------------------------
# the generated image


def _canvas_size(aspect_ratio: str | None, long_side: int = 512) -> tuple[int, int]:
    try:
        a, b = (float(x) for x in (aspect_ratio or "1:1").split(":"))
    except ValueError:
        a, b = 1.0, 1.0
    if a >= b:
        return long_side, max(1, round(long_side * b / a))
    return max(1, round(long_side * a / b)), long_side


def render_png(
    references: list[tuple[bytes, str]],
    prompt: str,
    *,
    aspect_ratio: str | None = None,
    candidate_index: int = 0,
) -> bytes:
    """A PNG collage of the reference images, tinted per prompt and candidate; a gradient without references.

    Returns:
        encoded PNG bytes, RGB, 512 px on the long side, shaped by `aspect_ratio` ('W:H').
    """
    width, height = _canvas_size(aspect_ratio)
    digest = hashlib.sha256(prompt.encode()).digest()
    tint = _TINTS[(digest[0] + candidate_index) % len(_TINTS)]
    canvas = Image.new("RGB", (width, height), (24, 24, 28))
    tiles = []
    for data, _mime in references:
        try:
            with Image.open(io.BytesIO(data)) as im:
                tiles.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError):
            tiles.append(Image.new("RGB", (64, 64), (128, 128, 128)))
    if tiles:
        cols = math.ceil(math.sqrt(len(tiles)))
        rows = math.ceil(len(tiles) / cols)
        cell_w, cell_h = width // cols, height // rows
        for i, tile in enumerate(tiles):
            box = (max(1, cell_w - 4), max(1, cell_h - 4))
            fitted = ImageOps.contain(tile, box, Image.Resampling.BILINEAR)
            x = (i % cols) * cell_w + (cell_w - fitted.width) // 2
            y = (i // cols) * cell_h + (cell_h - fitted.height) // 2
            canvas.paste(fitted, (x, y))
    else:
        ramp = Image.linear_gradient("L").resize((width, height))
        canvas = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ramp.rotate(90)))
    canvas = Image.blend(canvas, Image.new("RGB", (width, height), tint), 0.3)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, height - 18, width, height), fill=(0, 0, 0))
    draw.text((4, height - 15), f"local fake Gemini - candidate {candidate_index}", fill=(255, 255, 255))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------------
# the answer


def _candidate_count(body: dict[str, Any]) -> int:
    config = body.get("generationConfig") or {}
    try:
        return max(1, min(8, int(config.get("candidateCount") or 1)))
    except (TypeError, ValueError):
        return 1


def _chunks(rec: RecordedRequest, markers: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The response chunks of a successful request, built lazily (the image only after the text went out)."""
    prompt = rec.prompt
    references = rec.inline_images
    n = _candidate_count(rec.body)
    config = rec.body.get("generationConfig") or {}
    modalities = [m.upper() for m in (config.get("responseModalities") or ["TEXT", "IMAGE"])]
    aspect = (config.get("imageConfig") or {}).get("aspectRatio")
    prompt_tokens = len(prompt.split()) + INPUT_IMAGE_TOKENS * len(references)
    out_tokens = 0

    def usage() -> dict[str, int]:
        return {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": out_tokens,
            "totalTokenCount": prompt_tokens + out_tokens,
        }

    def chunk(parts_per_candidate: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
        candidates = []
        for i in range(n):
            cand: dict[str, Any] = {"index": i}
            if parts_per_candidate:
                cand["content"] = {"role": "model", "parts": [dict(p) for p in parts_per_candidate]}
            if finish:
                cand["finishReason"] = finish
            candidates.append(cand)
        return {"candidates": candidates, "usageMetadata": usage(), "modelVersion": rec.model}

    if "blocked" in markers:
        feedback = {"blockReason": "SAFETY"}
        yield {"promptFeedback": feedback, "usageMetadata": usage(), "modelVersion": rec.model}
        return
    if "blocked-output" in markers:
        yield chunk([], finish="IMAGE_SAFETY")
        return

    clean = _MARKER.sub("", prompt).strip()
    if "TEXT" in modalities:
        if "slow" in markers:
            texts = [f"part {i} " for i in range(_SLOW_TEXT_CHUNKS)]
        else:
            texts = [
                "Local fake Gemini: ",
                f"a collage of {len(references)} reference image(s) ",
                f"for {clean[:60]!r}.",
            ]
        for text in texts:
            out_tokens += len(text.split())
            yield chunk([{"text": text}])
    if "IMAGE" in modalities:
        candidates = []
        for i in range(n):
            png = render_png(references, clean, aspect_ratio=aspect, candidate_index=i)
            part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}}
            candidates.append({"index": i, "content": {"role": "model", "parts": [part]}})
        out_tokens += OUTPUT_IMAGE_TOKENS * n
        yield {"candidates": candidates, "usageMetadata": usage(), "modelVersion": rec.model}
    if "no-finish" in markers:
        return
    yield chunk([], finish="STOP")


def _merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streaming answer: every candidate's parts in one response (consecutive text joined)."""
    merged: dict[int, dict[str, Any]] = {}
    last: dict[str, Any] = {}
    for c in chunks:
        last = c
        for cand in c.get("candidates") or []:
            empty = {"index": cand["index"], "content": {"role": "model", "parts": []}}
            target = merged.setdefault(cand["index"], empty)
            parts = target["content"]["parts"]
            for p in (cand.get("content") or {}).get("parts") or []:
                if "text" in p and parts and "text" in parts[-1]:
                    parts[-1] = {"text": parts[-1]["text"] + p["text"]}
                else:
                    parts.append(p)
            if cand.get("finishReason"):
                target["finishReason"] = cand["finishReason"]
    out: dict[str, Any] = {k: v for k, v in last.items() if k != "candidates"}
    if merged:
        out["candidates"] = [merged[i] for i in sorted(merged)]
    return out


def _peer(request: web.Request) -> tuple[str, int] | None:
    peername = request.transport.get_extra_info("peername") if request.transport is not None else None
    return (str(peername[0]), int(peername[1])) if peername else None


def _closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pause(request: web.Request, seconds: float) -> bool:
    """Sleep `seconds`, checking every 10 ms whether the client went away; True if it did."""
    deadline = time.monotonic() + seconds
    while True:
        if _closed(request):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(0.01, left))


def build_app(recorder: _Recorder) -> web.Application:
    """The aiohttp application: every POST goes through one handler that records it and answers."""

    async def handle(request: web.Request) -> web.StreamResponse:
        match = _PATH.fullmatch(request.path)
        key = request.headers.get(API_KEY_HEADER) or request.query.get("key")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = {}
        rec = RecordedRequest(
            path=request.path,
            model=match["model"] if match else "",
            method=match["method"] if match else "",
            query={k: v for k, v in request.query.items() if k != "key"},
            headers={k: v for k, v in request.headers.items() if k.lower() != API_KEY_HEADER},
            api_key=key,
            body=body if isinstance(body, dict) else {},
            received_at=time.monotonic(),
            peer=_peer(request),
        )
        recorder.add(rec)

        def fail(code: int, message: str | None = None, reason: str | None = None) -> web.Response:
            recorder.end(rec, "error_status", code)
            return web.json_response(error_body(code, message, reason), status=code)

        if match is None:
            return fail(404, f"unknown path {request.path}")
        if not key:
            return fail(403, _STATUS_MESSAGES[403])
        if not rec.parts:
            return fail(400, "* GenerateContentRequest.contents: contents is not specified")
        try:
            rec.inline_images  # noqa: B018 - validates the base64 payloads
        except (binascii.Error, KeyError, ValueError):
            return fail(400, "Invalid value at 'contents[0].parts': inline data is not valid base64")

        markers = parse_markers(rec.prompt)
        if "delay" in markers and await _pause(request, float(markers["delay"] or 0) / 1000.0):
            recorder.end(rec, "client_disconnected")
            return web.Response(status=499)
        if "status" in markers:
            return fail(int(markers["status"]))
        if "invalid-key" in markers:
            return fail(400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID")
        if "fail-first" in markers and recorder.bump(rec.prompt) <= int(markers["fail-first"] or 0):
            return fail(500)

        if rec.method == "generateContent":
            answer = _merge(list(_chunks(rec, markers)))
            recorder.end(rec, "completed", 200)
            return web.json_response(answer)

        interval = float(markers["slow"] or 200) / 1000.0 if "slow" in markers else 0.0
        break_after = int(markers["break-after"]) if "break-after" in markers else None
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i, payload in enumerate(_chunks(rec, markers)):
                if break_after is not None and i >= break_after:
                    if request.transport is not None:
                        request.transport.abort()  # mid chunked body: the client sees an incomplete payload
                    recorder.end(rec, "dropped_by_server")
                    return response
                if i and interval and await _pause(request, interval):
                    recorder.end(rec, "client_disconnected")
                    return response
                if _closed(request):
                    recorder.end(rec, "client_disconnected")
                    return response
                await response.write(b"data: " + json.dumps(payload).encode() + b"\r\n\r\n")
                rec.chunks_sent += 1
            await response.write_eof()
        except ConnectionResetError:
            recorder.end(rec, "client_disconnected")
            return response
        recorder.end(rec, "completed", 200)
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("POST", "/{tail:.*}", handle)
    return app


# ----------------------------------------------------------------------------------------------------------
# running it


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; tiny race window)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeGemini:
    """The fake server in a background thread with its own event loop; a context manager.

    Args:
        host: interface to bind (loopback by default).
        port: TCP port; 0 picks a free one.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port()
        self._recorder = _Recorder()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """`http://host:port` — pass as `HttpOptions(base_url=...)`."""
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._recorder.cond:
            return list(self._recorder.requests)

    def requests_with(self, text: str) -> list[RecordedRequest]:
        """The recorded requests whose prompt contains `text`."""
        return [r for r in self.requests if text in r.prompt]

    def reset(self) -> None:
        """Forget recorded requests and fail-first counters."""
        with self._recorder.cond:
            self._recorder.requests.clear()
            self._recorder.fail_counts.clear()

    def wait_for(self, predicate: Callable[[list[RecordedRequest]], bool], timeout: float = 5.0) -> bool:
        """Block until `predicate(requests)` holds (re-checked on every record change); False on timeout."""
        with self._recorder.cond:
            return self._recorder.cond.wait_for(lambda: predicate(list(self._recorder.requests)), timeout)

    def start(self) -> FakeGemini:
        """Start serving; returns once the port accepts connections."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._runner = web.AppRunner(build_app(self._recorder), access_log=None, shutdown_timeout=1.0)
                loop.run_until_complete(self._runner.setup())
                loop.run_until_complete(web.TCPSite(self._runner, self.host, self.port).start())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-gemini", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            message = f"fake Gemini server failed to start on {self.base_url}: {errors[0]}"
            raise RuntimeError(message) from errors[0]
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeGemini:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


try:
    import pytest
except ImportError:  # standalone use without pytest installed
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def fake_gemini_server() -> Iterator[FakeGemini]:
        """A FakeGemini on a free loopback port for the session (module usable as pytest plugin)."""
        with FakeGemini() as fake:
            yield fake


async def _serve(host: str, port: int) -> None:
    recorder = _Recorder(verbose=True)
    runner = web.AppRunner(build_app(recorder), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"fake-gemini ready on http://{host}:{port} "
        "(a local stand-in for the Gemini API, not Google's service)",
        flush=True,
    )
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """CLI: `python tests/fake_gemini.py --port N [--host 127.0.0.1]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: a free one)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port or free_port()))


if __name__ == "__main__":
    main()
