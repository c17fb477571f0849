"""``python -m bench``: the fused-pg benchmark (SPEC section 7, issue 5).

Modules, one concern each:

* :mod:`bench.cli`       arguments -> :class:`bench.config.BenchConfig`, ``main()``
* :mod:`bench.config`    shapes, model presets, loss options, suite defaults
* :mod:`bench.problem`   the synthetic RL batch every implementation receives
* :mod:`bench.impls`     the implementations compared (fused-pg, naive, reference) and their registry
* :mod:`bench.compiled`  the ``torch.compile`` chunked baseline
* :mod:`bench.peers`     Liger-Kernel and Cut Cross-Entropy adapters (lazy imports)
* :mod:`bench.epilogue`  fused-pg's loss epilogue for implementations that yield log-probs
* :mod:`bench.timing`    timers (CUDA events / perf_counter) and statistics
* :mod:`bench.memory`    peak memory above the inputs (CUDA allocator / process RSS)
* :mod:`bench.floor`     the 4-GEMM floor and the FLOP model
* :mod:`bench.accuracy`  max error vs the fp64 reference on a small shape
* :mod:`bench.runner`    runs a configuration, with progress
* :mod:`bench.report`    tables, JSON (and its schema), :mod:`bench.plot` the PNG
* :mod:`bench.env`       device, versions, date, git commit
"""
