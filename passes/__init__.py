"""torch.fx passes (installed as ``muppet_fx.passes``)."""
