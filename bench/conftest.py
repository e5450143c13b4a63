"""pytest-benchmark suite: `make bench` (or `pytest bench --benchmark-only`).

Benchmarks are not tests: nothing here asserts a speed. Shapes are the ones the dense issue
names: N=2048, V=32000 and N=512, V=128256, fp32, T=2, forward+backward.
"""
