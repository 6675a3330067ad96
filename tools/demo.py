"""`vitrine demo` (`make demo`): the whole system end to end on embedded defaults, offline.

1. Train the digits CLIP once (cached) and export it through the same path as any open_clip model.
2. Write the held-out digits (never trained on) as PNG files with metadata (label, split).
3. Start the Triton encoder server and the retrieval service as child processes (free loopback ports).
4. Ingest the data set over gRPC with a progress bar; search by English and Chinese text (phrasings unlike any
   training caption) and by an example image; print the top-10 with scores and precision@10; write a contact
   sheet PNG per query.
5. Generate one image from retrieved references with GenerateImages: against Gemini when
   VITRINE_GENERATION__API_KEY is set, else against the local stand-in server tests/fake_gemini.py (said so).
6. Stop every server.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from rich.console import Console

from export.demo import MODEL_NAME
from export.demo.captions import EVALUATION_TEMPLATES
from export.demo.data import load_split, render_item, write_dataset
from tools.ingest_folder import ingest_folder
from tools.processes import Child, Ports, free_port, local_stack
from tools.results import metadata_dict, print_results, results_contact_sheet
from vitrine.client import VitrineClient
from vitrine.manifest import Manifest
from vitrine.v1 import retrieval_service_pb2 as pb

TOP_K = 10


@dataclass
class PreparedDemo:
    """The demo model repository and data set, ready to serve."""

    repository: Path
    manifest: Manifest
    dataset: Path
    items: list  # export.demo.data.DemoItem


def prepare_demo(cache_dir: Path, repository: Path, dataset: Path, *, console: Console | None = None) -> PreparedDemo:
    """Train (cached) and export (cached by checkpoint) the demo model; write the held-out data set.

    The export is redone only when `repository`'s manifest names another checkpoint. Needs torch/open_clip.
    """
    from export.demo.cache import ensure_checkpoint  # noqa: PLC0415 - torch: training
    from export.onnx_export import EXPORTER_REVISION, export_repository  # noqa: PLC0415 - torch: exporting

    say = console.print if console else print
    t0 = time.perf_counter()
    checkpoint = ensure_checkpoint(cache_dir)
    say(f"demo model checkpoint: {checkpoint} ({time.perf_counter() - t0:.1f} s)")
    manifest = None
    try:
        manifest = Manifest.read(repository)
    except (FileNotFoundError, ValueError):
        pass
    if (manifest is None or manifest.pretrained != f"file:{checkpoint.name}"
            or manifest.exporter.get("revision") != EXPORTER_REVISION):  # made by an older export: redo it
        t0 = time.perf_counter()
        manifest = export_repository(MODEL_NAME, repository, checkpoint=checkpoint, overwrite=True)
        say(f"exported {manifest.model_id} to {repository} in {time.perf_counter() - t0:.1f} s")
    else:
        say(f"model repository up to date: {repository} ({manifest.model_id})")
    for tower, p in manifest.parity.items():
        say(f"  ONNX parity {tower}: min cosine {p.min_cosine:.7f}, max abs diff {p.max_abs_diff:.2e}")
    items = write_dataset(dataset, split="heldout")
    return PreparedDemo(repository, manifest, dataset, items)


def demo_queries() -> list[tuple[str, int, str]]:
    """(language, digit, text) for the demo's text queries: evaluation phrasings, never used in training."""

    en = [t for t in EVALUATION_TEMPLATES if t.language == "en"][:2]
    zh = [t for t in EVALUATION_TEMPLATES if t.language == "zh"][:2]
    return [("en", 7, en[0].format(7)), ("en", 3, en[1].format(3)),
            ("zh", 7, zh[0].format(7)), ("zh", 2, zh[1].format(2))]


GEMINI_STAND_IN_NOTE = ("no Gemini API key set (VITRINE_GENERATION__API_KEY): generating against the LOCAL "
                        "STAND-IN tests/fake_gemini.py, which speaks Gemini's REST/SSE protocol and returns a "
                        "collage of the reference images, not a real generation")


@contextmanager
def _gemini_for_demo(out: Path, console: Console) -> Iterator[dict[str, str]]:
    """Yield env for the retrieval service: the real Gemini when a key is set, else the local fake server."""
    if os.environ.get("VITRINE_GENERATION__API_KEY"):
        console.print("generation: real Gemini API (VITRINE_GENERATION__API_KEY is set)")
        yield {}
        return

    port = free_port()
    fake = Path(__file__).resolve().parents[1] / "tests" / "fake_gemini.py"
    log_path = out / "logs" / "fake_gemini.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(fake), "--port", str(port)], stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    child = Child("fake-gemini", proc, log_path)
    console.print(f"[yellow]{GEMINI_STAND_IN_NOTE}[/yellow] (port {port})")
    try:
        yield {"VITRINE_GENERATION__API_KEY": "local-stand-in-key",
               "VITRINE_GENERATION__BASE_URL": f"http://127.0.0.1:{port}"}
    finally:
        child.stop()


def _demo_generation(client, out: Path, console: Console) -> dict:  # noqa: ANN001
    """One GenerateImages call: two references found by a Chinese query, the result saved as PNG."""

    req = pb.GenerateImagesRequest(prompt="Turn this handwritten seven into a glowing neon sign on a brick wall",
                                   reference_count=2,
                                   reference_query=pb.ReferenceQuery(text="手写的阿拉伯数字7"))
    t0 = time.perf_counter()
    first_ms, images, texts, finished = None, [], [], None
    for msg in client.stub.GenerateImages(req, timeout=120):
        kind = msg.WhichOneof("event")
        if kind != "references" and first_ms is None:
            first_ms = (time.perf_counter() - t0) * 1e3
        if kind == "references":
            refs = ", ".join(f"{r.image.filename} ({r.score:.3f})" for r in msg.references.references)
            console.print(f"generation references: {refs}")
        elif kind == "text":
            texts.append(msg.text.text)
        elif kind == "image":
            path = out / f"generated_{len(images)}{'.png' if msg.image.mime_type == 'image/png' else '.bin'}"
            path.write_bytes(msg.image.data)
            images.append(str(path))
        else:
            finished = msg.finished
    console.print(f"generation: {''.join(texts)!r}; images {images}; finish {finished.finish_reason}; first part "
                  f"after {first_ms:.1f} ms over gRPC")
    return {"images": images, "text": "".join(texts), "finish_reason": finished.finish_reason,
            "first_part_ms": first_ms, "total_ms": (time.perf_counter() - t0) * 1e3}


def example_query_image(index: int = 0):  # noqa: ANN201
    """A digit from the train split (so not in the ingested held-out set) as PNG bytes: (DemoItem, bytes)."""


    item = load_split("train")[index]
    buf = io.BytesIO()
    render_item(item).save(buf, format="PNG")
    return item, buf.getvalue()


def precision_at_k(labels: list[int], wanted: int, k: int = TOP_K) -> float:
    """Fraction of the first `k` result labels equal to `wanted` (precision@k; missing results count as misses)."""
    return sum(1 for label in labels[:k] if label == wanted) / k


def run_demo(*, out: Path, cache_dir: Path, console: Console) -> dict:
    """Run the demo (see module docstring); returns the numbers it printed and writes them to out/summary.json."""

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_demo(cache_dir, cache_dir / "demo" / "model_repository", cache_dir / "demo" / "dataset",
                            console=console)
    ports = Ports.free()
    gemini = _gemini_for_demo(out, console)
    console.print(f"starting Triton encoder (gRPC :{ports.encoder_grpc}, HTTP :{ports.encoder_http}) and the "
                  f"retrieval service (:{ports.service}); Milvus Lite at {out / 'milvus.db'}")
    summary: dict = {"model_id": prepared.manifest.model_id, "queries": []}
    with gemini as service_env, local_stack(prepared.repository, ports=ports, milvus_uri=str(out / "milvus.db"),
                                            blob_dir=out / "blobs", log_dir=out / "logs",
                                            service_env=service_env) as stack:
        report = ingest_folder(stack.target, prepared.dataset)
        console.print(report.summary())
        summary["ingest"] = {"images": report.total, "seconds": report.seconds,
                             "images_per_s": report.images_per_s,
                             "outcomes": {str(k): v for k, v in report.outcomes.items()}}
        with VitrineClient(stack.target) as client:
            stats = client.stats()
            console.print(f"collection {stats.collection}: {stats.image_count} images, dim {stats.embedding_dim}, "
                          f"{stats.index_type}/{stats.metric_type}")
            query_item, query_image = example_query_image()
            queries = [(lang, digit, text, None) for lang, digit, text in demo_queries()]
            queries.append(("image", query_item.label, f"image of a training-split {query_item.label} "
                                                       f"(not in the collection)", query_image))
            for i, (lang, digit, text, image) in enumerate(queries):
                resp = client.search(text=None if image else text, image=image, top_k=TOP_K)
                labels = [metadata_dict(r.image).get("label") for r in resp.results]
                p10 = precision_at_k(labels, digit)
                print_results(console, text, resp)
                console.print(f"precision@10 for digit {digit}: {p10:.2f}")
                sheet = results_contact_sheet(client, out / f"query_{i}_{lang}.png", f"{text}  (digit {digit})",
                                              resp, image)
                summary["queries"].append({"language": lang, "digit": digit, "query": text,
                                           "precision_at_10": p10, "contact_sheet": str(sheet),
                                           "top10": [{"score": r.score, "label": l, "filename": r.image.filename}
                                                     for r, l in zip(resp.results, labels)]})
            latencies = []
            for _ in range(3):
                for _, _, text, _ in queries[:-1]:
                    t0 = time.perf_counter()
                    client.search(text=text, top_k=TOP_K)
                    latencies.append((time.perf_counter() - t0) * 1e3)
            summary["search_p50_ms"] = median(latencies)
            console.print(f"search latency over gRPC (text, top_k 10): p50 {summary['search_p50_ms']:.1f} ms "
                          f"over {len(latencies)} queries")
            summary["generation"] = _demo_generation(client, out, console)
    summary["wall_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    console.print(f"contact sheets and summary.json in {out}/; servers stopped. Demo took {summary['wall_s']:.1f} s")
    return summary
