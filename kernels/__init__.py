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

Deliberately not used (yet):

* Tensor descriptors (TMA). The measured gaps of the sweeps were the launch order and the
  tile size, and a pointer-based forward kernel with a grouped order (Cut Cross-Entropy's)
  runs at 1.04x a GEMM at the target shape, so nothing measured asks for TMA. Descriptors
  need a unit last-dimension stride and 16-byte aligned strides (the kernels take any view,
  so a pointer path would remain for the rest) and fix the block shape on the host (every
  autotune config needs its own). Whether they help can only be measured on a GPU.
* Persistent scheduling. Its gains (no tail wave, overlapping one tile's epilogue with the
  next tile's loads) are a few percent at the measured shapes (the forward launches ~16
  waves), too small to claim without a measurement.
"""
