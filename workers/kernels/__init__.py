"""GPU kernels (Triton): paged attention and KV write, fused decoder ops; imported only for
CUDA tensors (and, in the tests, under the Triton interpreter)."""
