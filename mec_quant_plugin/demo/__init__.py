"""The built-in demo job (`mec-quant train` with no model or dataset, `make demo`): a small ResNet
on real Fashion-MNIST, full precision, then plain LSQ QAT and MEC-Quant at W2A2 from that start."""

from .fashion_mnist import run_default

__all__ = ["run_default"]
