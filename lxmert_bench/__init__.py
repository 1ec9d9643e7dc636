"""lxmert-bench: a benchmark and ablation harness for LXMERT (Tan & Bansal, EMNLP 2019)."""

__version__ = "0.1.0"
