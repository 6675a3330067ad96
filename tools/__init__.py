"""Vitrine's tools, at the top: nothing imports them.

    cli.py            the `vitrine` command (export, train-demo, serve, up, ingest, search, stats, delete, generate,
                      generate-batch, demo, bench)
    bench/            `vitrine bench ...`: encoder, search, ingest, scale, quantization benchmarks, docs page
    demo.py           `vitrine demo` end to end on the embedded defaults
    generate.py ...   client-side generation: one prompt or a plan file (batch)
    processes.py      local process management (`vitrine up`, demo and bench stacks)
    milvus_server.py  the `milvus` package's standalone server, for benchmarks and tests
    ingest_folder.py, results.py, contact_sheet.py   CLI helpers
"""
