"""``python -m bench`` (``fused-pg-bench`` once installed): the fused-pg benchmark.

Modules, one concern each; imports point down this list only (no cycles):

* :mod:`bench.cli`      arguments -> :class:`bench.config.BenchConfig`, the run-time estimate
                        and refusal, ``main()`` and the console entry point, ``--tune``
* :mod:`bench.runner`   runs a configuration with progress: loss check, accuracy vs the fp64
                        oracle, per-shape floor and timings, Ctrl-C handling
* :mod:`bench.report`   tables, JSON (and its schema), the plot, provenance (device, versions, git)
* :mod:`bench.impls`    the implementations compared (fused-pg, naive, reference,
                        torch.compile chunked) and their registry
* :mod:`bench.peers`    TRL, Liger-Kernel and Cut Cross-Entropy adapters (lazy imports)
* :mod:`bench.measure`  timers and statistics, peak memory, the GEMM floor, the estimate
* :mod:`bench.problem`  the synthetic RL batch (realistic or flat logits), a forward's output,
                        the shared loss epilogue
* :mod:`bench.config`   shapes, model presets, the loss spec, suites, the device
"""
