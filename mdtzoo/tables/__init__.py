"""Paper tables and learning curves from run directories (the last arrow of the data flow).

    gin files -> train() -> run dir -> evaluate() -> RUN/eval/*.json -> collect() -> make_table()

``collect(paths)`` reads run directories into one long DataFrame (collect.py, gin text parsed by
ginparse.py, no model imports); ``papers.TABLES`` holds one spec per table of the MDT paper;
``make_table`` lays runs out like the paper with its numbers beside ours (pivot.py);
``write_table`` writes CSV / Markdown / LaTeX (render.py); ``plot_curves`` draws Fig. 1's
analogue (curves.py; training time from the runs' logs: timing.py). small.py holds the small-scale
reproduction's tables (issue 8: experiments/small) and the steps-to-threshold speed-up. CLI:
``mdtzoo table`` and ``mdtzoo plot curves`` (launch/table_cmd.py).
"""

from mdtzoo.tables.collect import collect, find_runs, run_status
from mdtzoo.tables.curves import plot_curves
from mdtzoo.tables.papers import DEBUG_SUBSTITUTE, TABLES, Row, TableSpec, table_spec
from mdtzoo.tables.pivot import PaperTable, make_table
from mdtzoo.tables.render import latex_table, markdown_table, table_markdown, write_table

__all__ = [
    "collect", "find_runs", "run_status", "plot_curves", "DEBUG_SUBSTITUTE", "TABLES", "Row", "TableSpec",
    "table_spec", "PaperTable", "make_table", "latex_table", "markdown_table", "table_markdown", "write_table",
]
