"""muppet_fx: multi-precision policy enforced training for any PyTorch model."""
from muppet_fx import distributed  # noqa: F401  (muppet_fx.distributed.register_quantised_allreduce)
from muppet_fx.allocator import reuse_cpu_memory
from muppet_fx.checkpoint import load_checkpoint, save_checkpoint
from muppet_fx.config import MuppetConfig
from muppet_fx.manager import PrecisionManager
from muppet_fx.numerics import QTensor, fake_quantise, quantise
from muppet_fx.optim import MasterCopyOptimizer, PrecisionLR
from muppet_fx.plot import plot_policy
from muppet_fx.policies import (CyclicPolicy, FixedPolicy, GradientDiversityPolicy,
                                ScheduledPolicy)
from muppet_fx.prepare import prepare

__all__ = ["QTensor", "quantise", "fake_quantise", "prepare", "MuppetConfig", "PrecisionManager",
           "MasterCopyOptimizer", "PrecisionLR", "GradientDiversityPolicy", "FixedPolicy",
           "ScheduledPolicy", "CyclicPolicy", "save_checkpoint", "load_checkpoint", "plot_policy",
           "reuse_cpu_memory"]
__version__ = "0.1.0"
