"""Benchmarks and load tests (`vitrine bench ...`, `make bench`).

One module per tool: `encoder` (KServe v2 load generator against Triton), `search` (end-to-end SearchImages),
`ingest` (streaming ingest vs the per-image baseline), `scale` (Milvus index types on synthetic vectors).
Every tool returns a `BenchResult` (see `tools.bench.report`) that is written as JSON + CSV + PNG, and
`tools.bench.docs` turns the results into docs/benchmarks.md.
"""
