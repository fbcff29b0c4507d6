"""Importing the modules that register extra architectures, penalty terms and metrics.

A configuration's ``plugins`` lists them (as mmcv's ``custom_imports``), so that every process that
validates it (the CLI, a Tune trial, each Ray Train worker, the analysis) has the same registries: worker
processes start fresh and only know what they import. An entry is a module (``my_lab.gates``), imported for
its registrations, or ``module:function``, imported and the function called without arguments.
Registering the same entry again is harmless, so a plugin may be loaded any number of times.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def load_plugins(entries: Iterable[str]) -> None:
    """Import (and call) every plugin entry.

    Raises:
        ValueError: naming the entry that cannot be imported or called.
    """
    for entry in entries:
        module_name, _, function_name = str(entry).partition(":")
        try:
            module = importlib.import_module(module_name)
            if function_name:
                getattr(module, function_name)()
        except Exception as err:  # any failure of user code is reported by the entry's name
            raise ValueError(f"cannot load plugin {entry!r}: {type(err).__name__}: {err}") from None
