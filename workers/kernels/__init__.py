"""GPU kernels (Triton) for the paged KV cache; imported only on CUDA devices."""
