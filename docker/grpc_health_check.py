#!/usr/bin/env python3
"""Container health probe: ask a gRPC server's grpc.health.v1.Health/Check for one service.

    vitrine-healthcheck --target 127.0.0.1:50051 --service vitrine.v1.RetrievalService [--ca-cert ca.pem]

Exit status (what Docker's HEALTHCHECK and compose `healthcheck` read): 0 when the service answers SERVING,
1 when it answers anything else (NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN as NOT_FOUND) or cannot be reached
within `--timeout` seconds. One line on stdout says which. Standalone on purpose (only grpcio and
grpcio-health-checking), so it runs in the slim retrieval image and needs no torch, model or settings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    """Command-line options: target, service name, deadline (seconds) and optional TLS files (PEM)."""
    parser = argparse.ArgumentParser(prog="vitrine-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="gRPC server host:port")
    parser.add_argument("--service", default="", help="health service name; '' = the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline of the Check call, seconds")
    parser.add_argument("--ca-cert", type=Path, help="PEM CA bundle: connect with TLS and verify the server")
    parser.add_argument("--client-cert", type=Path, help="PEM client certificate (servers that verify clients)")
    parser.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    parser.add_argument("--server-name", help="TLS name to verify instead of the target's host")
    return parser


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ca_cert is None:
        return grpc.insecure_channel(args.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.ca_cert.read_bytes(),
        private_key=args.client_key.read_bytes() if args.client_key else None,
        certificate_chain=args.client_cert.read_bytes() if args.client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """Run one Health/Check; return (serving, a one-line description of the answer or the gRPC error)."""
    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            return False, f"{args.target} {args.service!r}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{args.target} {args.service!r}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, probe once, print the outcome; return the exit status (0 SERVING, 1 otherwise)."""
    args = build_parser().parse_args(argv)
    serving, line = check(args)
    print(line)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
