"""Structural removal of dead neurons and channels: real, smaller dense layers.

A pruned network often holds units (a Linear layer's output features, a
Conv2d layer's output channels) that cannot matter: either the next layer
reads them with all-zero weights, or they receive all-zero weights and so put
out a constant that the next layer can absorb into its bias. :func:`shrink`
finds such units with torch.fx and cuts them out of the producing layer, the
BatchNorm between, and the consuming layer's input, so the model computes the
same function with fewer multiply-adds.

Only simple chains are touched, where the analysis is exact:

    producer (Linear or Conv2d, groups 1)
      -> per-unit ops: activations, BatchNorm1d/2d (eval), pools, Dropout, Identity,
         at most one flatten (nn.Flatten, torch.flatten(x, 1), x.view(x.size(0), -1))
      -> exactly one consumer (Linear or Conv2d, groups 1)

with every intermediate result used once. Anything else (a residual sum, a
value used twice, an unknown op, a module called twice, a model fx cannot
trace) leaves that producer as it is. The model's inputs and outputs never
change: a producer's inputs and a consumer's outputs are left whole.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

Layer = nn.Linear | nn.Conv2d
Step = Callable[[torch.Tensor], torch.Tensor]

# Element-wise modules: unit j's output depends on unit j's input only, and
# what they do to a constant can be computed by calling them on it.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
)  # fmt: skip
# Identities in eval mode (dropout is off in the eval-mode copy shrink works on).
_PASSTHROUGH_MODULES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_ELEMENTWISE_FUNCTIONS = frozenset({F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu,
                                    torch.sigmoid, torch.tanh})  # fmt: skip
_ELEMENTWISE_METHODS = frozenset({"relu", "relu_", "sigmoid", "tanh"})
# Per-channel pools that map a channel of one constant value to the same constant
# (max pools pad with -inf; an average pool without padding averages the constant).
_CONSTANT_POOLS: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class _Chain:
    """A producer, the per-unit ops after it, and the one layer that reads its units."""

    producer: Layer
    consumer: Layer
    steps: tuple[Step, ...]  # what each op does to a vector holding one constant per unit
    norms: tuple[_BatchNorm, ...]  # BatchNorms whose per-unit parameters are cut with the units


def shrink(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with its dead units removed structurally.

    A unit is removed when its consumer reads it with all-zero weights, or when
    its own incoming weights are all zero and its constant output can be folded
    exactly into the consumer's bias (always for a Linear consumer; for a
    Conv2d consumer only without zero padding, whose borders would see a
    zero instead of the constant, unless the constant is exactly 0). Removal
    repeats until nothing changes, since cutting a consumer's inputs can kill
    units further back. One unit of each layer is always kept. Models that
    torch.fx cannot trace come back unchanged (but copied and in eval mode).
    The copy shares no storage with ``model``.
    """
    model = copy.deepcopy(model).eval()
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - tracing runs arbitrary user code; untraceable means "skip"
        return model
    chains = _find_chains(model, graph_module)
    with torch.no_grad():
        # The graph module holds the same submodules as ``model``, so editing them edits ``model``.
        # A list, not a generator: every chain gets its pass before deciding whether to go again.
        while any([_shrink_chain(chain) for chain in chains]):
            pass
    return model


def _find_chains(model: nn.Module, graph_module: fx.GraphModule) -> list[_Chain]:
    """Every producer -> per-unit ops -> consumer chain of ``model`` that is safe to cut."""
    calls = Counter(node.target for node in graph_module.graph.nodes if node.op == "call_module")
    shared = _shared_tensors(model, graph_module)

    def usable(node: fx.Node) -> nn.Module | None:
        """The module a node calls, unless it has hooks, or has tensors and is called twice or
        shares them (stateless modules such as one ReLU used everywhere are fine to reuse)."""
        if node.op != "call_module":
            return None
        module = graph_module.get_submodule(str(node.target))
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        tensors = [*module.parameters(), *module.buffers()]
        if tensors and (calls[node.target] != 1 or any(id(t) in shared for t in tensors)):
            return None
        return module

    chains = []
    for node in graph_module.graph.nodes:
        producer = _layer(usable(node))
        if producer is not None:
            chain = _follow(node, producer, usable)
            if chain is not None:
                chains.append(chain)
    return chains


def _shared_tensors(model: nn.Module, graph_module: fx.GraphModule) -> set[int]:
    """ids of tensors used elsewhere too: reachable under two names (tied weights), or read
    directly by the forward (``F.linear(x, self.fc.weight)``), which a cut would break."""
    tensors = [t for _, t in [*model.named_parameters(remove_duplicate=False),
                              *model.named_buffers(remove_duplicate=False)]]  # fmt: skip
    counts = Counter(id(t) for t in tensors)
    nodes = graph_module.graph.nodes
    read = {id(_attribute(graph_module, str(n.target))) for n in nodes if n.op == "get_attr"}
    return {key for key, count in counts.items() if count > 1} | read


def _attribute(root: nn.Module, path: str) -> object:
    """``root.a.b.c`` for the path ``"a.b.c"`` (a get_attr node's target)."""
    value: object = root
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _layer(module: nn.Module | None) -> Layer | None:
    """``module`` if it is a Linear or an ungrouped Conv2d (units map to weight rows)."""
    if type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1):
        return module
    return None


def _follow(
    start: fx.Node, producer: Layer, usable: Callable[[fx.Node], nn.Module | None]
) -> _Chain | None:
    """The chain from ``start`` (calling ``producer``) to its one consumer, or None if unsafe."""
    is_conv = isinstance(producer, nn.Conv2d)
    steps: list[Step] = []
    norms: list[_BatchNorm] = []
    flattened = False
    current = start
    while True:
        user = _only_user(current)
        if user is None or user.args[:1] != (current,):
            return None
        module = usable(user)
        consumer = _layer(module)
        if consumer is not None:
            if user.args != (current,) or user.kwargs or not _fits(producer, consumer, flattened):
                return None
            return _Chain(producer, consumer, tuple(steps), tuple(norms))
        if _is_flatten(user, current, module):
            if not is_conv or flattened:
                return None  # a Linear's units are its last dim: flattening mixes them with other dims
            flattened = True
        elif isinstance(module, _BatchNorm):
            if is_conv and flattened:
                return None  # after a flatten, a BatchNorm1d normalizes pixels, not channels
            expected = nn.BatchNorm2d if is_conv else nn.BatchNorm1d
            if type(module) is not expected or module.running_mean is None:
                return None  # without running statistics the output is no per-unit function
            norms.append(module)
            steps.append(_norm_step(module, is_conv))
        elif isinstance(module, _CONSTANT_POOLS) or (type(module) is nn.AvgPool2d and _no_padding(module)):
            if not is_conv or flattened:
                return None
            # A pool maps a constant channel to the same constant: no step.
        elif type(module) not in _PASSTHROUGH_MODULES:
            step = _elementwise_step(user, module)
            if step is None:
                return None
            steps.append(step)
        current = user


def _only_user(node: fx.Node) -> fx.Node | None:
    """The single node reading ``node``'s values, ignoring ``node.size(0)`` queries for it."""
    readers = [u for u in node.users if not _is_batch_size(u, node)]
    if len(readers) != 1:
        return None
    reader = readers[0]
    # A batch-size query feeding anything but that reader (e.g. a constant's shape) is a second use.
    if any(_is_batch_size(u, node) and set(u.users) != {reader} for u in node.users):
        return None
    return reader


def _is_batch_size(node: object, source: fx.Node) -> bool:
    """Whether ``node`` is ``source.size(0)``."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_method"
        and node.target == "size"
        and node.args == (source, 0)
        and not node.kwargs
    )


def _is_flatten(node: fx.Node, source: fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` flattens all dims after the batch dim of ``source`` (and nothing else)."""
    if node.op == "call_module":
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1 and len(node.args) + len(node.kwargs) <= 3
    reshapes = (("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape))
    if (node.op, node.target) in reshapes:
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) == 2 and _is_batch_size(shape[0], source) and shape[1] == -1 and not node.kwargs
    return False


def _fits(producer: Layer, consumer: Layer, flattened: bool) -> bool:
    """Whether the consumer's inputs are the producer's units (times a spatial block when flattened)."""
    units = producer.weight.shape[0]
    if isinstance(consumer, nn.Conv2d):
        return isinstance(producer, nn.Conv2d) and not flattened and consumer.in_channels == units
    if isinstance(producer, nn.Conv2d):
        # The spatial size is whatever makes the numbers add up: in_features = units * H * W.
        return flattened and consumer.in_features % units == 0
    return consumer.in_features == units


def _no_padding(module: nn.Module) -> bool:
    """Whether a pool pads nothing (an average pool's padding would average in zeros)."""
    padding = module.padding
    return all(p == 0 for p in padding) if isinstance(padding, tuple) else padding == 0


def _zero_padded(conv: nn.Conv2d) -> bool:
    """Whether the conv pads with zeros, which a constant input channel would not contain."""
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding of a constant channel is the constant
    if isinstance(conv.padding, str):
        return conv.padding != "valid"
    return any(p != 0 for p in conv.padding)


def _norm_step(norm: _BatchNorm, is_conv: bool) -> Step:
    """A BatchNorm (eval mode) applied to one constant per unit, by the module itself."""
    shape = (1, -1, 1, 1) if is_conv else (1, -1)
    return lambda c: norm(c.reshape(shape)).reshape(-1)


def _elementwise_step(node: fx.Node, module: nn.Module | None) -> Step | None:
    """The op of ``node`` applied to a constant vector, or None if it is not element-wise."""
    rest, kwargs = node.args[1:], node.kwargs
    if any(isinstance(a, fx.Node) for a in [*rest, *kwargs.values()]):
        return None  # a second tensor operand (x + y, x * scale) is not a per-unit op
    if node.op == "call_module":
        return module if type(module) in _ELEMENTWISE_MODULES else None
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return lambda c: node.target(c, *rest, **kwargs)
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return lambda c: getattr(c, str(node.target))(*rest, **kwargs)
    return None


def _shrink_chain(chain: _Chain) -> bool:
    """Remove the dead units of one chain; whether any were removed."""
    producer, consumer = chain.producer, chain.consumer
    units = producer.weight.shape[0]
    # (consumer outputs, units, H*W block or kernel positions or 1) for all three consumer kinds.
    columns = consumer.weight.reshape(consumer.weight.shape[0], units, -1)
    unread = (columns == 0).all(dim=2).all(dim=0)
    constant = (producer.weight.reshape(units, -1) == 0).all(dim=1)
    value = _constant_output(chain)
    foldable = constant & torch.isfinite(value)
    if isinstance(consumer, nn.Conv2d) and _zero_padded(consumer):
        foldable &= value == 0
    remove = unread | foldable
    if remove.all():
        # Zero-sized layers are not worth their corner cases: keep one unit,
        # preferably an unread one (it needs no folding).
        remove[int(unread.to(torch.uint8).argmax())] = False
    if not remove.any():
        return False
    fold = remove & ~unread & (value != 0)  # a unit whose constant is 0 contributes nothing
    if fold.any():
        # Each folded unit added value_j * (sum of its input weights) to every output.
        shift = (columns[:, fold, :].sum(dim=2) * value[fold]).sum(dim=1)
        bias = consumer.bias if consumer.bias is not None else torch.zeros_like(shift)
        consumer.bias = nn.Parameter(bias + shift, requires_grad=False)
    _cut(chain, ~remove)
    return True


def _constant_output(chain: _Chain) -> torch.Tensor:
    """Per unit, what it feeds the consumer if its incoming weights are all zero."""
    producer = chain.producer
    units = producer.weight.shape[0]
    value = producer.bias.clone() if producer.bias is not None else producer.weight.new_zeros(units)
    for step in chain.steps:
        value = step(value.clone())  # clone: in-place activations must not touch the bias
    return value


def _cut(chain: _Chain, keep: torch.Tensor) -> None:
    """Keep only the ``keep`` units in the producer, the BatchNorms and the consumer's inputs."""
    producer, consumer = chain.producer, chain.consumer
    _set_param(producer, "weight", producer.weight[keep])
    if producer.bias is not None:
        _set_param(producer, "bias", producer.bias[keep])
    kept = int(keep.sum())
    if isinstance(producer, nn.Linear):
        producer.out_features = kept
    else:
        producer.out_channels = kept
    for norm in chain.norms:
        for name in ("weight", "bias"):
            if getattr(norm, name) is not None:
                _set_param(norm, name, getattr(norm, name)[keep])
        norm.running_mean = norm.running_mean[keep]
        norm.running_var = norm.running_var[keep]
        norm.num_features = kept
    weight = consumer.weight
    if isinstance(consumer, nn.Conv2d):
        _set_param(consumer, "weight", weight[:, keep])
        consumer.in_channels = kept
    else:
        # With a flatten, unit j owns the block of columns [j * HW, (j + 1) * HW).
        blocks = weight.reshape(weight.shape[0], keep.numel(), -1)[:, keep, :]
        _set_param(consumer, "weight", blocks.reshape(weight.shape[0], -1))
        consumer.in_features = blocks.shape[1] * blocks.shape[2]


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter by a smaller one (contiguous: it is read by dense kernels)."""
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))
