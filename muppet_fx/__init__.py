"""muppet_fx: multi-precision policy enforced training for any PyTorch model."""
from muppet_fx.config import MuppetConfig
from muppet_fx.numerics import QTensor, fake_quantise, quantise
from muppet_fx.prepare import prepare

__all__ = ["QTensor", "quantise", "fake_quantise", "prepare", "MuppetConfig"]
__version__ = "0.1.0"
