"""Float64 reference implementations, imported by tests and benchmarks."""
