"""Reports: run directories -> results.jsonl, paper-style Markdown tables, significance, plots.

Input: a :class:`ReportSpec` and one :class:`ReportEntry` per fine-tuning run (built by the harness
from the plan). Entry point: :func:`write_report`.
"""

from lxmert_bench.report.collect import (
    ReportEntry,
    ReportSpec,
    collect,
    read_configs,
    read_curves,
    read_results_jsonl,
)
from lxmert_bench.report.paper import PAPER_TABLES, paper_row, paper_value
from lxmert_bench.report.render import write_report
from lxmert_bench.report.significance import Comparison, compare, compare_to_reference

__all__ = [
    "PAPER_TABLES", "Comparison", "ReportEntry", "ReportSpec", "collect", "compare",
    "compare_to_reference", "paper_row", "paper_value", "read_configs", "read_curves",
    "read_results_jsonl", "write_report",
]
