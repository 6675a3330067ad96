"""`vitrine bench ...`: the benchmark commands. Each writes JSON + CSV + PNG under --out (default bench_out/)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks and load tests; results as JSON/CSV/PNG.")
