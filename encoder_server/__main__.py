"""`python -m encoder_server --repository DIR`: serve a Vitrine model repository until SIGINT/SIGTERM.

When every model is ready, one line is printed to stdout:

    ENCODER_SERVER_READY {"grpc": "127.0.0.1:8001", ..., "pid": 1234, "heavy_modules": []}

(`heavy_modules` lists which of torch / open_clip / torchvision this process has imported; the serving
side must never need them.) The project CLI (`vitrine serve-encoder`) calls `EncoderServer` the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from encoder_server.server import EncoderServer

READY_MARKER = "ENCODER_SERVER_READY"
HEAVY_MODULES = ("torch", "open_clip", "torchvision")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (ports, bind host, ORT threads/providers, log level)."""
    parser = argparse.ArgumentParser(prog="python -m encoder_server", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True, help="Vitrine/Triton model repository")
    parser.add_argument("--host", default="127.0.0.1", help="bind address of all endpoints")
    parser.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--ort-threads", type=int, default=None, help="ORT intra-op threads per session")
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated ONNX Runtime providers to allow (default: best available, TensorRT>CUDA>CPU)",
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the encoder server until SIGINT/SIGTERM; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = EncoderServer(
        args.repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        ort_threads=args.ort_threads,
        providers=args.providers.split(",") if args.providers else None,
    )

    def _announce(ready: EncoderServer) -> None:
        status = {
            **ready.describe(),
            "pid": os.getpid(),
            "heavy_modules": [name for name in HEAVY_MODULES if name in sys.modules],
        }
        print(f"{READY_MARKER} {json.dumps(status)}", flush=True)

    server.serve_forever(on_ready=_announce)
    return 0


if __name__ == "__main__":
    sys.exit(main())
