"""lra: the Long Range Arena benchmark suite (tasks, pluggable attentions, one training path, tables)."""

import lra.config  # noqa: F401  (registers the config resolvers)

__version__ = "0.1.0"
