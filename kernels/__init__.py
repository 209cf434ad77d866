"""Triton kernels of bertfast (installed as bertfast.kernels). Importing this package imports triton."""
