"""A YAML loader with hard limits for what users hand us: config files, sweep files, ``--set``.

``yaml.safe_load`` builds no arbitrary objects, but it still trusts the
document's shape: brackets nested 100,000 deep recurse until Python gives up,
and a "billion laughs" document (each anchor a list of aliases of the last)
is tiny on disk yet expands to billions of nodes once anything walks it.
:func:`load` refuses, in one sentence naming the source and the limit:

* a document larger than :data:`MAX_BYTES`;
* one nesting deeper than :data:`MAX_DEPTH` levels, checked while composing
  (so the composer never recurses past it) and again with aliases expanded;
* one whose node count, every alias counted as a full copy of what it refers
  to, exceeds :data:`MAX_NODES`. The count is kept per node as it is composed
  (an alias reuses its target's count), so it takes time linear in the text;
* an alias that refers to a collection containing it (an endless structure).

A run config or sweep file is a few hundred nodes, so none of these limits
comes near a real one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from prunelab.errors import UserError

#: Largest document accepted, in bytes (1 MiB).
MAX_BYTES = 1 << 20
#: Deepest nesting accepted: a top-level scalar has depth 1, ``{a: [1]}`` depth 3.
MAX_DEPTH = 64
#: Most nodes accepted once every alias is expanded (scalars, sequences, mappings and mapping keys).
MAX_NODES = 100_000


class LimitExceeded(UserError):
    """A document goes over one of this module's limits; the message ends a sentence."""


class LimitedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that tracks nesting depth and expanded size while it composes nodes."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        """Compose one node, refusing it before recursing past :data:`MAX_DEPTH`."""
        if self._depth >= MAX_DEPTH:
            raise LimitExceeded(f"nests deeper than the limit of {MAX_DEPTH} levels")
        alias = self.check_event(yaml.AliasEvent)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias and id(node) not in self._sizes:
            raise LimitExceeded(
                "has an alias that refers to a collection containing it (an endless structure)"
            )
        if not alias:
            self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        """Record the expanded size and depth of ``node`` (from its children's), within the limits."""
        children = _children(node)
        sizes = [self._sizes[id(child)] for child in children]
        count = 1 + sum(n for n, _ in sizes)
        depth = 1 + max((d for _, d in sizes), default=0)
        if count > MAX_NODES:
            raise LimitExceeded(
                f"expands to more than the limit of {MAX_NODES} nodes (each alias counted in full)"
            )
        if depth > MAX_DEPTH:
            raise LimitExceeded(
                f"nests deeper than the limit of {MAX_DEPTH} levels once its aliases are expanded"
            )
        self._sizes[id(node)] = (count, depth)


# YAML 1.1 reads ``2:4`` as the base-60 integer 124 (and ``1:30.5`` as a float); YAML 1.2 dropped
# that, and prunelab's values need the text (N:M structures such as ``prune.structure=2:4``). The
# loader resolves ints and floats by PyYAML's own patterns minus their base-60 forms.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
LimitedLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
LimitedLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
LimitedLoader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))


def _children(node: yaml.Node) -> list[yaml.Node]:
    """The direct child nodes of ``node`` (keys and values of a mapping), none for a scalar."""
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load(text: str | bytes, source: str) -> Any:
    """The data of one YAML document; a :class:`UserError` naming ``source`` if it breaks a limit.

    ``source`` starts the sentence, e.g. ``"config file sweep.yaml"``. Syntax
    errors stay ``yaml.YAMLError`` for the caller to word.
    """
    size = len(text.encode("utf-8", "replace")) if isinstance(text, str) else len(text)
    if size > MAX_BYTES:
        raise UserError(f"{source} is larger than the limit of {MAX_BYTES} bytes")
    loader = LimitedLoader(text)
    try:
        return loader.get_single_data()
    except LimitExceeded as exc:
        raise UserError(f"{source} {exc}") from None
    finally:
        loader.dispose()


def read(path: Path, source: str) -> Any:
    """:func:`load` of a UTF-8 file, reading at most one byte past :data:`MAX_BYTES` of it.

    ``OSError`` and ``UnicodeDecodeError`` propagate for the caller to word.
    """
    with Path(path).open("rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise UserError(f"{source} is larger than the limit of {MAX_BYTES} bytes")
    return load(data.decode("utf-8"), source)
