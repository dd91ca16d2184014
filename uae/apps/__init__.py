"""The command-line applications over the library: demo, the Unified-Bench runner, scoring folders,
the generation benchmarks, export, reports and comparisons, and the random-weight checkpoint builder.
Each module's `main(argv)` is a console script (pyproject.toml); none is imported by the models."""
