"""lra: the Long Range Arena benchmark suite (tasks, pluggable attentions, one training path, tables)."""

__version__ = "0.1.0"
