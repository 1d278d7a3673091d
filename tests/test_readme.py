"""The Python examples of README.md and docs/api.md run as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/api.md")


def python_blocks(document: str) -> list[str]:
    """The ```python blocks of ``document`` (a path relative to the repository root), in order."""
    return re.findall(r"```python\n(.*?)```", (ROOT / document).read_text(), flags=re.DOTALL)


EXAMPLES = [(document, index) for document in DOCUMENTS
            for index in range(len(python_blocks(document)))]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_document_has_python_examples(document: str) -> None:
    assert python_blocks(document)


@pytest.mark.parametrize(("document", "index"), EXAMPLES, ids=[f"{d}-{i}" for d, i in EXAMPLES])
def test_python_example_runs(
    document: str, index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    block = python_blocks(document)[index]
    monkeypatch.chdir(tmp_path)  # examples may write files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(block, f"{document} python block {index}", "exec"), {"__name__": "__readme__"})
    # An example must not teach a pruning that disconnects the network.
    assert not [w for w in caught if "lost all its weights" in str(w.message)]
    if "print(f\"sparsity" in block:
        assert "sparsity 0.9000" in capsys.readouterr().out
