"""pytest-benchmark suite: `make bench` (or `pytest bench --benchmark-only`).

Benchmarks are not tests: nothing here asserts a speed. `distill-ops bench` is the harness with
the table, the byte floors, the JSON and the plots; this suite times the same cases through
pytest-benchmark for its comparison and history tools.
"""
