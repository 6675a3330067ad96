"""The `vitrine` command line: export, train the demo model, serve, ingest, search, embed, stats, delete, demo.

Serving commands import neither torch nor open_clip; only `export`, `train-demo` and `demo` do (lazily).
Run `vitrine --help` or `vitrine COMMAND --help`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import grpc
import numpy as np
import typer
from google.protobuf import json_format
from rich.console import Console

from export import ExportError
from retrieval_service.logs import configure_logging
from tools.bench.cli import bench_app
from tools.generate import generate_one, run_batch
from tools.ingest_folder import ingest_folder
from tools.processes import Ports, local_stack
from tools.results import print_results, results_contact_sheet
from vitrine.client import Embeddings, VitrineClient, guess_suffix

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)
app.add_typer(bench_app, name="bench")

DEFAULT_TARGET = "127.0.0.1:50051"
Target = Annotated[str, typer.Option("--target", "-t", help="retrieval service host:port", envvar="VITRINE_TARGET")]


@app.callback()
def _client_security(
    token: Annotated[Optional[str], typer.Option(
        envvar="VITRINE_TOKEN", show_default=False,
        help="bearer token for the retrieval service (prefer env VITRINE_TOKEN: a flag is visible in `ps`)")] = None,
    tls_ca: Annotated[Optional[Path], typer.Option(
        "--tls-ca", envvar="VITRINE_TLS_CA", help="PEM CA to verify the retrieval service with (turns TLS on)")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(
        "--tls-cert", envvar="VITRINE_TLS_CERT", help="PEM client certificate (mutual TLS)")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(
        "--tls-key", envvar="VITRINE_TLS_KEY", help="PEM key of --tls-cert")] = None,
    tls: Annotated[bool, typer.Option(
        "--tls", envvar="VITRINE_USE_TLS", help="TLS with the system roots (implied by --tls-ca)")] = False,
) -> None:
    """Client security options, given before the command (`vitrine --tls-ca ca.pem search ...`).

    They are put in the environment (VITRINE_TOKEN, VITRINE_TLS_*), where `vitrine.client.VitrineClient` reads
    them, so every client command and helper uses them.
    """

    for name, value in (("VITRINE_TOKEN", token), ("VITRINE_TLS_CA", tls_ca), ("VITRINE_TLS_CERT", tls_cert),
                        ("VITRINE_TLS_KEY", tls_key), ("VITRINE_USE_TLS", "1" if tls else None)):
        if value:
            os.environ[name] = str(value)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _ints(csv: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in csv.split(",") if x.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated integers, got {csv!r}") from exc


# --- model side (torch) --------------------------------------------------------------------------------------

@app.command()
def export(
    model: Annotated[str, typer.Argument(help="open_clip model name, e.g. ViT-B-32")],
    output: Annotated[Path, typer.Option("--output", "-o", help="model repository folder to write")],
    pretrained: Annotated[Optional[str], typer.Option(help="open_clip pretrained tag (needs network or cache), "
                                                          "or 'random'")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="local open_clip checkpoint file")] = None,
    name_prefix: Annotated[str, typer.Option(help="Triton model names: <prefix>_image, <prefix>_text")] = "clip",
    precision: Annotated[str, typer.Option(help="fp32, int8 (ONNX Runtime dynamic quantization, CPU) or fp16 "
                                                "(GPU only)")] = "fp32",
    max_batch_size: int = 64,
    preferred_batch_sizes: Annotated[str, typer.Option(help="comma-separated")] = "8,16,32",
    max_queue_delay_microseconds: int = 2000,
    instances: Annotated[int, typer.Option(help="Triton instance_group count")] = 1,
    gpu: Annotated[bool, typer.Option(help="KIND_GPU instances + TensorRT FP16 accelerator in config.pbtxt")] = False,
    dynamic_text: Annotated[bool, typer.Option(help=(
        "text tower with a dynamic sequence axis (queries padded to a length bucket, not the context length) "
        "where the model allows it exactly; --no-dynamic-text: fixed context length"))] = True,
    text_buckets: Annotated[str, typer.Option(help="comma-separated token lengths below the context length that "
                                                   "text queries are padded up to")] = "8,16,32",
    overwrite: bool = False,
    verbose: bool = False,
) -> None:
    """Export an open_clip model's image and text towers to ONNX and write a Triton model repository."""
    _logging(verbose)
    from export.onnx_export import export_repository  # noqa: PLC0415 - torch, open_clip

    try:
        manifest = export_repository(
            model, output, pretrained=pretrained, checkpoint=checkpoint, name_prefix=name_prefix,
            precision=precision, max_batch_size=max_batch_size, preferred_batch_sizes=_ints(preferred_batch_sizes),
            max_queue_delay_microseconds=max_queue_delay_microseconds, instance_count=instances, gpu=gpu,
            overwrite=overwrite, dynamic_length=dynamic_text, text_buckets=_ints(text_buckets),
        )
    except ExportError as exc:
        console.print(f"[red]export failed:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"wrote {output}: model_id={manifest.model_id} dim={manifest.embedding_dim} text lengths="
                  + (f"{list(manifest.text.buckets)} (dynamic)" if manifest.text.dynamic_length
                     else f"{manifest.text.context_length} (fixed)"))
    from export.parity import ParityReport  # noqa: PLC0415 - torch

    report = ParityReport.read(output)
    if report is None:
        for tower, p in manifest.parity.items():
            console.print(f"  parity {tower}: min cosine {p.min_cosine:.7f}, max abs diff {p.max_abs_diff:.2e}")
    else:
        console.print(f"  precision {report.precision}" + (f" ({report.quantization})" if report.quantization else ""))
        for line in report.summary_lines():
            console.print(f"  {line}")


@app.command("train-demo")
def train_demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="model repository to write")] = Path(
        ".cache/demo/model_repository"),
    cache_dir: Annotated[Path, typer.Option(help="where the trained checkpoint is cached")] = Path(".cache"),
    dataset: Annotated[Path, typer.Option(help="where the held-out digits are written as PNG")] = Path(
        ".cache/demo/dataset"),
) -> None:
    """Train (or reuse) the offline demo CLIP on scikit-learn digits, export it, write the demo data set."""
    _logging(False)
    from tools.demo import prepare_demo  # noqa: PLC0415 - export.demo, numpy, PIL: only for this verb

    prepared = prepare_demo(cache_dir, output, dataset)
    console.print(f"model repository: {prepared.repository} ({prepared.manifest.model_id})")
    console.print(f"data set: {prepared.dataset} ({len(prepared.items)} images)")


# --- servers (no torch) ---------------------------------------------------------------------------------------

@app.command("serve-encoder")
def serve_encoder(
    repository: Annotated[Path, typer.Option(help="Vitrine/Triton model repository")] = Path(
        ".cache/demo/model_repository"),
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    ort_threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads")] = None,
    verbose: bool = False,
) -> None:
    """Serve the repository's towers with Triton (KServe v2 gRPC + HTTP, Prometheus metrics) until SIGTERM."""
    _logging(verbose)
    from encoder_server.server import EncoderServer  # noqa: PLC0415 - PyTriton, onnxruntime: serve-encoder only

    server = EncoderServer(repository, host=host, http_port=http_port, grpc_port=grpc_port,
                           metrics_port=metrics_port, ort_threads=ort_threads)
    server.serve_forever()


@app.command()
def serve(
    config: Annotated[Optional[Path], typer.Option(help="YAML settings file")] = None,
    repository: Annotated[Optional[Path], typer.Option(help="model repository (manifest + tokenizer)")] = None,
    host: Optional[str] = None,
    port: Optional[int] = None,
    encoder_url: Annotated[Optional[str], typer.Option(help="Triton gRPC host:port")] = None,
    milvus_uri: Annotated[Optional[str], typer.Option(help="Milvus Lite file or http://host:19530")] = None,
    blob_dir: Optional[Path] = None,
    index_type: Annotated[Optional[str], typer.Option(help="FLAT, IVF_FLAT or HNSW")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(
        help="Prometheus /metrics HTTP port (default 9464; 0 = a free port, -1 = off)")] = None,
    log_format: Annotated[Optional[str], typer.Option(help="text or json (one JSON object per line)")] = None,
    verbose: Annotated[bool, typer.Option(help="log at DEBUG")] = False,
) -> None:
    """Run the gRPC retrieval service until SIGTERM (flags > VITRINE_* env > --config file > defaults)."""

    from retrieval_service.grpc.server import serve as serve_async  # noqa: PLC0415 - tritonclient, pymilvus
    from retrieval_service.settings import Settings  # noqa: PLC0415 - imports the Milvus adapter (pymilvus)

    overrides = dict(model_repository=repository, host=host, port=port, encoder_url=encoder_url,
                     milvus_uri=milvus_uri, blob_dir=blob_dir, metrics_port=metrics_port, log_format=log_format,
                     log_level="DEBUG" if verbose else None)
    if index_type:
        overrides["index"] = {"index_type": index_type}
    settings = Settings.load(config, **overrides)
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(serve_async(settings))


@app.command()
def up(
    repository: Path = Path(".cache/demo/model_repository"),
    milvus_uri: str = "var/milvus.db",
    blob_dir: Path = Path("var/blobs"),
) -> None:
    """Start the encoder server and the retrieval service on the default ports for local use; Ctrl-C stops."""
    _logging(False)

    with local_stack(repository, ports=Ports(), milvus_uri=milvus_uri, blob_dir=blob_dir,
                     log_dir=Path("var/logs")) as stack:
        console.print(f"retrieval service on {stack.target}; Triton gRPC :{stack.ports.encoder_grpc}, HTTP "
                      f":{stack.ports.encoder_http}, metrics :{stack.ports.encoder_metrics}; logs in var/logs")
        try:
            while all(c.alive() for c in stack.children):
                time.sleep(1)
        except KeyboardInterrupt:
            pass


# --- client commands ------------------------------------------------------------------------------------------

@app.command()
def ingest(
    folder: Annotated[Path, typer.Argument(help="folder of images (recursive)")],
    metadata: Annotated[Optional[Path], typer.Option(help="JSONL of {filename, ...}; default <folder>/"
                                                          "metadata.jsonl")] = None,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Ingest every image under FOLDER with a progress bar; prints counts and images/s."""

    report = ingest_folder(target, folder, metadata)
    console.print(report.summary())
    if report.rejected:
        raise typer.Exit(1)


@app.command()
def search(
    text: Annotated[Optional[str], typer.Argument(help="text query")] = None,
    image: Annotated[Optional[Path], typer.Option(help="image file to search by")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 10,
    filter: Annotated[str, typer.Option(help='Milvus expression, e.g. metadata["label"] == 3')] = "",
    min_score: Optional[float] = None,
    page_token: str = "",
    as_json: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
    contact_sheet: Annotated[Optional[Path], typer.Option(help="write a PNG of the results")] = None,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Search by TEXT or --image; prints rank, score, id, filename and metadata."""


    if (text is None) == (image is None):
        raise typer.BadParameter("give a TEXT query or --image (one of them)")
    query_bytes = image.read_bytes() if image else None
    with VitrineClient(target) as client:
        try:
            resp = client.search(text=text, image=query_bytes, top_k=top_k, filter=filter, min_score=min_score,
                                 page_token=page_token)
        except grpc.RpcError as exc:
            console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(2) from exc
        if as_json:
            print(json_format.MessageToJson(resp, ensure_ascii=False))
        else:
            print_results(console, text if text is not None else f"image {image}", resp)
        if contact_sheet:
            results_contact_sheet(client, contact_sheet, text or f"image: {image.name}", resp, query_bytes)
            console.print(f"contact sheet: {contact_sheet}")


def _embedding_lines(kind: str, inputs: list[str], result: Embeddings, first_row: int,
                     with_values: bool) -> list[dict]:
    """One JSON-able dict per item of `result`: kind, input, row (in the --out array), then the vector's
    facts and values (`with_values`) or its error."""
    lines = []
    for i, name in enumerate(inputs):
        line: dict = {"kind": kind, "input": name, "row": first_row + i}
        error = result.errors.get(i)
        if error is not None:
            line["error"] = {"code": error.code, "message": error.message, "field": error.field,
                             "reason": error.reason}
        else:
            if kind == "text":
                line.update(token_count=int(result.token_counts[i]), truncated=bool(result.truncated[i]))
            line["cached"] = bool(result.cached[i])
            if with_values:
                line["values"] = result.vectors[i].tolist()
        lines.append(line)
    return lines


@app.command()
def embed(
    text: Annotated[Optional[list[str]], typer.Option("--text", help="text to embed (repeatable)")] = None,
    texts_file: Annotated[Optional[Path], typer.Option(
        help="UTF-8 file of texts to embed, one per line (empty lines skipped)")] = None,
    image: Annotated[Optional[list[Path]], typer.Option("--image", help="image file to embed (repeatable)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=(
        "write the vectors to this .npy file (numpy adds the suffix when missing), float32 [N, D]: texts then "
        "images in the order given, NaN rows for refused items; stdout then lists the items without values"))] = None,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Embed texts (--text, --texts-file) and images (--image) with the collection's model (EmbedTexts /
    EmbedImages, one call each); prints one JSON object per item (kind, input, row, token_count, truncated,
    cached, values or error). Exit 1 when an item was refused, 2 when a call failed."""

    texts = list(text or [])
    if texts_file is not None:
        texts += [line for line in texts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    images = list(image or [])
    if not texts and not images:
        raise typer.BadParameter("give at least one --text, --texts-file line or --image")
    lines: list[dict] = []
    vectors: list[np.ndarray] = []
    summary: list[str] = []
    refused = 0
    with VitrineClient(target) as client:
        try:
            calls = (("text", texts, client.embed_texts), ("image", images, client.embed_images))
            for kind, inputs, embed_call in calls:
                if not inputs:
                    continue
                result = embed_call(inputs)
                lines += _embedding_lines(kind, [str(x) for x in inputs], result, sum(len(v) for v in vectors),
                                          with_values=out is None)
                vectors.append(result.vectors)
                refused += len(result.errors)
                summary.append(f"{len(inputs)} {kind}(s) in {result.encode_ms:.0f} ms encode")
        except grpc.RpcError as exc:
            err_console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(2) from exc
        except FileNotFoundError as exc:
            err_console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from exc
    for line in lines:
        print(json.dumps(line, ensure_ascii=False))
    if out is not None:
        np.save(out, np.concatenate(vectors).astype(np.float32))
    err_console.print(f"embedded {', '.join(summary)} with {result.model_id} (dim {result.embedding_dim})"
                      + (f"; {refused} refused" if refused else "") + (f"; vectors in {out}" if out else ""), soft_wrap=True)
    if refused:
        raise typer.Exit(1)


@app.command()
def stats(target: Target = DEFAULT_TARGET) -> None:
    """Print collection statistics (count, model id, dim, index)."""


    with VitrineClient(target) as client:
        print(json_format.MessageToJson(client.stats()))


@app.command()
def delete(
    ids: Annotated[Optional[list[str]], typer.Option("--id", help="image id (repeatable)")] = None,
    filter: Annotated[str, typer.Option(help="Milvus expression selecting images to delete")] = "",
    target: Target = DEFAULT_TARGET,
) -> None:
    """Delete images by --id (repeatable) or --filter."""

    with VitrineClient(target) as client:
        console.print(f"deleted {client.delete(image_ids=ids or [], filter=filter)} images")


@app.command()
def get(
    image_id: str,
    output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Fetch a stored image by id and write it to --output (default <id><suffix>)."""

    with VitrineClient(target) as client:
        resp = client.get_image(image_id)
    path = output or Path(image_id + guess_suffix(resp.mime_type))
    path.write_bytes(resp.content)
    console.print(f"{path} ({resp.mime_type}, {len(resp.content)} bytes, {resp.image.filename})")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="instruction for the image model")],
    reference_query: Annotated[Optional[str], typer.Option(help="find references by this text")] = None,
    reference_image: Annotated[Optional[Path], typer.Option(help="find references like this image")] = None,
    reference_id: Annotated[Optional[list[str]], typer.Option(help="explicit reference id (repeatable)")] = None,
    references: Annotated[int, typer.Option(help="how many references a query retrieves")] = 1,
    filter: Annotated[str, typer.Option(help="Milvus filter for the reference query")] = "",
    model: Annotated[str, typer.Option(help="Gemini model; default the service's")] = "",
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    aspect_ratio: Optional[str] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the generated files")] = Path(
        "generated"),
    stem: str = "generation",
    target: Target = DEFAULT_TARGET,
) -> None:
    """Generate images with Gemini from retrieved references; saves them and prints where."""


    options = {k: v for k, v in dict(temperature=temperature, seed=seed, aspect_ratio=aspect_ratio).items()
               if v is not None}
    with VitrineClient(target) as client:
        try:
            result = generate_one(client, prompt, reference_text=reference_query,
                                  reference_image=reference_image.read_bytes() if reference_image else None,
                                  reference_ids=reference_id or (), reference_count=references, filter=filter,
                                  model=model, options=options, out_dir=output, stem=stem)
        except grpc.RpcError as exc:
            console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(2) from exc
    for ref in result.references:
        console.print(f"reference: {ref}")
    if result.text:
        console.print(f"text: {result.text}")
    for path in result.images:
        console.print(f"image: {path}")
    state = f"blocked ({result.block_reason})" if result.blocked else result.finish_reason
    console.print(f"finish: {state}; first part {result.first_part_ms:.0f} ms, total {result.total_ms:.0f} ms")
    if result.blocked:
        raise typer.Exit(1)


@app.command("generate-batch")
def generate_batch(
    plan: Annotated[Path, typer.Argument(help="plan file, YAML or CSV (see tools/generate_plan.py)")],
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("generated"),
    concurrency: Annotated[Optional[int], typer.Option(help="calls in flight; default the plan's")] = None,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Run a generation plan (prompt template x rows x scenes): bounded concurrency, resumable, report file."""

    report = run_batch(target, plan, output, concurrency=concurrency)
    console.print(f"{report.counts} in {report.wall_s:.1f} s; report: {report.report_json}, {report.report_csv}")
    if report.counts.get("failed"):
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where results, contact sheets and the demo database go")] = Path(
        "demo_out"),
    cache_dir: Path = Path(".cache"),
) -> None:
    """End to end on embedded defaults: train/export the demo model, start both servers, ingest, search."""
    _logging(False)
    from tools.demo import run_demo  # noqa: PLC0415 - export.demo, numpy, PIL: only for this verb

    run_demo(out=out, cache_dir=cache_dir, console=console)


if __name__ == "__main__":
    app()

