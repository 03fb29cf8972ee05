"""Ready-made jobs: the built-in default (Fashion-MNIST) reused by the CLI, demo and benchmarks."""
