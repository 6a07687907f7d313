"""Video helpers shared by tests and benchmarks (synthetic clips with known ground truth)."""
