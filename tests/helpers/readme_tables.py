"""The README's generated tables: each sits between ``<!-- generated: EXPR -->`` and
``<!-- end generated -->``, and is the text of ``EXPR`` (an option or metrics table built from
the library's own field docs). ``python tests/helpers/readme_tables.py`` rewrites them in place.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"(<!-- generated: (?P<expr>[^>]+?) -->\n)(?P<body>.*?)(\n<!-- end generated -->)", re.S)


def generated(expr: str) -> str:
    """The text the README block ``expr`` must hold."""
    import fused_pg.config as config
    import fused_pg.epilogue as epilogue

    tables = {"fused_pg.config.options_markdown(LossConfig)": lambda: config.options_markdown(config.LossConfig),
              "fused_pg.config.options_markdown(HeadConfig)": lambda: config.options_markdown(config.HeadConfig),
              "fused_pg.epilogue.metrics_markdown()": epilogue.metrics_markdown}
    return tables[expr]()


def blocks(text: str) -> list[tuple[str, str]]:
    """(expr, current body) of every generated block."""
    return [(m["expr"], m["body"]) for m in BLOCK.finditer(text)]


def rewrite() -> None:
    text = README.read_text()
    README.write_text(BLOCK.sub(lambda m: m.group(1) + generated(m["expr"]) + m.group(4), text))


if __name__ == "__main__":
    rewrite()
