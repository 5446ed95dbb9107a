"""The modules of the benchmark; examples/benchmark.py is the entry point."""
