"""Real data sets the demo, examples and benchmarks use (local files first, then the Hub)."""

from .fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

__all__ = ["FashionMNISTNotFound", "load_fashion_mnist"]
