"""Latency / throughput benchmarks of quantized models (``quantbench bench``)."""

from quantbench.bench.runner import BenchRow, bench_methods, measure_copy_bandwidth, split_methods

__all__ = ["BenchRow", "bench_methods", "measure_copy_bandwidth", "split_methods"]
