"""Triton kernels and launchers; one module per op. Imported lazily (only by the triton backend)."""
