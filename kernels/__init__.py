"""Triton kernels of fused-pg (installed as ``fused_pg.kernels``): vocabulary sweeps only.

    forward.py   forward sweep: log-sum-exp, entropy, target logit per token
    backward.py  backward sweep: dL/dlogits slabs, then dh, dW, db
    gemm.py      who computes the backward's GEMMs (cuBLAS or the Triton matmul)
    matmul.py    fp32-accumulating Triton matmul
    utils.py     shared jit helpers (logits tile, grouped launch order)
    configs.py   default tile configs per GPU family, search spaces (no triton import)
    launch.py    the one launch helper (default config or autotuned)
    tuning.py    config sweeps on the local GPU, printed as table rows
    env.py       environment switches (no triton import)
"""
