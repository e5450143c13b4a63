"""Triton kernels and their launchers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
