"""Any BatchNorm CNN as a ``Backbone`` (stem, blocks, head), its part boundaries found by torch.fx.

EcoTTA puts a meta network after each of K parts of the frozen network. A part must end where
exactly one tensor flows on (a "cut": no residual connection or branch crosses it). The model is
traced with torch.fx and shape-propagated at its input size; every 4D tensor that is the only
live value at its point of the graph is a cut. Consecutive cuts delimit segments; a segment
without a convolution (a BatchNorm, an activation, a pooling) joins the one before it, so a
*unit* is one or more convolutions with what follows them:

- residual networks: one unit per residual block (a shortcut keeps its input alive, so no cut
  falls inside a block), which is the zoo's split exactly (tested);
- plain stacks and MobileNet blocks without a shortcut: one unit per conv(-BN-activation).

The first unit is the stem, the units after it are the blocks, and what follows the last unit
(pooling, classifier: no convolution) is the head. The K parts take the blocks as the zoo does
(``ecotta.default_split``: shallow parts finer, as EcoTTA splits), or end exactly after the
modules the user names (``boundaries``), each of which must be a cut.

Hard-swish and hard-sigmoid (modules or functions) are rewritten as ``relu6`` arithmetic:
onnxruntime-training has gradients for Add/Clip/Mul/Div, not for ONNX's HardSwish/HardSigmoid.

What cannot be handled is refused with ``ExportError`` (one line, saying what).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
import torch.nn.functional as F

from .ecotta import default_split
from .errors import ExportError
from .models import Backbone

__all__ = ["ExportError", "Cut", "cuts", "part_ends", "partition", "trace", "units"]


def hard_swish(x: torch.Tensor) -> torch.Tensor:
    return x * F.relu6(x + 3.0) / 6.0


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


_REWRITES = {nn.Hardswish: hard_swish, nn.Hardsigmoid: hard_sigmoid,
             F.hardswish: hard_swish, F.hardsigmoid: hard_sigmoid}


@dataclass(frozen=True)
class Cut:
    """A place where exactly one tensor flows on: after fx node ``node`` (index ``index`` in
    the traced graph), inside module ``module`` (its innermost scope, '' at top level)."""

    index: int
    node: str
    module: str
    channels: int
    size: tuple[int, int]
    has_conv: bool  # the segment that ends here holds a convolution


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def trace(module: nn.Module) -> fx.GraphModule:
    """torch.fx trace of ``module`` with hard-swish/-sigmoid rewritten; ExportError if it cannot."""
    if not isinstance(module, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(module).__name__}")
    name = type(module).__name__
    if not any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        raise ExportError(f"{name} has no BatchNorm2d layer: the exporter takes a BatchNorm CNN "
                          "(EcoTTA adapts a frozen network through BatchNorm meta networks)")
    try:
        gm = fx.symbolic_trace(module)
    except Exception as e:
        raise ExportError(f"torch.fx cannot trace {name} ({_first_line(e)}): its forward() has "
                          "control flow that depends on the data; make it static to export it") from None
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ExportError(f"{name}.forward takes {len(inputs)} inputs; the exporter takes one image batch")
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        fn = None
        if node.op == "call_module":
            fn = _REWRITES.get(type(mods[node.target]))
        elif node.op == "call_function":
            fn = _REWRITES.get(node.target)
        if fn is not None:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(fn, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _is_conv(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    return ((node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d))
            or (node.op == "call_function" and node.target is F.conv2d))


def cuts(gm: fx.GraphModule, input_size: int, in_channels: int = 3) -> list[Cut]:
    """Every cut of a traced model, in graph order (see the module docstring)."""
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, in_channels, input_size, input_size))
    except Exception as e:
        raise ExportError(f"the model fails on a 1x{in_channels}x{input_size}x{input_size} input "
                          f"({_first_line(e)}); pass its input size") from None
    finally:
        gm.train(was_training)
    mods = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    values = [n for n in nodes if n.op not in ("get_attr", "output")]
    out: list[Cut] = []
    conv_since = False
    for i, node in enumerate(nodes):
        conv_since = conv_since or _is_conv(node, mods)
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is None or len(shape) != 4:
            continue
        live = [v for v in values if index[v] <= i and last_use[v] > i]
        if live != [node]:
            continue
        stack = list(node.meta.get("nn_module_stack", {}) or {})
        out.append(Cut(i, node.name, stack[-1] if stack else "", int(shape[1]),
                       (int(shape[2]), int(shape[3])), conv_since))
        conv_since = False
    return out


def units(all_cuts: list[Cut]) -> list[Cut]:
    """The cuts that end a unit: a unit ends where the next segment begins with a convolution,
    so a conv-less segment (BatchNorm, activation) joins the unit before it; the last unit
    takes the conv-less segments after it up to global pooling (the first 1x1 map), the head
    the rest. In a pre-activation network (WRN) a block's leading BN-ReLU thus joins the block
    before it."""
    convs = [j for j, c in enumerate(all_cuts) if c.has_conv]
    if not convs:
        return []
    tail = [j for j in range(convs[-1], len(all_cuts)) if j == convs[-1] or all_cuts[j].size != (1, 1)]
    return [all_cuts[j] for j in range(convs[0], convs[-1]) if all_cuts[j + 1].has_conv] + [all_cuts[tail[-1]]]


def _segment(gm: fx.GraphModule, nodes: list[fx.Node], start: int, end: int | None) -> fx.GraphModule:
    """The nodes after index ``start`` up to and including ``end`` (None: to the output) as a
    module of one input; ``start`` -1 begins at the model's input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    x = graph.placeholder("x")
    if start < 0:
        env[nodes[0]] = x
    else:
        env[nodes[start]] = x

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:  # a parameter or buffer read in this segment
            if n.op != "get_attr":
                raise ExportError(f"tensor {n.name} crosses a part boundary")  # cuts exclude this
            env[n] = graph.node_copy(n)
        return env[n]

    last = None
    for n in nodes[start + 1:] if end is None else nodes[start + 1:end + 1]:
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            graph.output(fx.map_arg(n.args[0], arg))
            last = None
            break
        env[n] = graph.node_copy(n, arg)
        last = env[n]
    if last is not None:
        graph.output(last)
    return fx.GraphModule(gm, graph)


def _cut_for_module(all_cuts: list[Cut], gm: fx.GraphModule, name: str) -> Cut:
    nodes = list(gm.graph.nodes)
    inside = [i for i, n in enumerate(nodes)
              if n.op == "call_module" and (n.target == name or n.target.startswith(name + "."))
              or name in (n.meta.get("nn_module_stack") or {})]
    if not inside:
        raise ExportError(f"no module named {name!r} in the model's forward pass")
    last = max(inside)
    for c in all_cuts:
        if c.index == last:
            return c
    raise ExportError(f"cannot end a part after {name!r}: another tensor crosses its output "
                      "(a residual connection or a branch); name the module that ends the block")


def partition(module: nn.Module, input_size: int, boundaries: list[str] | None = None, k: int = 4,
              in_channels: int = 3, meta_kernel: int = 1) -> tuple[Backbone, list[int]]:
    """``module`` as a Backbone of torch.fx segments and the split of its blocks into ``k``
    parts (``boundaries``: names of the modules that end the parts, in order)."""
    gm = trace(module)
    all_cuts = cuts(gm, input_size, in_channels)
    ends = units(all_cuts)
    cls = type(module).__name__
    if boundaries:
        chosen = [_cut_for_module(all_cuts, gm, b) for b in boundaries]
        if any(b.index <= a.index for a, b in zip(chosen, chosen[1:])):
            raise ExportError(f"boundaries {boundaries} are not in the order of the forward pass")
        if not ends or chosen[0].index <= ends[0].index:
            raise ExportError(f"the first boundary {boundaries[0]!r} must come after the stem "
                              "(the first convolution and what follows it)")
        block_ends, split = [ends[0]] + chosen, [1] * len(chosen)
    else:
        if len(ends) < k + 1:
            raise ExportError(f"found {len(ends)} places to split {cls} where one tensor flows on; "
                              f"a stem and K={k} parts need {k + 1}: lower K")
        block_ends, split = ends, default_split(len(ends) - 1, k)
    nodes = list(gm.graph.nodes)
    segments = [_segment(gm, nodes, -1, block_ends[0].index)]
    for a, b in zip(block_ends, block_ends[1:]):
        segments.append(_segment(gm, nodes, a.index, b.index))
    head = _segment(gm, nodes, block_ends[-1].index, None)
    stem_stride = input_size // block_ends[0].size[0]
    backbone = Backbone(segments[0], segments[1:], head, stem_channels=block_ends[0].channels,
                        stem_stride=max(1, stem_stride), meta_kernel=meta_kernel,
                        input_size=input_size, in_channels=in_channels)
    backbone.block_ends = [c.module or c.node for c in block_ends[1:]]  # for the manifest
    return backbone, split


def part_ends(backbone: Backbone, split: list[int]) -> list[str]:
    """Where each part ends, by module (fx node where no module encloses it): for the manifest."""
    names = getattr(backbone, "block_ends", None) or [f"blocks.{i}" for i in range(len(backbone.blocks))]
    ends, total = [], 0
    for n in split:
        total += n
        ends.append(names[total - 1])
    return ends
