"""muppet_fx: multi-precision policy enforced training for any PyTorch model."""
from muppet_fx.numerics import QTensor, fake_quantise, quantise

__all__ = ["QTensor", "quantise", "fake_quantise"]
__version__ = "0.1.0"
