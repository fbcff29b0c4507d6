"""Everything that touches Ray: the Ray Data slice pipeline, the Ray Train loop, the Tune driver, the CLIs.

Modules: ``config`` (TrainConfig and profiles), ``data`` (the slice pipeline), ``worker`` and
``checkpoints`` (the training loop on each worker), ``run`` (building and checking one run), ``asha`` and
``tune`` (the sweep driver), ``sweep_config`` (sweep YAML), ``cli`` and ``train`` (the command lines).
"""

from __future__ import annotations

import logging
import os
import sys

# Ray merges worker log lines that differ only in their numbers ("[repeated 2x across cluster]"), which
# hides the progress lines of all but one of the trials running side by side. Ray reads the switch once,
# when it is first imported, and every driver of ours imports this package before Ray.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def log_to_stdout() -> None:
    """Show this package's ``logging`` messages as plain lines on stdout (the terminal, the job log).

    Ray shows a worker's stdout in the driver's and the job's log, so progress lines logged on a Ray Train
    worker reach the user the same way as the driver's.
    """
    package = logging.getLogger(__name__)
    if not package.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
