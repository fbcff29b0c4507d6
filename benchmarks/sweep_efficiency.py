"""What early stopping and model-based search save: epochs spent against regret, all in one run.

One discrete regularisation space (models x weight decay x dropout, so that a full grid exists) is searched
four ways on a local Ray, each a real sweep of :func:`ray_jobs.tune.run_sweep`:

- **grid, FIFO**: every configuration with every seed at full budget; its best mean validation SSIM over
  the seeds is the reference, and its table gives every configuration's full-budget value;
- **grid + ASHA**, **random + ASHA**, **TPE + ASHA** (Optuna, seeded): a search with one seed, then the
  confirm stage (the ``--top-k`` best, every seed, full budget, FIFO).

Per strategy: epochs trained (search + confirm, every trial's epochs run, epoch 0 not counted: it trains
nothing) as a share of the full grid's, and the regret: the grid's best minus the full grid's value of the
configuration the strategy confirmed (its own confirm stage's value beside it: the same seeds give the same
runs, so the two agree unless a run is not reproducible). Epochs after a stop decision are counted too
(``epochs_after_stop``; the workers wait at ASHA's rungs, so 0 is expected).

    .venv/bin/python benchmarks/sweep_efficiency.py [--profile cpu] [--epochs 4] [--samples 6] [--cpus 2]

The same script runs at scale on a cluster (``RAY_ADDRESS``, ``--profile paper``, more epochs and samples).
No timed assertions; the measured table lives in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import ray

from analysis.collect import write_tables
from ray_jobs.sweep_config import SweepSpec, ValidatedSweep
from ray_jobs.tune import run_sweep

SPACE = {"model": ["unet", "attention_unet"], "weight_decay": [0.0, 1e-4, 1e-2], "drop_prob": [0.0, 0.2]}
KEYS = list(SPACE)


def _spec(args: argparse.Namespace, search_alg: str, scheduler: str) -> SweepSpec:
    searching = search_alg != "grid" or scheduler == "asha"
    return SweepSpec(
        experiment=f"{search_alg}-{scheduler}",
        profile=args.profile,
        train={"epochs": args.epochs},
        search=SPACE,
        search_alg=search_alg,
        num_samples=args.samples if search_alg != "grid" else None,
        seeds=args.seeds[:1] if searching else args.seeds,
        scheduler={"type": scheduler, "grace_period": 1, "reduction_factor": 2},
        confirm={"top_k": args.top_k, "seeds": args.seeds} if searching else None,
    )


def _best_per_configuration(trials: pd.DataFrame) -> pd.Series:
    """Mean over seeds of each configuration's best validation SSIM."""
    return trials.groupby(KEYS)["best_ssim"].mean()


def _run(args: argparse.Namespace, storage: str, search_alg: str, scheduler: str) -> dict:
    spec = _spec(args, search_alg, scheduler)
    started = time.monotonic()
    result = run_sweep(ValidatedSweep.of(spec), spec.experiment, storage, None, resume=False)
    seconds = time.monotonic() - started
    search = write_tables(result.search).trials
    confirm = write_tables(result.confirm).trials if result.confirm else search
    chosen = _best_per_configuration(confirm).idxmax()
    stopped = search.get("epochs_after_stop", pd.Series(dtype=float))
    return {
        "strategy": f"{search_alg} + {scheduler}",
        "trials": len(search) + (len(confirm) if result.confirm else 0),
        "epochs": int(search["epochs_run"].sum() + (confirm["epochs_run"].sum() if result.confirm else 0)),
        "epochs_after_stop": int(stopped.fillna(0).sum()),
        "chosen": dict(zip(KEYS, chosen, strict=True)),
        "confirmed_ssim": float(_best_per_configuration(confirm).max()),
        "seconds": seconds,
        "search": search,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--epochs", type=int, default=4, help="full budget (ASHA's max_t)")
    parser.add_argument("--samples", type=int, default=6, help="suggestions of the random and TPE searches")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (none: $RAY_ADDRESS)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    parser.add_argument("--searchers", nargs="+", default=["grid", "random", "optuna"], help="under ASHA")
    args = parser.parse_args(argv)
    if args.cpus:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        grid = _run(args, storage, "grid", "fifo")
        table = _best_per_configuration(grid["search"])
        rows = [grid] + [_run(args, storage, alg, "asha") for alg in args.searchers]
    best = float(table.max())
    lines = [
        f"{len(table)} configs x {len(args.seeds)} seeds, {args.epochs} epochs, profile {args.profile}; "
        f"grid's best mean validation SSIM {best:.4f} ({dict(zip(KEYS, table.idxmax(), strict=True))})",
        "| strategy | trials | epochs | share of grid's epochs | epochs after a stop | regret (SSIM) | "
        "confirm stage's SSIM | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        value = float(table[tuple(row["chosen"][k] for k in KEYS)])
        row.update(regret=best - value, share=row["epochs"] / grid["epochs"])
        lines.append(
            f"| {row['strategy']} | {row['trials']} | {row['epochs']} | {row['share']:.0%} | "
            f"{row['epochs_after_stop']} | {row['regret']:.4f} | {row['confirmed_ssim']:.4f} | "
            f"{row['seconds']:.0f} |"
        )
    print("\n".join(lines), flush=True)
    if args.out:
        kept = [{key: value for key, value in row.items() if key != "search"} for row in rows]
        args.out.write_text(json.dumps(kept, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
