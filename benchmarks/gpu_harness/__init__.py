"""The GPU acceptance run's parts (benchmarks/gpu_check.py is its command line)."""
