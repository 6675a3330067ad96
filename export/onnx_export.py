"""`export_repository`: open_clip model -> two ONNX towers + a Triton model repository.

Layout (the contract is `vitrine.manifest`):

    <output>/manifest.json, tokenizer.json
    <output>/<prefix>_image/config.pbtxt, <output>/<prefix>_image/1/model.onnx
    <output>/<prefix>_text/config.pbtxt,  <output>/<prefix>_text/1/model.onnx

Everything is written into a hidden staging folder next to `output` and renamed into place only
after every check passed (onnx.checker, the ONNX Runtime vs PyTorch parity gate, tokenizer.json vs
open_clip ids), so a failed export leaves no partial repository.

Exporter: the image tower (and a text tower without an exact dynamic-length form) goes through the
TorchScript exporter (`dynamo=False`, deprecated but present in torch 2.14) with a dynamic batch axis. The
text tower of open_clip's built-in text transformer goes through the dynamo exporter (`torch.export` +
`onnxscript`) as `export.towers.DynamicTextTower` with dynamic batch and sequence axes: one graph that takes
any 2..context_length tokens, so clients pad a query to a short length bucket (8/16/32/77) instead of 77;
its parity gate runs at every bucket length against open_clip at the padded context length.

Precision: 'fp32' (default), 'int8' or 'fp16'. int8 exports the float32 graphs, then quantizes them with
ONNX Runtime dynamic quantization (`export.quantize`: int8 weights, MatMul/Gemm/Gather, per channel); it is
a CPU export (the dynamic-quantization kernels are ONNX Runtime CPU kernels, not TensorRT ones).
fp16 converts the weights to half before tracing; the
graphs keep uint8/int64 inputs and float32 outputs, and run in half inside. fp16 is GPU-only
(`gpu=True`): ONNX Runtime 1.32's CPU provider segfaults creating a session for these fp16 graphs
at its default optimization level (ORT_ENABLE_ALL). The export's parity gate still runs them on
the CPU, at ORT_ENABLE_EXTENDED, against the float32 PyTorch model. bf16 is not offered: ONNX Runtime
1.32's CPU provider has no bfloat16 MatMul kernel (NOT_IMPLEMENTED), and fp16 graphs on the CPU ran at
15.8 images/s against 42.5 for fp32 (ViT-B-32 image tower, batch 32, 2 Zen 4 threads).

The parity gate compares every export with the float32 PyTorch model (threshold by precision,
`parity.PARITY_THRESHOLDS`); for a model with a held-out set (the demo) it also measures text -> image
recall@10 / precision@10 of the exported towers against float32 PyTorch. Both go to
`<output>/parity_report.json` (`parity.ParityReport`).
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import tokenizers
import torch

from export import ExportError
from export import parity as parity_mod
from export import quantize as quantize_mod
from export.loading import LoadedModel, load_open_clip
from export.tokenizer_json import write_tokenizer_json
from export.towers import DynamicTextTower, ImageTower, TextTower, supports_dynamic_length
from vitrine.triton_config import TensorSpec, build_model_config, check_batching, write_model_config
from vitrine.manifest import MANIFEST_FILE, TOKENIZER_FILE, Manifest, TowerParity
from vitrine.manifest import ImageTower as ImageTowerSpec
from vitrine.manifest import TextTower as TextTowerSpec

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
MODEL_VERSION = "1"
IMAGE_INPUT, TEXT_INPUT, OUTPUT = "pixels", "input_ids", "embedding"
PRECISIONS = ("fp32", "fp16", "int8")
#: Bumped when the export's output changes in a way a cached repository must be redone for (tools/demo.py).
EXPORTER_REVISION = "vitrine-export-2"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _validate(
    name_prefix: str,
    precision: str,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_microseconds: int,
    instance_count: int,
    gpu: bool,
    opset: int,
) -> None:
    if not _NAME.match(name_prefix):
        raise ExportError(f"name_prefix {name_prefix!r} must match {_NAME.pattern} (it names Triton models)")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and not gpu:
        raise ExportError(
            "precision='fp16' is GPU-only (--gpu): ONNX Runtime's CPU provider crashes on fp16 graphs at its "
            "default optimization level and has few fp16 CPU kernels; export fp32 for CPU serving"
        )
    if precision == "int8" and gpu:
        raise ExportError(
            "precision='int8' is a CPU export (ONNX Runtime dynamic quantization: DynamicQuantizeLinear / "
            "MatMulInteger run on ONNX Runtime's CPU kernels, not in TensorRT); drop --gpu, or export fp16 "
            "for GPUs"
        )
    try:  # the same checks build_model_config runs, before minutes of export rather than after
        check_batching(max_batch_size, preferred_batch_sizes, max_queue_delay_microseconds, instance_count)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    if not 14 <= opset <= 20:  # 14: first opset with the ops these towers need; 20: newest tested
        raise ExportError(f"opset must be in 14..20, got {opset}")


def _check_output(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"output {output} exists and is not a folder")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"output {output} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not (output / MANIFEST_FILE).is_file():
        raise ExportError(f"refusing to overwrite {output}: it is not empty and holds no {MANIFEST_FILE}")


def _onnx_export(
    module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, opset: int
) -> None:
    """Trace `module` on `example` to `path` with a dynamic batch axis, then run onnx.checker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Tracer warnings here are shape assertions in nn.MultiheadAttention (constant per model).
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        # Text pooling indexes rows at argmax(ids): never negative, the case this warns about.
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
        # nn.MultiheadAttention's fused inference path (aten::_native_multi_head_attention) has no
        # ONNX symbolic; switch it off while tracing.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=[input_name],
                output_names=[OUTPUT],
                dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
        except RuntimeError as exc:  # torch.onnx.errors.OnnxExporterError and tracing errors
            raise ExportError(f"torch.onnx.export of {type(module).__name__} failed: {exc}") from exc
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {path}: {exc}") from exc


#: Default length buckets of a dynamic-length text tower (those below the context length, then it). Short
#: buckets because most search queries are a few words: 8 tokens hold "<sot> red silk cape with gold trim <eot>".
DEFAULT_LENGTH_BUCKETS = (8, 16, 32)
#: The dynamo exporter's lowest well-supported opset (torch 2.14 translates to 18 and converts down with warnings).
DYNAMO_MIN_OPSET = 18


def length_buckets(context_length: int, requested: Sequence[int] | None = None) -> tuple[int, ...]:
    """Ascending bucket lengths for a dynamic text tower: `requested` (default DEFAULT_LENGTH_BUCKETS) below
    `context_length`, then `context_length` itself.

    Raises:
        ExportError: a requested bucket < 2 or > context_length.
    """
    requested = DEFAULT_LENGTH_BUCKETS if requested is None else tuple(requested)
    bad = [b for b in requested if not 2 <= b <= context_length]
    if bad:
        raise ExportError(f"text length buckets {bad} are outside [2, context_length {context_length}]")
    return tuple(sorted({b for b in requested if b < context_length})) + (context_length,)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value `old` to `new` everywhere in `graph` (node inputs/outputs, graph io, value_info,
    initializers)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in collection:
            if item.name == old:
                item.name = new


def _onnx_export_dynamic_text(module: torch.nn.Module, example: torch.Tensor, path: Path, context_length: int,
                              opset: int) -> int:
    """Export `module` (a `DynamicTextTower`) with dynamic batch AND sequence axes to `path`: torch's dynamo
    exporter (`torch.export` + onnxscript) with `dynamic_shapes`, since the TorchScript tracer bakes the traced
    length into the attention reshapes. Returns the opset used (>= DYNAMO_MIN_OPSET).

    The dynamo exporter names some internal values after their op; one called 'embedding' (the token embedding
    Gather) would clash with the graph output 'embedding' in ONNX Runtime ("Duplicate definition of name"), so the
    graph is exported with a private output name and renamed afterwards.
    """
    from torch.export import Dim  # noqa: PLC0415

    opset = max(opset, DYNAMO_MIN_OPSET)
    private = "vitrine_text_embedding_output"
    path.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):  # per-pass INFO lines
                logging.getLogger(noisy).setLevel(logging.WARNING)
            torch.onnx.export(
                module, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                input_names=[TEXT_INPUT], output_names=[private], opset_version=opset,
                dynamic_shapes={"input_ids": {0: Dim("batch", min=1, max=65536),
                                              1: Dim("seq", min=2, max=context_length)}},
            )
    except Exception as exc:  # torch.export / onnxscript raise many kinds
        raise ExportError(f"dynamic-length export of the text tower failed: {exc}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    graph_model = onnx.load(str(path))
    taken = {name for node in graph_model.graph.node for name in node.output}
    if OUTPUT in taken or any(i.name == OUTPUT for i in graph_model.graph.initializer):
        _rename_value(graph_model.graph, OUTPUT, "vitrine_internal_embedding")
    _rename_value(graph_model.graph, private, OUTPUT)
    onnx.save(graph_model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {path}: {exc}") from exc
    return opset


def _text_parity_by_length(session: ort.InferenceSession, token_ids: np.ndarray, reference: np.ndarray,
                           buckets: Sequence[int], pad_id: int, threshold: float) -> TowerParity:
    """Parity of a dynamic-length text graph: every row at every bucket length that holds it (the padded
    context length included) against open_clip's `encode_text` at the padded context length.

    Raises:
        ExportError: a length the graph refuses, or min cosine below `threshold` (message names the length).
    """
    counts = (token_ids != pad_id).sum(axis=1)
    candidate, expected = [], []
    for length in buckets:
        rows = np.flatnonzero(counts <= length)
        if not len(rows):
            continue
        try:
            out = session.run([OUTPUT], {TEXT_INPUT: np.ascontiguousarray(token_ids[rows, :length])})[0]
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument classes
            raise ExportError(f"the dynamic-length text graph refused length {length}: {exc}") from exc
        one = parity_mod.compare(f"text at length {length}", out, reference[rows], threshold)
        log.info("text tower parity at length %d: %d rows, min cosine %.7f", length, len(rows), one.min_cosine)
        candidate.append(out)
        expected.append(reference[rows])
    return parity_mod.compare("text", np.concatenate(candidate), np.concatenate(expected), threshold)


def _cpu_session(path: Path, precision: str) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for one exported graph.

    fp16 graphs run at ORT_ENABLE_EXTENDED: ONNX Runtime 1.32's CPU EP crashes (SIGSEGV) creating a
    session for them at the default ORT_ENABLE_ALL (measured on the ViT towers here).
    """
    options = ort.SessionOptions()
    if precision == "fp16":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_batched(
    session: ort.InferenceSession, input_name: str, value: np.ndarray, rows: int = 64
) -> np.ndarray:
    """`session`'s output for `value`, `rows` rows at a time (bounded memory); float32 [B, D]."""
    return np.concatenate([session.run([OUTPUT], {input_name: value[i:i + rows]})[0]
                           for i in range(0, len(value), rows)])


def _retrieval_parity(
    loaded: LoadedModel, image_session: ort.InferenceSession, text_session: ort.InferenceSession
) -> parity_mod.RetrievalParity | None:
    """Text -> image recall@10 / precision@10 of the ONNX towers vs float32 PyTorch on the held-out set."""
    heldout = parity_mod.heldout_set(loaded.model_name)
    if heldout is None:
        return None
    pixels, reference_input = parity_mod.image_batch(heldout.images, loaded.preprocess.eval_transform())
    token_ids = loaded.tokenizer(heldout.texts)
    result = parity_mod.retrieval_parity(
        heldout,
        candidate_text=_run_batched(text_session, TEXT_INPUT, token_ids.numpy()),
        candidate_image=_run_batched(image_session, IMAGE_INPUT, pixels),
        reference_text=parity_mod.reference_text_embeddings(loaded.model, token_ids),
        reference_image=parity_mod.reference_image_embeddings(loaded.model, reference_input),
    )
    log.info("retrieval parity on %s: recall@%d %.4f, precision@%d %.4f (fp32 PyTorch %.4f)", result.dataset,
             result.k, result.recall_at_k, result.k, result.precision_at_k, result.reference_precision_at_k)
    return result


def _verify_tokenizer_file(path: Path, loaded: LoadedModel, pad_id: int, texts: Sequence[str]) -> None:
    """tokenizer.json + the serving side's cleaning must give open_clip's ids for `texts`."""
    from vitrine.tokenizer import TextTokenizer

    runtime = TextTokenizer(path, loaded.context_length, pad_id).encode_batch(list(texts))
    expected = loaded.tokenizer(list(texts)).numpy()
    if not np.array_equal(runtime, expected):
        rows = [i for i in range(len(texts)) if not np.array_equal(runtime[i], expected[i])]
        raise ExportError(f"tokenizer.json ids differ from open_clip's for texts {[texts[i] for i in rows]}")


def _versions(opset: int, text_opset: int, dynamic: bool) -> dict[str, str]:
    return {
        "exporter": "torch.onnx.export(dynamo=False)",
        "revision": EXPORTER_REVISION,
        "text_exporter": ("torch.onnx.export(dynamo=True), dynamic batch and sequence axes" if dynamic
                          else "torch.onnx.export(dynamo=False)"),
        "opset": str(opset),
        "text_opset": str(text_opset),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "tokenizers": tokenizers.__version__,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_repository(
    loaded: LoadedModel,
    root: Path,
    *,
    name_prefix: str,
    precision: str,
    config_kwargs: dict[str, Any],
    opset: int,
    dynamic_length: bool = True,
    text_buckets: Sequence[int] | None = None,
) -> Manifest:
    """Write the whole repository into `root` (an empty staging folder); returns its manifest."""
    pre = loaded.preprocess
    height, width = pre.image_size
    threshold = parity_mod.PARITY_THRESHOLDS[precision]
    image_model, text_model = f"{name_prefix}_image", f"{name_prefix}_text"

    # References: open_clip's own path in float32, on real images and texts.
    pixels, reference_input = parity_mod.image_batch(parity_mod.sample_images(), pre.eval_transform())
    texts = list(parity_mod.PARITY_TEXTS)
    token_ids = loaded.tokenizer(texts)
    image_reference = parity_mod.reference_image_embeddings(loaded.model, reference_input)
    text_reference = parity_mod.reference_text_embeddings(loaded.model, token_ids)
    embedding_dim = int(image_reference.shape[1])
    if text_reference.shape[1] != embedding_dim:
        raise ExportError(
            f"image ({embedding_dim}) and text ({text_reference.shape[1]}) embedding dims differ"
        )

    model = copy.deepcopy(loaded.model).half() if precision == "fp16" else loaded.model

    image_path = root / image_model / MODEL_VERSION / ONNX_FILE
    text_path = root / text_model / MODEL_VERSION / ONNX_FILE
    # int8: trace float32 graphs into a scratch folder of the staging root, then quantize into place.
    float_dir = root / ".float32"
    traced_image = float_dir / f"{image_model}.onnx" if precision == "int8" else image_path
    traced_text = float_dir / f"{text_model}.onnx" if precision == "int8" else text_path
    started = time.perf_counter()
    image_tower = ImageTower(model, pre.mean, pre.std).eval()
    _onnx_export(image_tower, torch.from_numpy(pixels[:2]), traced_image, IMAGE_INPUT, opset)
    context_length = loaded.context_length
    dynamic = dynamic_length and supports_dynamic_length(model)
    if dynamic_length and not dynamic:
        log.warning("%s: its text tower has no exact dynamic-length form; exporting it at the fixed context length "
                    "%d", loaded.model_name, context_length)
    buckets = length_buckets(context_length, text_buckets) if dynamic else (context_length,)
    text_opset = opset
    if dynamic:
        example = token_ids[:2, : max(2, context_length // 2)].clone()
        example[:, -1] = token_ids[:2].max()  # an <eot>-like largest id inside the example length
        text_opset = _onnx_export_dynamic_text(DynamicTextTower(model).eval(), example, traced_text,
                                               context_length, opset)
    else:
        _onnx_export(TextTower(model).eval(), token_ids[:2], traced_text, TEXT_INPUT, opset)
    log.info("exported both towers to ONNX in %.1f s (text: %s)", time.perf_counter() - started,
             f"dynamic length, buckets {list(buckets)}" if dynamic else f"fixed length {context_length}")
    if precision == "int8":
        quantize_mod.quantize_onnx(traced_image, image_path, quantize_mod.INT8)
        quantize_mod.quantize_onnx(traced_text, text_path, quantize_mod.INT8)
        shutil.rmtree(float_dir)

    # The gate runs a batch size different from the traced one (2), so it also checks the dynamic axis.
    image_session, text_session = _cpu_session(image_path, precision), _cpu_session(text_path, precision)
    image_onnx = image_session.run([OUTPUT], {IMAGE_INPUT: pixels})[0]
    pad_id = write_tokenizer_json(loaded.tokenizer, root / TOKENIZER_FILE, context_length)
    if dynamic:
        text_parity = _text_parity_by_length(text_session, token_ids.numpy(), text_reference, buckets, pad_id,
                                             threshold)
    else:
        text_onnx = text_session.run([OUTPUT], {TEXT_INPUT: token_ids.numpy()})[0]
        text_parity = parity_mod.compare("text", text_onnx, text_reference, threshold)
    results: dict[str, TowerParity] = {
        "image": parity_mod.compare("image", image_onnx, image_reference, threshold),
        "text": text_parity,
    }
    retrieval = _retrieval_parity(loaded, image_session, text_session)
    del image_session, text_session
    quantization = quantize_mod.INT8.describe() if precision == "int8" else ""

    _verify_tokenizer_file(root / TOKENIZER_FILE, loaded, pad_id, texts)

    output_spec = TensorSpec(OUTPUT, "TYPE_FP32", (embedding_dim,))
    write_model_config(
        build_model_config(
            image_model,
            inputs=[TensorSpec(IMAGE_INPUT, "TYPE_UINT8", (height, width, 3))],
            outputs=[output_spec],
            **config_kwargs,
        ),
        root / image_model,
    )
    write_model_config(
        build_model_config(
            text_model,
            inputs=[TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,) if dynamic else (context_length,),
                               warmup_dims=(context_length,))],
            outputs=[output_spec],
            **config_kwargs,
        ),
        root / text_model,
    )

    manifest = Manifest(
        model_id=Manifest.make_model_id(loaded.model_name, loaded.pretrained, loaded.weights_sha256),
        model_name=loaded.model_name,
        pretrained=loaded.pretrained,
        weights_sha256=loaded.weights_sha256,
        embedding_dim=embedding_dim,
        precision=precision,
        image=ImageTowerSpec(
            triton_model=image_model,
            input_name=IMAGE_INPUT,
            output_name=OUTPUT,
            size=(height, width),
            resize_mode=pre.resize_mode,
            interpolation=pre.interpolation,
            mean=pre.mean,
            std=pre.std,
        ),
        text=TextTowerSpec(
            triton_model=text_model,
            input_name=TEXT_INPUT,
            output_name=OUTPUT,
            context_length=loaded.context_length,
            pad_id=pad_id,
            tokenizer_file=TOKENIZER_FILE,
            dynamic_length=dynamic,
            length_buckets=buckets,
        ),
        parity=results,
        exporter=_versions(opset, text_opset, dynamic) | ({"quantization": quantization} if quantization else {}),
    )
    manifest.write(root)
    parity_mod.ParityReport(
        precision=precision,
        quantization=quantization,
        towers={tower: p.model_dump() for tower, p in results.items()},
        retrieval=retrieval,
    ).write(root)
    return manifest


def export_repository(
    model_name: str,
    output: Path | str,
    *,
    pretrained: str | None = None,
    checkpoint: Path | str | None = None,
    name_prefix: str = "clip",
    precision: str = "fp32",
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_microseconds: int = 2000,
    instance_count: int = 1,
    gpu: bool = False,
    opset: int = 17,
    overwrite: bool = False,
    dynamic_length: bool = True,
    text_buckets: Sequence[int] | None = None,
) -> Manifest:
    """Export an open_clip model's two towers as a Vitrine/Triton model repository at `output`.

    Args:
        model_name: open_clip model name (e.g. 'ViT-B-32', or a demo config such as 'vitrine-digits-tiny').
        output: repository folder to create (must be absent or empty unless `overwrite`).
        pretrained: open_clip pretrained tag, or None / 'random' for random weights.
        checkpoint: local open_clip checkpoint / state_dict file (label 'file:<name>').
        name_prefix: Triton model names are '<prefix>_image' and '<prefix>_text'.
        precision: 'fp32', 'int8' (ONNX Runtime dynamic quantization, `export.quantize.INT8`; CPU only;
            parity threshold 0.99) or 'fp16' (half weights inside the graphs; GPU only; threshold 0.999).
        max_batch_size, preferred_batch_sizes, max_queue_delay_microseconds: Triton batching
            (batch sizes in rows, delay in microseconds).
        instance_count: Triton model instances per tower.
        gpu: KIND_GPU instances with the TensorRT FP16 accelerator instead of KIND_CPU.
        opset: ONNX opset (14..20).
        overwrite: replace an existing repository at `output` (only one with a manifest.json).
        dynamic_length: export the text tower with a dynamic sequence axis (any 2..context_length tokens) when
            the model's text tower has an exact dynamic-length form (`export.towers.supports_dynamic_length`),
            with the parity gate run at every bucket length; else (or False) at the fixed context length.
        text_buckets: token lengths below the context length that clients pad to (default
            `DEFAULT_LENGTH_BUCKETS` = 8, 16, 32); the context length is always the last bucket.

    Returns:
        The written manifest (parity results and exporter versions included). The full parity report
        (with held-out retrieval recall@10 for the demo model) is `parity.ParityReport.read(output)`.

    Raises:
        ExportError: invalid arguments, weights unavailable (see `load_open_clip`), an ONNX check,
            the parity gate (min cosine below `parity.PARITY_THRESHOLDS[precision]`) or the
            tokenizer check failed. Nothing is left at `output` then (an existing repository is
            kept unless the new one was complete).
    """
    started = time.perf_counter()
    _validate(name_prefix, precision, max_batch_size, preferred_batch_sizes, max_queue_delay_microseconds,
              instance_count, gpu, opset)
    if text_buckets is not None:
        length_buckets(10**9, text_buckets)  # shape errors now; the context length is checked once loaded
    output = Path(output).resolve()
    _check_output(output, overwrite)
    loaded = load_open_clip(model_name, pretrained=pretrained, checkpoint=checkpoint)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        manifest = _write_repository(
            loaded,
            staging,
            name_prefix=name_prefix,
            precision=precision,
            opset=opset,
            dynamic_length=dynamic_length,
            text_buckets=text_buckets,
            config_kwargs=dict(
                max_batch_size=max_batch_size,
                preferred_batch_sizes=tuple(preferred_batch_sizes),
                max_queue_delay_microseconds=max_queue_delay_microseconds,
                instance_count=instance_count,
                gpu=gpu,
            ),
        )
        _check_output(output, overwrite)  # again: something may have appeared meanwhile
        staging.chmod(0o755)  # mkdtemp makes it 0700; Triton may run as another user
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s in %.1f s", manifest.model_id, output, time.perf_counter() - started)
    return manifest
