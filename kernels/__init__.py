"""Triton kernels of fused-pg (installed as ``fused_pg.kernels``): vocabulary sweeps only."""
