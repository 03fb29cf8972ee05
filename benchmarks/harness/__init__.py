"""The benchmark harness: data builders and models the benchmarks (and their tests) use, kept out
of the `mec_quant_plugin` package, which holds only what a user imports or runs.

Import it with `benchmarks/` on `sys.path` (the benchmark scripts do so), e.g.
`from harness.austen import austen_classification`. Its extra dependencies are listed in
`benchmarks/requirements.txt`.
"""
