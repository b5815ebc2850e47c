"""Compiled kernels XLA lacks a fast form of on some backend (oneDNN convolutions for the CPU)."""
