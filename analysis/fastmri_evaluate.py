"""fastMRI's own evaluation of a directory of reconstructions: ``python -m analysis.fastmri_evaluate``.

The same flags as ``python -m fastmri.evaluate`` (``--target-path``, ``--predictions-path``, ``--challenge``,
``--acceleration``, ``--acquisition``), and the same code: fastMRI's ``evaluate()``, its ``METRIC_FUNCS``
and its ``Metrics`` summary line. One thing differs. fastMRI 0.3.0's ``ssim`` returns a one-element array
(``np.array([0]) + ...``), which NumPy 2 no longer formats with ``.4g``, so ``python -m fastmri.evaluate``
ends in ``TypeError: unsupported format string passed to numpy.ndarray.__format__`` after scoring every
volume. Here that one element is taken as the number it is before the statistics see it; no value
changes. Where the installed NumPy and fastMRI work together, ``python -m fastmri.evaluate`` prints the
same line.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

import numpy as np
from fastmri import evaluate as fastmri_evaluate


def _scalar(func):
    def metric(*args, **kwargs) -> float:
        return np.asarray(func(*args, **kwargs)).item()

    return metric


def evaluate(
    target_path: pathlib.Path,
    predictions_path: pathlib.Path,
    challenge: str = "singlecoil",
    acceleration: int | None = None,
    acquisition: str | None = None,
) -> fastmri_evaluate.Metrics:
    """fastMRI's ``evaluate()`` over the targets of ``target_path`` and their reconstructions."""
    originals = dict(fastmri_evaluate.METRIC_FUNCS)
    fastmri_evaluate.METRIC_FUNCS.update({name: _scalar(func) for name, func in originals.items()})
    try:
        args = argparse.Namespace(target_path=target_path, predictions_path=predictions_path,
                                  acceleration=acceleration, acquisition=acquisition)  # fmt: skip
        key = "reconstruction_rss" if challenge == "multicoil" else "reconstruction_esc"
        return fastmri_evaluate.evaluate(args, key)
    finally:
        fastmri_evaluate.METRIC_FUNCS.update(originals)


def main(argv: Sequence[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m analysis.fastmri_evaluate", description=description)
    parser.add_argument("--target-path", type=pathlib.Path, required=True, help="the ground-truth files")
    parser.add_argument("--predictions-path", type=pathlib.Path, required=True, help="the reconstructions")
    parser.add_argument("--challenge", choices=["singlecoil", "multicoil"], required=True)
    parser.add_argument("--acceleration", type=int, default=None)
    parser.add_argument("--acquisition", default=None, help="only volumes of this acquisition")
    args = parser.parse_args(argv)
    for flag, path in (("--target-path", args.target_path), ("--predictions-path", args.predictions_path)):
        if not path.is_dir():
            print(f"error: {flag} {path}: no such directory")
            return 2
    targets = sorted(p.name for p in args.target_path.iterdir())
    missing = [name for name in targets if not (args.predictions_path / name).exists()]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        print(f"error: {args.predictions_path}: no reconstruction of {', '.join(missing[:5])}{more} "
              "(fastMRI's evaluation needs one per target file)")  # fmt: skip
        return 2
    paths = (args.target_path, args.predictions_path)
    print(evaluate(*paths, args.challenge, args.acceleration, args.acquisition))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
