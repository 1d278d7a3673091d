"""Exporting any model to ONNX, checked at once against onnxruntime.

:func:`export_onnx` tries torch's exporters in turn (:data:`EXPORTERS`) and
keeps the first graph that onnxruntime runs with the model's outputs on
seeded random inputs shaped like the example. What the exporters print
(TorchScript dumps its whole graph from C++ when an operator has no ONNX
mapping), warn and log is swallowed; a failure is one sentence naming the
failing operator or the cause.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunelab.errors import UserError
from prunelab.io import atomic_write_bytes
from prunelab.models.modes import eval_mode
from prunelab.models.outputs import ExampleInput, as_inputs, max_abs_difference, output_tensors, within

TORCHSCRIPT = "torchscript"
DYNAMO = "dynamo"
# TorchScript first: it exports every model of prunelab's zoo in a fraction of a second (dynamo: 3-7 s
# each on this project's 2-core machine) and needs no onnxscript, which the onnx extra does not install.
# Dynamo (torch.export) comes second for what tracing cannot map, such as the fused
# aten::_native_multi_head_attention that nn.MultiheadAttention runs in eval mode without gradients.
# Tracing also freezes branches on input values silently; the check on fresh random inputs catches that
# and hands the model to dynamo, which refuses such branches loudly.
EXPORTERS = (TORCHSCRIPT, DYNAMO)
OPSETS = {TORCHSCRIPT: 17, DYNAMO: 18}  # 18: the oldest opset the dynamo exporter writes
DEFAULT_TOLERANCE = 1e-4
CHECK_SEED = 0


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    bytes: int
    """Size of the ONNX file."""
    max_abs_diff: float
    """Largest absolute difference between onnxruntime's and PyTorch's outputs on the check inputs."""
    exporter: str
    """``torchscript`` or ``dynamo``: the exporter whose graph was kept."""
    opset: int


class _Failed(Exception):
    """One exporter's failure, already said in a short clause."""


def export_onnx(
    model: nn.Module,
    example_input: ExampleInput,
    path: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    exporters: Sequence[str] = EXPORTERS,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> OnnxExport:
    """Export ``model`` (in eval mode, its mode restored afterwards) to ONNX at ``path``, checked.

    ``example_input`` is a tensor or a tuple of the model's positional
    inputs; the first axis of every input and output is dynamic (the batch).
    Outputs may be tensors, tuples, dicts or Hugging Face ``ModelOutput``s;
    the graph's outputs are their tensors in the order of
    :func:`prunelab.models.outputs.output_tensors`, named ``output`` (or
    ``output_0``, ``output_1``, ...; inputs likewise ``input``...) unless
    ``input_names``/``output_names`` say otherwise. The ``exporters`` are tried
    in turn; a graph is kept, and written atomically, only when onnxruntime
    reproduces PyTorch's outputs on seeded random inputs of the example's
    shapes and dtypes (integer inputs drawn within the example's range,
    boolean ones copied) to ``tolerance`` (times the largest output
    magnitude when that exceeds 1). Anything else raises :class:`UserError`
    in one sentence naming the failing operator or the cause.
    """
    ort = _onnxruntime()
    unknown = set(exporters) - set(EXPORTERS)
    if unknown or not exporters:
        raise UserError(f"exporters must be chosen from {', '.join(EXPORTERS)}, got {list(exporters)}")
    if not tolerance >= 0:
        raise UserError(f"tolerance must be at least 0, got {tolerance}")
    inputs = as_inputs(example_input)
    check_inputs = _random_like(inputs, CHECK_SEED)
    failures: dict[str, str] = {}
    with eval_mode(model), torch.no_grad():
        expected = output_tensors(model(*check_inputs))
        names = (list(input_names or _names("input", len(inputs))),
                 list(output_names or _names("output", len(expected))))
        for exporter in exporters:
            try:
                graph = _export(exporter, model, inputs, names, expected)
                diff = _check(ort, graph, names[0], check_inputs, expected, tolerance)
            except _Failed as failure:
                failures[exporter] = str(failure)
                continue
            atomic_write_bytes(Path(path), graph)
            return OnnxExport(Path(path), len(graph), diff, exporter, OPSETS[exporter])
    raise UserError(_sentence(type(model).__name__, failures))


def _onnxruntime() -> Any:
    """The onnxruntime module, or one sentence saying how to install the ONNX extra."""
    try:
        import onnx  # noqa: F401 (torch's exporters need it; checked here to fail early and clearly)
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxruntime packages; "
                        "install them with pip install 'prunelab[onnx]'") from None
    return onnxruntime


def _names(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


def _random_like(inputs: Sequence[Tensor], seed: int) -> tuple[Tensor, ...]:
    """Seeded random tensors of ``inputs``' shapes, dtypes and devices.

    Floats are standard normal (normalised images and activations are of
    that order); integers (token ids, indices) stay within the example's
    range so that embeddings and gathers remain valid; booleans (masks) and
    empty tensors are copied, since random masks could blank out whole rows.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(t: Tensor) -> Tensor:
        if t.is_floating_point():
            return torch.randn(t.shape, generator=generator).to(device=t.device, dtype=t.dtype)
        if t.dtype == torch.bool or t.is_complex() or not t.numel():
            return t.clone()
        low, high = int(t.min()), int(t.max())
        return torch.randint(low, high + 1, t.shape, generator=generator).to(device=t.device, dtype=t.dtype)

    return tuple(draw(t) for t in inputs)


def _export(exporter: str, model: nn.Module, inputs: tuple[Tensor, ...], names: tuple[list[str], list[str]],
            outputs: Sequence[Tensor]) -> bytes:
    """The ONNX graph of ``model`` from ``exporter``, serialised; :class:`_Failed` saying why not."""
    input_names, output_names = names
    try:
        with _quiet():
            if exporter == TORCHSCRIPT:
                axes = {n: {0: "batch"} for n, t in [*zip(input_names, inputs), *zip(output_names, outputs)] if t.ndim}
                buffer = io.BytesIO()
                torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=OPSETS[exporter],
                                  input_names=input_names, output_names=output_names, dynamic_axes=axes)
                return buffer.getvalue()
            # Dim.AUTO: the batch axis is dynamic where the model allows it, never a constraint error.
            shapes = tuple({0: torch.export.Dim.AUTO} if t.ndim else None for t in inputs)
            program = torch.onnx.export(model, inputs, dynamo=True, opset_version=OPSETS[exporter],
                                        input_names=input_names, output_names=output_names, dynamic_shapes=shapes)
            assert program is not None  # the dynamo exporter returns its program when not given a file
            return program.model_proto.SerializeToString()
    except Exception as error:  # noqa: BLE001 (any exporter failure is said in one clause; the next one is tried)
        raise _Failed(_cause(error)) from None


def _check(ort: Any, graph: bytes, input_names: Sequence[str], inputs: Sequence[Tensor],
           expected: Sequence[Tensor], tolerance: float) -> float:
    """The max abs difference between onnxruntime running ``graph`` on ``inputs`` and ``expected``."""
    try:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        used = {i.name for i in session.get_inputs()}  # an input the graph ignores is dropped from it
        feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs) if n in used}
        got = [torch.from_numpy(np.asarray(a)) for a in session.run(None, feed)]
    except Exception as error:  # noqa: BLE001 (onnxruntime's own error, said in one clause)
        raise _Failed(f"onnxruntime cannot run the graph ({_first_line(error)})") from None
    try:
        error, scale = max_abs_difference(expected, got)
    except ValueError as mismatch:
        raise _Failed(f"the graph's outputs do not match the model's ({mismatch})") from None
    if not within(error, scale, tolerance):
        raise _Failed(f"onnxruntime's outputs differ from the model's by up to {error:.3g} on random inputs "
                      f"(tolerance {tolerance:g}), as when the model branches on its input's values")
    return error


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow the exporters' prints (file descriptors 1 and 2 too: TorchScript prints its graph from
    C++), warnings and torch's log messages; the exception, if any, says what matters."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        saved = _redirect_descriptors(sink.fileno())
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            _flush_c_streams()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _redirect_descriptors(target: int) -> list[tuple[int, int]]:
    """Point file descriptors 1 and 2 at ``target``; return (fd, saved copy) pairs to restore."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    _flush_c_streams()
    saved = []
    for fd in (1, 2):
        try:
            saved.append((fd, os.dup(fd)))
            os.dup2(target, fd)
        except OSError:  # no such descriptor (a daemon): nothing to silence there
            continue
    return saved


def _flush_c_streams() -> None:
    """Flush C's stdio buffers, so that text printed inside :func:`_quiet` lands in its sink."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OPERATOR = re.compile(r"operator '([\w:.]+)'|OpOverload\(op='([\w.]+)'")
_CALL_SITE = re.compile(r'The following call raised this error:\s+File "([^"]+)", line (\d+)')


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _cause(error: BaseException) -> str:
    """One clause saying why an exporter failed: the operator without an ONNX mapping, a branch on
    the input's values, a missing package, or the first line of the innermost error."""
    chain = _chain(error)
    text = _ANSI.sub("", "\n".join(str(e) for e in chain))
    operator = _OPERATOR.search(text)
    if operator:
        name = operator.group(1) or operator.group(2).replace(".", "::", 1)
        return f"operator {name} has no ONNX equivalent"
    if any(type(e).__name__ == "GuardOnDataDependentSymNode" for e in chain):
        site = _CALL_SITE.search(text)
        where = f" (at {Path(site.group(1)).name}:{site.group(2)})" if site else ""
        return f"the model branches on its input's values{where}, which a static graph cannot hold"
    missing = next((e for e in chain if isinstance(e, ModuleNotFoundError)), None)
    if missing is not None and missing.name:
        return f"it needs the {missing.name} package (pip install {missing.name})"
    return _first_line(chain[-1])


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return (text if len(text) <= 200 else text[:197] + "...").rstrip(".")


def _sentence(model_name: str, failures: dict[str, str]) -> str:
    """The one sentence of a failed export: the cause each exporter gave, once if they agree."""
    causes = set(failures.values())
    if len(causes) == 1:
        tried = " and ".join(failures) + (" exporters" if len(failures) > 1 else " exporter")
        return f"cannot export {model_name} to ONNX: {causes.pop()} (tried the {tried})"
    return f"cannot export {model_name} to ONNX: " + "; ".join(f"{e} exporter: {c}" for e, c in failures.items())
