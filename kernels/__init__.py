"""Triton kernels and their launchers (installed as ``fastscore.kernels``).

Launchers take tensors and scalars only; nothing here imports from ``fastscore``.
"""
