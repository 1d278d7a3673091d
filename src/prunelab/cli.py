"""The ``prunelab`` command: parse arguments, then call one function.

Every user error ends here as one sentence on stderr and exit status 2;
Ctrl-C ends with status 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from prunelab.errors import Diverged, UserError
from prunelab.io import json_text

FLAG_KEYS = ("method", "model", "dataset", "sparsity", "epochs", "seed", "lr", "batch_size", "threads")
# Flags of `prunelab run` for config fields without a short alias: argparse dest -> config key.
FIELD_FLAGS = {"precision": "train.precision", "channels_last": "train.channels_last"}
# prunelab.deploy.export.FORMATS, spelled out so that parsing arguments does not import the exporters.
EXPORT_FORMATS = ("dense", "sparse", "onnx")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _store_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("PRUNELAB_STORE") or "runs")


def _method_epilog(argv: Sequence[str]) -> str | None:
    """Settings of the method named by ``--method`` in argv, for ``prunelab run --method M --help``."""
    from prunelab.methods import METHODS, settings_help

    name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--method"), None)
    name = name or next((a.split("=", 1)[1] for a in argv if a.startswith("--method=")), None)
    if name is None or name not in METHODS:
        return None
    rows = settings_help(METHODS.get(name).settings)
    lines = [f"settings of method {name!r} (set with --set method.NAME=VALUE):"]
    lines += [f"  {n:<18} default {d:<8} {h}" for n, d, h in rows] or ["  (none)"]
    return "\n".join(lines)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser (``argv`` only shapes the help text)."""
    parser = _Parser(prog="prunelab", description="Find sparse networks and compare pruning methods.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run", help="train one configuration (or print its stored result)",
        epilog=_method_epilog(argv), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, help="YAML config file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set train.weight_decay=1e-4 (repeatable)")
    run.add_argument("--method", help="pruning method (see `prunelab list methods`); default progressive")
    run.add_argument("--model", help="architecture (see `prunelab list models`); default lenet300")
    run.add_argument("--dataset", help="dataset (see `prunelab list datasets`); default fashion-mnist")
    run.add_argument("--sparsity", type=float, help="target fraction of prunable weights removed; default 0.9")
    run.add_argument("--epochs", type=int, help="epochs per training cycle; default 30")
    run.add_argument("--seed", type=int, help="random seed; default 0")
    run.add_argument("--lr", type=float, help="learning rate; default 0.1")
    run.add_argument("--batch-size", type=int, help="batch size; default 128")
    run.add_argument("--threads", type=int,
                     help="CPU threads of the run (train.threads); default 1; another count is another run id")
    run.add_argument("--precision", metavar="{fp32,bf16}",
                     help="bf16: forward pass and loss under bfloat16 autocast (CPU or CUDA); default fp32")
    run.add_argument("--channels-last", action="store_true", default=None,
                     help="model and image batches in channels_last memory layout (convolutional nets)")
    _add_runtime(run)
    _add_data_options(run)

    sw = sub.add_parser("sweep", help="run a grid of configurations from a YAML sweep file")
    sw.add_argument("file", type=Path, help="YAML with 'base' and 'grid' sections")
    sw.add_argument("--workers", type=int, default=None, help="worker processes; default one per core")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their estimated cost, run nothing")
    sw.add_argument("--threads", type=int,
                    help="CPU threads of every run (train.threads for every grid point); default 1")
    sw.add_argument("--max-points", type=int, metavar="N",
                    help="refuse a grid of more than N points; default 10000")
    sw.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: worker processes here; ray: one Ray task per run (needs prunelab[ray])")
    sw.add_argument("--address", help="ray: the cluster to use, 'auto' or HOST:PORT; default: start Ray here")
    sw.add_argument("--cpus-per-run", type=int, help="ray: CPUs each run needs (its torch threads); default 1")
    sw.add_argument("--gpus-per-run", type=float, help="ray: GPUs each run needs (> 0: it runs on cuda); default 0")
    _add_runtime(sw)
    _add_data_options(sw)

    rep = sub.add_parser("report", help="tables and plots of stored runs (report.md, report.html, PNG, SVG)")
    rep.add_argument("--out", type=Path, required=True, help="folder to write the report into")
    rep.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                     help="keep runs whose field equals value, e.g. --where model=lenet300 (repeatable)")
    rep.add_argument("--layer-sparsity", type=float, help="sparsity for the per-layer and mask-overlap plots")
    _add_runtime(rep)

    sto = sub.add_parser("store", help="maintain a store: rebuild its index from the run folders")
    sto.add_argument("action", choices=["rebuild"],
                     help="rebuild: set a damaged index aside and rebuild it from the run folders")
    _add_runtime(sto)

    lst = sub.add_parser("list", help="list methods, models, datasets or stored runs")
    lst.add_argument("what", choices=["methods", "models", "datasets", "runs"])
    _add_runtime(lst)

    fetch = sub.add_parser("fetch", help="find (or download, sha256-checked) a dataset and check that it loads")
    fetch.add_argument("dataset", help="dataset name (see `prunelab list datasets`)")
    fetch.add_argument("--data-dir", type=Path, help="folder holding the dataset files (checked first)")

    show = sub.add_parser("show", help="print the stored result of one run")
    show.add_argument("run_id", help="run id (a unique prefix is enough)")
    _add_runtime(show)

    exp = sub.add_parser("export", help="write a finished run's weights as dense, sparse safetensors or ONNX")
    exp.add_argument("run_id", help="run id (a unique prefix is enough)")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt",
                     help="dense: torch state_dict; sparse: sparse safetensors; onnx: ONNX, checked with onnxruntime")
    exp.add_argument("--out", type=Path, required=True, help="file to write (parent folders are created)")
    exp.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_runtime(exp)
    return parser


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="folder holding the dataset files (checked first)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (CUDA when present, else CPU), cpu or cuda; default auto")
    p.add_argument("--no-download", action="store_true", help="never download datasets")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _runtime(args: argparse.Namespace) -> Any:
    from prunelab.runs.experiment import Runtime

    return Runtime(
        store=_store_dir(args.store),
        data_dir=args.data_dir,
        device=args.device,
        progress=False if args.no_progress else None,
        download=not args.no_download,
    )


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store folder; default $PRUNELAB_STORE or ./runs")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from prunelab.config.build import load_config
    from prunelab.runs.experiment import run

    from prunelab.training.distributed import session

    flags = {k: getattr(args, k) for k in FLAG_KEYS}
    flags.update({key: getattr(args, dest) for dest, key in FIELD_FLAGS.items()})
    cfg = load_config(args.config, args.set, flags)
    runtime = _runtime(args)
    # Under torchrun every process gets here; they train the run together and rank 0 reports it.
    with session(runtime.device) as world:
        summary, cached = run(cfg, runtime)
    if not world.is_main:
        return 0
    if cached:
        print(f"run {summary['run_id']} is already in the store (its files pass their checksums); "
              "showing its stored result", file=sys.stderr)
    _print_summary(summary, args.json)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from prunelab.runs.store import Store
    from prunelab.runs.sweep import expand, identified, pretraining, read_sweep, sweep

    executor = _sweep_executor(args)
    spec = read_sweep(args.file)
    if args.threads is not None:  # for every grid point, as if the sweep file's base said so
        spec = replace(spec, base={**spec.base, "train.threads": args.threads})
    points = expand(spec, args.max_points)
    runtime = _runtime(args)
    if args.dry_run:
        points, runtime = identified(points, runtime)
        _print_plan(points, pretraining(points, runtime), Store.reader(runtime.store), args.json)
        return 0
    session: AbstractContextManager[None] = nullcontext()
    if args.executor == "ray":
        from prunelab.runs.executors.ray import ray_session

        session = ray_session()  # Ray, started or joined for the first run to do, is shut down at the end
    with session:
        result = sweep(points, runtime, executor, runtime.progress, log=lambda m: print(m, file=sys.stderr))
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
        from prunelab.runs.sweep import LocalExecutor

        given = [flag for flag, value in (("--address", args.address), ("--cpus-per-run", args.cpus_per_run),
                                          ("--gpus-per-run", args.gpus_per_run)) if value is not None]
        if given:
            raise UserError(f"only --executor ray takes {', '.join(given)}")
        workers = args.workers if args.workers is not None else os.cpu_count() or 1
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        return LocalExecutor(workers)
    from prunelab.runs.executors.ray import RayExecutor

    if args.workers is not None:
        raise UserError("--workers is for --executor local; on Ray, --cpus-per-run sets how many runs share a node")
    cpus = 1 if args.cpus_per_run is None else args.cpus_per_run
    gpus = 0.0 if args.gpus_per_run is None else args.gpus_per_run
    return RayExecutor(cpus, gpus, args.address)


def _print_plan(points: list[Any], shared: dict[str, Any], store: Any, as_json: bool) -> None:
    stored = {r.run_id for r in store.records() if r.status == "ok"}
    rows, seen = [], set()
    for p in points:
        state = "stored" if p.run_id in stored else "repeat" if p.run_id in seen else "to run"
        seen.add(p.run_id)
        rows.append({"run_id": p.run_id, "method": p.cfg.method.name, "model": p.cfg.model.name,
                     "sparsity": p.cfg.prune.sparsity, "seed": p.cfg.seed, "epochs": p.epochs, "state": state})
    new_dense = {rid: c for rid, c in shared.items() if rid not in stored}
    # Pretraining is trained once for all the runs that share it.
    epochs = sum(r["epochs"] - (p.cfg.train.epochs if p.pretrained else 0)
                 for r, p in zip(rows, points) if r["state"] == "to run")
    epochs += sum(c.train.epochs for rid, c in new_dense.items() if rid not in {r["run_id"] for r in rows})
    if as_json:
        print(json_text({"runs": rows, "estimated_epochs": epochs}))
        return
    _print_table(rows)
    print(f"estimated training: {epochs:g} epochs (at most that many dense-epoch equivalents), "
          f"{len(new_dense)} shared dense pretraining runs included")


def cmd_report(args: argparse.Namespace) -> int:
    from prunelab.config.build import key_value
    from prunelab.report import write_report

    where = dict(key_value(item, "--where", "field=value") for item in args.where)
    paths = write_report(_store_dir(args.store), args.out, where, args.layer_sparsity)
    if args.json:
        print(json_text([str(p) for p in paths]))
    else:
        print(f"wrote {len(paths)} files to {args.out} (open {args.out / 'report.html'})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
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

        rows = [_run_row(r.run_id, r.status, r.summary or {}, r.method, r.model, r.dataset, r.target_sparsity,
                         r.seed) for r in Store.reader(_store_dir(args.store)).records()]
    if args.json:
        print(json_text(rows))
    elif args.what == "methods":
        for r in rows:
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "no settings"
            print(f"{r['name']:<12} {r['summary']}\n{'':<12} settings: {settings}")
    else:
        _print_table(rows)
    return 0


def _run_row(rid: str, status: str, s: dict[str, Any], method: str, model: str, dataset: str,
             target: float, seed: int) -> dict[str, Any]:
    return {"run_id": rid, "status": status, "method": method, "model": model, "dataset": dataset,
            "target": target, "seed": seed, "sparsity": s.get("sparsity"), "test_acc": s.get("test_acc")}


def cmd_store(args: argparse.Namespace) -> int:
    from prunelab.runs.store import Store

    store, found = Store.repaired(_store_dir(args.store))
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
    from prunelab.data import load_splits

    data = load_splits(args.dataset, args.data_dir, download=True)
    print(f"{args.dataset}: {len(data.train_y)} train, {len(data.val_y)} validation, {len(data.test_y)} test images")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from prunelab.runs.store import Store

    store = Store.reader(_store_dir(args.store))
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
    _print_summary(record.summary, args.json)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from prunelab.deploy.export import export_run

    result = export_run(_store_dir(args.store), args.run_id, args.fmt, args.out, args.force)
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


# ---------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value.is_integer() and abs(value) >= 1:
            return f"{value:.4g}" if abs(value) >= 1e5 else str(int(value))
        return f"{value:.4g}" if abs(value) >= 1e5 or value == 0 else f"{value:.4f}"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json_text(summary))
        return
    rows = [
        ("run", summary["run_id"]), ("method", summary["method"]), ("model", summary["model"]),
        ("dataset", summary["dataset"]), ("seed", summary["seed"]),
        ("target sparsity", summary["target_sparsity"]), ("sparsity (from weights)", summary["sparsity"]),
        ("test accuracy (final)", summary["test_acc"]), ("val accuracy (final)", summary["val_acc"]),
        ("test accuracy (val-selected)", summary["selected_test_acc"]),
        ("selected epoch", summary["selected_epoch"]),
        ("epochs trained", summary["epochs"]), ("optimizer steps", summary["steps"]),
        ("wall time (s)", summary["wall_s"]), ("training FLOPs", summary["train_flops"]),
        ("dense-equivalent FLOPs", summary["dense_train_flops"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {_fmt(value)}")
    for note in summary.get("notes", []):
        print(f"note: {note}")


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(none)")
        return
    keys = list(rows[0])
    cells = [[_fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "list": cmd_list, "show": cmd_show,
            "fetch": cmd_fetch, "export": cmd_export, "store": cmd_store}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled as Ctrl-C is (the run is marked interrupted and can resume)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


@contextmanager
def _signals_interrupt(exiting: bool) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise once in the main thread; later ones are ignored while we clean up.

    A second Ctrl-C arriving during the cleanup of the first (marking the run
    interrupted, closing the index) would otherwise end in a traceback.
    ``exiting``: the process ends after the block (the console script), so
    once a signal came the later ones stay ignored through interpreter shutdown.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in wanted}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_IGN if fired and exiting else old)


def _fail(message: str, as_json: bool, status: str = "error", prefix: str = "error: ", **fields: Any) -> None:
    """One sentence on stderr and, with ``--json``, one JSON object as the last line of stdout."""
    print(f"prunelab: {prefix}{message}", file=sys.stderr, flush=True)
    if as_json:
        print(json_text({"status": status, "error": message, **fields}), flush=True)


def console() -> int:
    """Entry point of the ``prunelab`` console script and ``python -m prunelab``: :func:`main`, then exit."""
    return main(sys.argv[1:], exiting=True)


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run the ``prunelab`` command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    ``exiting``: the process ends right after (see :func:`console`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    with _signals_interrupt(exiting):
        try:
            return COMMANDS[args.command](args)
        except Diverged as exc:
            _fail(str(exc), as_json, "diverged", epoch=exc.epoch, step=exc.step)
            return 2
        except UserError as exc:
            _fail(str(exc), as_json)
            return 2
        except KeyboardInterrupt as exc:  # a RunInterrupted says which checkpoint is kept
            message = str(exc) or "interrupted; run the same command again to resume from the last checkpoint"
            code = 130
            cause = exc if isinstance(exc, Terminated) else exc.__context__
            if isinstance(cause, Terminated):
                code = 128 + cause.signum
                message = f"{signal.Signals(cause.signum).name}: {message}"
            _fail(message, as_json, "interrupted", prefix="")
            return code


if __name__ == "__main__":
    sys.exit(console())
