"""Tables and plots from the store; knows nothing of training.

``write_report(store_root, out)`` writes ``report.md``, a self-contained
``report.html`` and every figure as PNG and SVG. The parts are importable for
reuse and tests: filtering and statistics (``tables``), masks (``masks``),
figures (``plots``), the published numbers (``references``).
"""

from prunelab.report.masks import iou_matrix, layer_densities, load_mask, mask_iou
from prunelab.report.references import REFERENCES, Reference, references_for
from prunelab.report.tables import Row, Table, build_tables, filter_records, normalize, pareto_front
from prunelab.report.writer import find_warnings, write_report

__all__ = [
    "REFERENCES",
    "Reference",
    "Row",
    "Table",
    "build_tables",
    "filter_records",
    "find_warnings",
    "iou_matrix",
    "layer_densities",
    "load_mask",
    "mask_iou",
    "normalize",
    "pareto_front",
    "references_for",
    "write_report",
]
