"""Triton kernels of rlhf_fast, installed as rlhf_fast.kernels."""
