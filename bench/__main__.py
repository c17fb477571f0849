"""Entry point: ``python -m bench [options]`` (see ``python -m bench --help``)."""

from .cli import main

raise SystemExit(main())
