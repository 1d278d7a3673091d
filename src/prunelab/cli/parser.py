"""The ``prunelab`` argument parser: one function per subcommand, and the options they share.

Parsing imports nothing heavy (no torch): ``prunelab --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from prunelab.runs.experiment import Runtime

FLAG_KEYS = ("method", "model", "dataset", "sparsity", "epochs", "seed", "lr", "batch_size", "threads")
# prunelab.integrations.trackers.TRACKERS' names, spelled out so that parsing does not import them.
TRACKER_NAMES = ("tensorboard", "mlflow", "csv")
# Flags of `prunelab run` for config fields without a short alias: argparse dest -> config key.
FIELD_FLAGS = {"precision": "train.precision", "channels_last": "train.channels_last"}
# prunelab.deploy.export.FORMATS, spelled out so that parsing arguments does not import the exporters.
EXPORT_FORMATS = ("dense", "sparse", "onnx")
# What `add_subparsers` returns (argparse does not name the type publicly).
Subparsers = Any


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def store_dir(arg: str | None) -> Path:
    """The store folder: ``--store``, else ``$PRUNELAB_STORE``, else ``./runs``."""
    return Path(arg or os.environ.get("PRUNELAB_STORE") or "runs")


def runtime_of(args: argparse.Namespace) -> Runtime:
    """Where and how runs execute, from the options of ``run`` and ``sweep``."""
    from prunelab.runs.experiment import Runtime

    return Runtime(
        store=store_dir(args.store),
        data_dir=args.data_dir,
        device=args.device,
        progress=False if args.no_progress else None,
        download=not args.no_download,
        trackers=tuple(dict.fromkeys(args.log)),
        mlflow_uri=args.mlflow_uri,
    )


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser (``argv`` only shapes the help text)."""
    parser = _Parser(prog="prunelab", description="Find sparse networks and compare pruning methods.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub, argv)
    _add_sweep(sub)
    _add_report_and_store(sub)
    _add_inspection(sub)
    return parser


def _method_epilog(argv: Sequence[str]) -> str | None:
    """Settings of the method named by ``--method`` in argv, for ``prunelab run --method M --help``."""
    from prunelab.methods import METHODS, settings_help

    name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--method"), None)
    name = name or next((a.split("=", 1)[1] for a in argv if a.startswith("--method=")), None)
    if name is None or name not in METHODS:
        return None
    rows = settings_help(METHODS.get(name).settings)
    lines = [f"settings of method {name!r} (set with --set method.NAME=VALUE):"]
    width = max((len(str(d)) for _, d, _ in rows), default=0)  # a long default does not push its help
    lines += [f"  {n:<18} default {d:<{width}}  {h}" for n, d, h in rows] or ["  (none)"]
    return "\n".join(lines)


def _add_run(sub: Subparsers, argv: Sequence[str]) -> None:
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
    _add_store_options(run)
    _add_data_options(run)
    _add_tracker_options(run)


def _add_sweep(sub: Subparsers) -> None:
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
    _add_store_options(sw)
    _add_data_options(sw)
    _add_tracker_options(sw)


def _add_report_and_store(sub: Subparsers) -> None:
    rep = sub.add_parser("report", help="tables and plots of stored runs (report.md, report.html, PNG, SVG)")
    rep.add_argument("--out", type=Path, required=True, help="folder to write the report into")
    rep.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                     help="keep runs whose field equals value, e.g. --where model=lenet300 (repeatable)")
    rep.add_argument("--layer-sparsity", type=float, help="sparsity for the per-layer and mask-overlap plots")
    rep.add_argument("--reference", default="progressive",
                     help="method every variant is compared with (Welch's 95%% interval); default progressive")
    rep.add_argument("--claims", default=None, metavar="FILE",
                     help="claims file checked in a Claims section (default: studies/claims.yaml when it exists "
                          "here, the repository's claims of the seeds; 'none' for no section)")
    _add_store_options(rep)

    sto = sub.add_parser("store", help="maintain a store: rebuild its index from the run folders")
    sto.add_argument("action", choices=["rebuild"],
                     help="rebuild: set a damaged index aside and rebuild it from the run folders")
    _add_store_options(sto)


def _add_inspection(sub: Subparsers) -> None:
    lst = sub.add_parser("list", help="list methods, models, datasets or stored runs")
    lst.add_argument("what", choices=["methods", "models", "datasets", "runs"])
    _add_store_options(lst)

    fetch = sub.add_parser("fetch", help="find (or download, sha256-checked) a dataset and check that it loads")
    fetch.add_argument("dataset", help="dataset name (see `prunelab list datasets`)")
    fetch.add_argument("--data-dir", type=Path, help="folder holding the dataset files (checked first)")

    show = sub.add_parser("show", help="print the stored result of one run")
    show.add_argument("run_id", help="run id (a unique prefix is enough)")
    _add_store_options(show)

    met = sub.add_parser("metrics", help="print a run's per-epoch metrics (metrics.jsonl) as a table, CSV or JSON")
    met.add_argument("run_id", help="run id (a unique prefix is enough)")
    met.add_argument("--store", help="store folder; default $PRUNELAB_STORE or ./runs")
    form = met.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="print CSV (header line, one row per epoch)")
    form.add_argument("--json", action="store_true", help="print one JSON list of the epoch records")

    exp = sub.add_parser("export", help="write a finished run's weights as dense, sparse safetensors or ONNX")
    exp.add_argument("run_id", help="run id (a unique prefix is enough)")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt",
                     help="dense: torch state_dict; sparse: sparse safetensors; onnx: ONNX, checked with onnxruntime")
    exp.add_argument("--out", type=Path, required=True, help="file to write (parent folders are created)")
    exp.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_store_options(exp)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="folder holding the dataset files (checked first)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (CUDA when present, else CPU), cpu or cuda; default auto")
    p.add_argument("--no-download", action="store_true", help="never download datasets")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_tracker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", action="append", default=[], choices=TRACKER_NAMES,
                   metavar="{" + ",".join(TRACKER_NAMES) + "}",
                   help="also send every epoch's metrics to TensorBoard (<run>/tensorboard/), MLflow "
                        "(<store>/mlflow.db unless --mlflow-uri) or CSV (<run>/metrics.csv) as it happens "
                        "(repeatable; needs prunelab[trackers])")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="MLflow tracking URI for --log mlflow; default $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<store>/mlflow.db")


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="store folder; default $PRUNELAB_STORE or ./runs")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
