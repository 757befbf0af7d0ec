"""Tracing with torch.fx, keeping untraceable submodules as leaves.

``trace_with_leaves(module)`` traces ``module``; when a submodule's forward cannot be traced
symbolically (data-dependent control flow, iteration over a proxy, ...), that submodule becomes a
leaf and tracing restarts. It returns the graph and the paths of the submodules kept opaque, which
the caller prepares recursively. If ``module``'s own code cannot be traced, ``graph`` is ``None``.

A graph is one path through ``forward``: arguments that default to ``None`` or a bool usually
steer its control flow (``if mask is not None``, ``if output_attentions``), so graphs are traced
per *call pattern* (:func:`call_pattern`): which of those arguments are ``None``, and the value of
each bool, int or string passed to them; tensors and other objects stay graph inputs.
"""
from __future__ import annotations

import contextlib
import inspect
import keyword
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils.checkpoint

__all__ = ["MuppetTracer", "StateChanged", "stock_layer", "trace_with_leaves", "hooked_paths", "LEAF_TYPES",
           "buffer_snapshot", "restore_buffers",
           "TRANSPOSED_CONVS", "Option", "specialisable_arguments", "call_pattern", "pattern_constants", "GIVEN"]

TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Modules the rewrite rules act on as a whole (or keep FP32 as a whole).
LEAF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention, nn.RNNBase,
              *TRANSPOSED_CONVS, nn.Bilinear)


def stock_layer(m: nn.Module, types: tuple) -> bool:
    """Whether ``m`` is one of ``types`` with that type's own ``forward``: a subclass that
    overrides it (a low-rank adapter around ``nn.Linear``, a weight-standardised convolution)
    computes something else, so its code is traced like any module's."""
    return any(isinstance(m, t) and type(m).forward is t.forward for t in types)


class MuppetTracer(fx.Tracer):
    """Leaves: the rule table's module types, parameter-free torch.nn primitives, and the opaque
    paths found so far. Records the innermost module whose tracing raised."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        # buffers read in forward become graph values, so in-place updates of them (timm's
        # BatchNormAct2d counting num_batches_tracked, an EMA) are recorded and repeat on every
        # call, instead of running once on the real buffer at trace time
        self.proxy_buffer_attributes = True
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or stock_layer(m, LEAF_TYPES):
            return True
        return m.__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential) \
            and next(m.children(), None) is None

    def create_arg(self, a):
        # torch.fx rebuilds a dict subclass as a plain dict; an ordered dict class of named
        # fields (a model output, indexable by position too) is rebuilt as itself
        if (isinstance(a, OrderedDict) and type(a) is not OrderedDict
                and all(isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k) for k in a)):
            return self.create_node("call_function", type(a), (), {k: self.create_arg(v) for k, v in a.items()})
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                try:
                    self.failed_path = self.path_of_module(m)
                except NameError:  # a module not registered as a submodule: blame the caller
                    pass
            raise


class Option(NamedTuple):
    """A ``forward`` argument that defaults to ``None`` or a bool."""
    name: str
    position: int | None  # index among the positional arguments (after self); None: keyword-only
    default: Any


GIVEN = "<given>"  # a call-pattern entry: a tensor or other object, traced as a graph input
_CONSTANTS = (bool, int, str)  # not float: a NaN would never match its own pattern


def specialisable_arguments(module: nn.Module) -> tuple[Option, ...]:
    """The arguments of ``module.forward`` that graphs are specialised on."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature (a C-implemented forward)
        return ()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(Option(p.name, i if p.kind in positional else None, p.default)  # *args, **kwargs: no default
                 for i, p in enumerate(params) if p.default is None or type(p.default) is bool)


def _entry(value) -> tuple:
    """(type, value) for None and constants (True and 1 are different patterns), else GIVEN."""
    return (type(value), value) if value is None or type(value) in _CONSTANTS else (GIVEN, None)


def call_pattern(options: tuple[Option, ...], args: tuple, kwargs: dict) -> tuple:
    """The pattern of one call ``forward(*args, **kwargs)``: one entry per option."""
    return tuple(_entry(kwargs[o.name] if o.name in kwargs else
                        args[o.position] if o.position is not None and o.position < len(args) else o.default)
                 for o in options)


def pattern_constants(options: tuple[Option, ...], pattern: tuple) -> dict[str, Any]:
    """``concrete_args`` for tracing the graph of ``pattern``."""
    return {o.name: value for o, (kind, value) in zip(options, pattern) if kind is not GIVEN}


def _keep_argument_names(graph: fx.Graph, constants: dict[str, Any]) -> None:
    """torch.fx names a specialised argument's placeholder ``<name>_1``; callers pass it by its
    own name, so the generated forward must keep that name."""
    for node in graph.nodes:
        if node.op == "placeholder" and node.target.endswith("_1") and node.target[:-2] in constants:
            node.target = node.target[:-2]


def _holds_proxy(value) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return any(_holds_proxy(v) for v in items)


class StateChanged(RuntimeError):
    """A trace changed modules' attributes or buffers, which a graph would not do again."""

    def __init__(self, paths: list[str]):
        super().__init__("forward changes the state (attributes or buffers) of "
                         + ", ".join(repr(p) if p else "the module itself" for p in paths))
        self.paths = paths


# attributes torch.fx itself stores on the traced root (tensor constants), and ours
_TRACE_OWN = ("_tensor_constant", "_muppet")


@contextlib.contextmanager
def _side_effects_undone(module: nn.Module):
    """Undoes what a trace changed on the modules: attributes set or rebound (a step counter
    ``self.step += 1``, a stored feature ``self.feat = h``, a cache of proxies), lists and dicts
    filled in place, buffers and parameters rebound (``self.calls += 1``), and real tensors
    written in place (a parametrization's power iteration). torch.fx runs such code once, at
    trace time, and records nothing; a graph would not repeat it, so a trace that did any of
    it raises :class:`StateChanged` naming the modules, whose own code must run."""
    named = list(module.named_modules())
    before = {id(m): dict(m.__dict__) for _, m in named}
    slots = {id(m): (dict(m._buffers), dict(m._parameters)) for _, m in named}  # rebinding a buffer
    buffers = buffer_snapshot(module)
    # lists and dicts changed in place keep their identity: their items are compared
    contents = [(path, v, _items(v)) for path, m in named for k, v in m.__dict__.items()
                if k[0] != "_" and type(v) in (list, dict)]
    changed: list[str] = []
    try:
        yield
    finally:
        for path, v, items in contents:
            now = _items(v)
            if len(now) != len(items) or any(a is not b for a, b in zip(now, items)):
                v.clear()
                v.update(zip(items[::2], items[1::2])) if isinstance(v, dict) else v.extend(items)
                changed.append(path)
        for path, m in named:
            for now, was in zip((m._buffers, m._parameters), slots[id(m)]):
                if now.keys() != was.keys() or any(now[k] is not v for k, v in was.items()):
                    now.clear()
                    now.update(was)
                    changed.append(path)
            old = before[id(m)]
            for name in set(m.__dict__) | set(old):
                if name.startswith(_TRACE_OWN) or old.get(name, _MISSING) is m.__dict__.get(name, _MISSING):
                    continue
                if name in old:
                    m.__dict__[name] = old[name]
                else:
                    del m.__dict__[name]
                changed.append(path)
        changed += restore_buffers(buffers)
    if changed:
        raise StateChanged(list(dict.fromkeys(changed)))


_MISSING = object()


def buffer_snapshot(module: nn.Module) -> list:
    """``(owner path, buffer, version, copy)`` of every buffer below ``module``, for
    :func:`restore_buffers`."""
    return [(path, b, b._version, b.detach().clone()) for path, m in module.named_modules()
            for b in m._buffers.values() if b is not None]


def restore_buffers(snapshot: list) -> list[str]:
    """Writes back the buffers of ``snapshot`` written in place since; returns their owners'
    paths."""
    changed = []
    with torch.no_grad():
        for path, b, version, value in snapshot:
            if b._version != version:
                b.copy_(value)
                changed.append(path)
    return changed


def _items(v: list | dict) -> list:
    """A list's items, or a dict's keys and values alternating."""
    return [x for kv in v.items() for x in kv] if isinstance(v, dict) else list(v)


@contextlib.contextmanager
def _kept_as_code():
    """Calls a graph cannot hold run as the calling module's own code: the trace raises on them,
    which leaves that module untraced (its own forward runs, products intercepted, submodules
    prepared).

    - ``torch.utils.checkpoint``: torch.fx would trace through it into the graph, which then
      stores the activations the checkpoint was there to drop. As code, the checkpoint
      recomputes its prepared submodules in backward (the same stochastic rounding draws, from
      the restored RNG state).
    - a custom ``torch.autograd.Function``: the trace would record its forward's ops and lose
      its backward (a gradient reversal, a straight-through estimator)."""
    impl = getattr(torch.utils.checkpoint, "_checkpoint_impl", None)
    apply = torch.autograd.Function.__dict__["apply"]

    def checkpoint_impl(function, args, kwargs, **options):
        if _holds_proxy(args) or _holds_proxy(kwargs):
            raise RuntimeError("activation checkpointing (torch.utils.checkpoint) runs as the module's own code")
        return impl(function, args, kwargs, **options)

    def function_apply(cls, *args, **kwargs):
        if _holds_proxy(args) or _holds_proxy(kwargs):
            raise RuntimeError(f"the autograd.Function {cls.__name__} runs as the module's own code")
        return apply.__get__(None, cls)(*args, **kwargs)

    if impl is not None:  # another torch layout: traced through as before
        torch.utils.checkpoint._checkpoint_impl = checkpoint_impl
    torch.autograd.Function.apply = classmethod(function_apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = apply
        if impl is not None:
            torch.utils.checkpoint._checkpoint_impl = impl


def hooked_paths(module: nn.Module) -> list[str]:
    """Submodules with forward hooks or pre-hooks (feature extraction, pruning's weight mask):
    a graph must call them as modules, or their hooks would not run."""
    return [name for name, m in module.named_modules() if name and (m._forward_hooks or m._forward_pre_hooks)]


def trace_with_leaves(module: nn.Module, constants: dict[str, Any] | None = None, leaves=()
                      ) -> tuple[fx.Graph | None, list[str], list[str]]:
    """Returns ``(graph or None, opaque submodule paths, reasons)``; ``constants``: arguments
    traced as those values (``concrete_args``), guarded by assertions in the graph; ``leaves``:
    paths called as modules from the start (in the opaque paths returned)."""
    opaque: list[str] = list(leaves)
    reasons: list[str] = []
    while True:
        tracer = MuppetTracer(set(opaque))
        try:
            with _side_effects_undone(module), _kept_as_code():
                graph = tracer.trace(module, concrete_args=constants or None)
            _keep_argument_names(graph, constants or {})
            return graph, opaque, reasons
        except StateChanged as err:  # those modules run their own code
            new = [p for p in err.paths if p not in opaque]
            reasons.append(str(err))
            if "" in err.paths or not new:
                return None, opaque, reasons
            opaque.extend(new)
        except Exception as err:  # any failure: isolate the innermost module that raised
            path = tracer.failed_path
            if not path or path in opaque:
                reasons.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                return None, opaque, reasons
            opaque.append(path)
            reasons.append(f"{path}: {type(err).__name__}")
