"""Vitrine's tools, at the top: nothing imports them.

    cli.py            the `vitrine` command (export, train-demo, serve, up, ingest, search, stats, delete, generate,
                      generate-batch, demo, bench)
    bench/            `vitrine bench ...`: encoder (encoder_*.py), search, ingest, scale (scale_*.py), quantization
                      benchmarks, the common result format (report.py) and the docs page (docs.py)
    demo.py           `vitrine demo` end to end on the embedded defaults
    generate.py ...   client-side generation: one prompt or a plan file (batch)
    processes.py      local process management (`vitrine up`, demo and bench stacks)
    milvus_server.py  the `milvus` package's standalone server, for benchmarks and tests
    ingest_folder.py, results.py, contact_sheet.py   CLI helpers
"""
