"""Entry point: ``python -m bench [options]`` from the repository root, or
``python -m fused_pg.bench`` anywhere (see ``--help``)."""

from fused_pg.bench.cli import main

raise SystemExit(main())
