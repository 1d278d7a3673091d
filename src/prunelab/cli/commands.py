"""The ``prunelab`` subcommands: each takes the parsed arguments, does one thing, returns the exit status.

Heavy modules (torch, the store, the report) are imported inside the
commands, so that parsing and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunelab.cli.output import print_summary, print_table
from prunelab.cli.parser import FIELD_FLAGS, FLAG_KEYS, runtime_of, store_dir
from prunelab.errors import Diverged, UserError
from prunelab.io import json_text
from prunelab.runs.summary import whole

#: The claims `prunelab report` checks by default: the repository's file, relative to where it runs.
DEFAULT_CLAIMS = Path("studies/claims.yaml")

if TYPE_CHECKING:
    from prunelab.runs.store import RunRecord


def cmd_run(args: argparse.Namespace) -> int:
    """`prunelab run`: train one configuration, or print its stored result."""
    from prunelab.config.build import load_config
    from prunelab.runs.experiment import run

    from prunelab.training.distributed import session

    flags = {k: getattr(args, k) for k in FLAG_KEYS}
    flags.update({key: getattr(args, dest) for dest, key in FIELD_FLAGS.items()})
    cfg = load_config(args.config, args.set, flags)
    runtime = runtime_of(args)
    _check_trackers(runtime.trackers)
    # Under torchrun every process gets here; they train the run together and rank 0 reports it.
    with session(runtime.device) as world:
        summary, cached = run(cfg, runtime)
    if not world.is_main:
        return 0
    if cached:
        print(f"run {summary['run_id']} is already in the store (its files pass their checksums); "
              "showing its stored result", file=sys.stderr)
    print_summary(summary, args.json)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`prunelab sweep`: run (or with --dry-run, plan) every point of a sweep file's grid."""
    from prunelab.runs.store import Store
    from prunelab.runs.sweep import expand, identified, pretraining, read_sweep, sweep

    executor = _sweep_executor(args)
    spec = read_sweep(args.file)
    if args.threads is not None:  # for every grid point, as if the sweep file's base said so
        spec = replace(spec, base={**spec.base, "train.threads": args.threads})
    grid = expand(spec, args.max_points)
    runtime = runtime_of(args)
    _check_trackers(runtime.trackers)
    if args.dry_run:
        points, runtime = identified(grid.points, runtime)
        _print_plan(points, grid.unfit, pretraining(points, runtime), Store.reader(runtime.store), args.json)
        return 0
    for unfit in grid.unfit:
        print(f"skipped grid point {unfit.where}: {unfit.reason}", file=sys.stderr)
    session: AbstractContextManager[None] = nullcontext()
    if args.executor == "ray":
        from prunelab.runs.executors.ray import ray_session

        session = ray_session()  # Ray, started or joined for the first run to do, is shut down at the end
    with session:
        result = sweep(grid.points, runtime, executor, runtime.progress, log=lambda m: print(m, file=sys.stderr))
    for rid, error in result.errors.items():
        print(f"run {rid} failed: {error}", file=sys.stderr)
    if args.json:
        print(json_text(result.as_dict()))
    else:
        print(f"{result.runs} grid points: {result.done} done, {result.skipped} skipped, {result.failed} failed, "
              f"{result.diverged} diverged"
              + (f" ({result.pretrained} dense pretraining runs trained first)" if result.pretrained else ""))
    return 1 if result.failed or result.diverged else 0


def _sweep_executor(args: argparse.Namespace) -> Any:
    """The executor ``--executor`` names, its options checked (the other executor's options refused)."""
    if args.executor == "local":
        from prunelab.runs.executors.local import LocalExecutor

        given = [flag for flag, value in (("--address", args.address), ("--cpus-per-run", args.cpus_per_run),
                                          ("--gpus-per-run", args.gpus_per_run)) if value is not None]
        if given:
            raise UserError(f"only --executor ray takes {', '.join(given)}")
        workers = args.workers if args.workers is not None else os.cpu_count() or 1
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        return LocalExecutor(workers)
    from prunelab.runs.executors.ray import RayExecutor

    if args.log:  # a Ray task trains in a temporary store on its node; only the run's own files come back
        raise UserError("--log is for --executor local; after a Ray sweep, `prunelab metrics RUN_ID --csv` "
                        "prints each run's epochs")
    if args.workers is not None:
        raise UserError("--workers is for --executor local; on Ray, --cpus-per-run sets how many runs share a node")
    cpus = 1 if args.cpus_per_run is None else args.cpus_per_run
    gpus = 0.0 if args.gpus_per_run is None else args.gpus_per_run
    return RayExecutor(cpus, gpus, args.address)


def _check_trackers(names: tuple[str, ...]) -> None:
    """One sentence now, before any training, if a tracker's package is missing."""
    if names:
        from prunelab.integrations.trackers import check_trackers

        check_trackers(names)


def _print_plan(points: list[Any], unfit: list[Any], shared: dict[str, Any], store: Any, as_json: bool) -> None:
    stored = {r.run_id for r in store.records() if r.status == "ok"}
    rows, seen = [], set()
    for p in points:
        state = "stored" if p.run_id in stored else "repeat" if p.run_id in seen else "to run"
        seen.add(p.run_id)
        rows.append({"run_id": p.run_id, "method": p.cfg.method.name, "model": p.cfg.model.name,
                     "sparsity": p.cfg.prune.sparsity, "seed": p.cfg.seed, "budget": p.cfg.train.budget,
                     "epochs": p.epochs, "split": p.split, "state": state})
    new_dense = {rid: c for rid, c in shared.items() if rid not in stored}
    # Pretraining is trained once for all the runs that share it.
    epochs = sum(r["epochs"] - (p.cfg.train.epochs if p.pretrained else 0)
                 for r, p in zip(rows, points) if r["state"] == "to run")
    epochs += sum(c.train.epochs for rid, c in new_dense.items() if rid not in {r["run_id"] for r in rows})
    skipped = [{"where": u.where, "reason": u.reason} for u in unfit]
    if as_json:
        print(json_text({"runs": rows, "estimated_epochs": epochs, "unfit": skipped}))
        return
    print_table(rows)
    under = sum(1 for r in rows if r["budget"] is not None and r["epochs"] < r["budget"])
    if under:
        print(f"{under} runs plan fewer epochs than their budget: each cycle rounds down (docs/methods.md, "
              "matched budgets), and a run never trains more than its budget")
    for u in skipped:
        print(f"skipped grid point {u['where']}: {u['reason']}")
    print(f"estimated training: {epochs:g} epochs (at most that many dense-epoch equivalents), "
          f"{len(new_dense)} shared dense pretraining runs included")


def cmd_report(args: argparse.Namespace) -> int:
    """`prunelab report`: tables and plots of the stored runs."""
    from prunelab.config.build import key_value
    from prunelab.report import write_report

    where = dict(key_value(item, "--where", "field=value") for item in args.where)
    if args.claims is None:  # outside the repository there is no claims file to check, and none was asked for
        claims = DEFAULT_CLAIMS if DEFAULT_CLAIMS.is_file() else None
    else:
        claims = None if args.claims == "none" else Path(args.claims)
    paths = write_report(store_dir(args.store), args.out, where, args.layer_sparsity, args.reference, claims)
    if args.json:
        print(json_text([str(p) for p in paths]))
    else:
        print(f"wrote {len(paths)} files to {args.out} (open {args.out / 'report.html'})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """`prunelab list`: the registered methods, models or datasets, or the stored runs."""
    rows: list[dict[str, Any]]
    if args.what == "methods":
        from prunelab.methods import METHODS, settings_help

        rows = [{"name": e.name, "summary": e.summary,
                 "settings": {n: d for n, d, _ in settings_help(e.obj.settings)}} for e in METHODS]
    elif args.what == "models":
        from prunelab.models import MODELS

        rows = [{"name": e.name, "summary": e.summary} for e in MODELS]
    elif args.what == "datasets":
        from prunelab.data import DATASETS

        rows = [{"name": e.name, "summary": e.summary} for e in DATASETS]
    else:
        from prunelab.runs.store import Store

        rows = [_run_row(r) for r in Store.reader(store_dir(args.store)).records()]
    if args.json:
        print(json_text(rows))
    elif args.what == "methods":
        for r in rows:
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "no settings"
            print(f"{r['name']:<12} {r['summary']}\n{'':<12} settings: {settings}")
    else:
        print_table(rows)
    return 0


def _run_row(r: RunRecord) -> dict[str, Any]:
    """One line of ``prunelab list runs``: the index's headline and, for a finished run, its result."""
    result = r.result
    return {"run_id": r.run_id, "status": r.status, "method": r.method, "model": r.model, "dataset": r.dataset,
            "target_sparsity": r.target_sparsity, "seed": r.seed, "budget": r.budget,
            "epochs": whole(result.epochs) if result else None, "sparsity": result.sparsity if result else None,
            "test_acc": result.test_acc if result else None}


def cmd_store(args: argparse.Namespace) -> int:
    """`prunelab store rebuild`: set a damaged index aside and rebuild it from the run folders."""
    from prunelab.runs.store import Store

    store, found = Store.repaired(store_dir(args.store))
    by_status: dict[str, int] = {}
    for record in store.records():
        by_status[record.status] = by_status.get(record.status, 0) + 1
    if args.json:
        print(json_text({"runs": found, "status": by_status}))
    else:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "no runs"
        print(f"rebuilt the index of {store.root} from {found} run folders: {counts}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """`prunelab fetch`: find (or download, checked) a dataset and check that it loads."""
    from prunelab.data import load_splits

    data = load_splits(args.dataset, args.data_dir, download=True)
    print(f"{args.dataset}: {len(data.train_y)} train, {len(data.val_y)} validation, {len(data.test_y)} test images")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """`prunelab show`: a stored run's result, after checking its files."""
    from prunelab.runs.store import Store

    store = Store.reader(store_dir(args.store))
    record = store.get(store.resolve_id(args.run_id))
    assert record is not None
    if record.status == "ok" and record.summary is not None:
        store.verify(record)  # never show a result whose files were changed
    if record.status == "diverged" and record.summary is not None:
        s = record.summary
        raise Diverged(f"run {record.run_id} is stored as diverged: {s.get('error')}", s.get("epoch"), s.get("step"))
    if record.summary is None:
        raise UserError(f"run {record.run_id} has no result yet (status {record.status}"
                        + (f": {record.error}" if record.error else "") + ")")
    # Summaries stored before the budget was recorded in them: the run's config says it.
    print_summary({**record.summary, "budget": record.budget}, args.json)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """`prunelab metrics`: a run's per-epoch records as a table, CSV or JSON (a finished run's files checked)."""
    from prunelab.integrations.trackers import csv_text, fields
    from prunelab.runs.store import Store

    store = Store.reader(store_dir(args.store))
    records = store.metrics(store.resolve_id(args.run_id))
    if args.json:
        print(json_text(records))
    elif args.csv:
        sys.stdout.write(csv_text(records) if records else "")
    else:
        keys = fields(records)  # a field only some epochs have is '-' in the others
        print_table([{k: r.get(k) for k in keys} for r in records])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`prunelab export`: a finished run's weights as dense, sparse safetensors or ONNX."""
    from prunelab.deploy.export import export_run

    result = export_run(store_dir(args.store), args.run_id, args.fmt, args.out, args.force)
    if args.json:
        print(json_text(result))
        return 0
    line = f"wrote run {result['run_id']} as {result['format']} to {result['path']} ({result['bytes']} bytes"
    if result["format"] == "sparse":
        line += f", {result['bytes'] / result['tensor_bytes']:.1%} of the dense tensors"
    line += ")"
    if "max_abs_diff" in result:
        line += (f"; max abs difference vs PyTorch: {result['max_abs_diff']:.3g} "
                 f"(onnxruntime, {result['check_examples']} random inputs)")
    print(line)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "list": cmd_list, "show": cmd_show,
    "fetch": cmd_fetch, "export": cmd_export, "store": cmd_store, "metrics": cmd_metrics,
}
