"""Low-precision kernels (installed as ``muppet_fx.kernels``): Triton kernels for CUDA, ATen
routes for the CPU, and the pure-torch reference beside each."""
