"""``prepare(model)``: the compiler entry point (SPEC sections 2 and 4).

The prepared model is a shallow copy of the user's model whose class is a subclass of the
original (``isinstance`` still holds, methods and attributes still work) with one of these
forwards:
- traced modules run the rewritten FX graph at fixed-point levels;
- modules whose own code cannot be traced run their own Python forward under a
  ``TorchFunctionMode`` that routes the conv/linear/matmul calls *their code* makes to the
  quantised ops, with their children prepared recursively;
- at ``"fp32"`` every module runs the original forward: outputs are bit-identical.
Parameters and buffers are the original tensors (same objects), so any optimiser built on
``pm.parameters()`` updates the FP32 master copy, and ``state_dict`` keys are unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from muppet_fx.attention import AttentionSites, mha_unsupported_reason, quant_mha
from muppet_fx.config import MuppetConfig
from muppet_fx.intercept import InterceptMode, OutsideIntercepts
from muppet_fx.ops import quant_conv, quant_conv_transpose_module, quant_linear
from muppet_fx.passes.compact_saved import compact_saved_tensors
from muppet_fx.passes.quantise_layers import FP32_MODULES, RewriteContext, insert_quant_nodes
from muppet_fx.passes.runner import run_passes
from muppet_fx.passes.trace import (GIVEN, TRANSPOSED_CONVS, buffer_snapshot, call_pattern, pattern_constants,
                                    restore_buffers, specialisable_arguments, stock_layer, trace_with_leaves,
                                    hooked_paths)
from muppet_fx.state import PrecisionState

__all__ = ["prepare", "PreparedModule"]

class PreparedModule:
    """Mixin of every prepared module: the precision API, shared through one state object."""

    _muppet_state: PrecisionState

    @property
    def precision(self):
        """The current level of the ladder (an int word length or ``"fp32"``)."""
        return self._muppet_state.level

    @property
    def ladder(self) -> tuple:
        return self._muppet_state.config.ladder

    def set_precision(self, level) -> None:
        """Switch to ``level`` (must be in the ladder). Graphs are built once; no retrace."""
        self._muppet_state.set_level(level)

    def summary(self) -> str:
        """Table of quantised layers (route, word length, last exponents) and FP32 layers."""
        st = self._muppet_state
        bits = "fp32" if not st.quantised else f"{st.fwd_bits}/{st.bwd_bits}"
        exp = (lambda t: "-" if t is None else (int(t) if t.numel() == 1 else f"per-channel[{t.numel()}]"))
        param = next(iter(self.parameters()), None)
        route = st.route_for(param.device if param is not None else torch.device("cpu"))
        rows = [[s.name, s.op, route, bits, exp(s.w_exp), exp(s.x_exp), s.calls]
                for s in st.sites.values()]
        rows += [[f.name, f.op, "fp32", "fp32", "-", "-", f.reason] for f in st.fp32_layers.values()]
        rows += [[path, "(own code)", "intercepted", "-", "-", "-", why] for path, why in st.opaque.items()]
        table = tabulate(rows, headers=["layer", "op", "route", "bits fwd/bwd", "weight exp",
                                        "act exp", "calls / reason"])
        return table + _route_remark(route)

    def __reduce_ex__(self, protocol):
        """Pickles (``torch.save(pm)``) as the original class and mixin: the prepared classes
        are made per model class, so pickle could not find them by name. Graphs and their code
        are left out (their nodes may hold functions pickle cannot name): a loaded model
        traces its original again at its first call."""
        mixin, base = type(self).__bases__
        skip = ("_muppet_graph", "_muppet_code", "_muppet_variants", "_muppet_flagged")
        return _unpickle_prepared, (base, mixin), {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state):
        super().__setstate__(state)
        _start_without_graphs(self)

    def __deepcopy__(self, memo):
        """As ``copy.deepcopy`` does for other modules, the graph code shared (it reaches its
        module through ``self``)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __setattr__(self, name, value):
        """A submodule replaced on the prepared model is replaced in the model it was prepared
        from as well (whose code its graphs are traced from, and which shares the other
        submodules): the next call at a fixed-point level traces a graph with it."""
        original = self.__dict__.get("_muppet_original")
        if original is not None and isinstance(value, nn.Module) and name in original._modules:
            setattr(original, name, value)
        super().__setattr__(name, value)

    def __prepare_scriptable__(self):
        raise NotImplementedError(
            f"torch.jit.script cannot compile the prepared {type(self).__bases__[1].__name__}: its "
            "layers call the quantised kernels from Python. Use torch.compile(model) or "
            "torch.export.export(model, args); for TorchScript deployment script the original model, "
            "which shares the trained weights")

    def _muppet_own_code(self, *args, **kwargs):
        """The module's own forward, its products intercepted (an untraceable module, or a call
        pattern without a graph)."""
        with InterceptMode(self):
            return super().forward(*args, **kwargs)

    def _muppet_run(self, fn, args, kwargs):
        if torch.jit.is_tracing():  # a trace would freeze the level and the rounding seeds
            raise NotImplementedError(
                f"torch.jit.trace cannot record the prepared model at the {self.precision!r}-bit level: "
                "the trace would freeze the level and the stochastic rounding seeds. Trace it at the "
                "'fp32' level (set_precision('fp32')), or use torch.compile / torch.export")
        stack = self._muppet_state.stack
        if not stack and self.training and torch.is_grad_enabled():
            self._muppet_state.stepped_gradients = {}  # a new step: the manager's are stale
        stack.append(self)
        try:
            with OutsideIntercepts():  # enclosing intercepted modules take nothing from here
                return fn(*args, **kwargs)
        finally:
            stack.pop()


class _GraphForward(PreparedModule):
    def forward(self, *args, **kwargs):
        if not self._muppet_state.quantised:
            return super().forward(*args, **kwargs)
        # a graph keeps the branches its trace took on ``training`` flags (dropout, stochastic
        # depth, auxiliary heads) and on arguments steering control flow: this call's graph
        key = _modes(self), (call_pattern(self._muppet_options, args, kwargs) if self._muppet_options else ())
        code = self._muppet_variants.get(key) or _variant(self, key)
        return self._muppet_run(code, (self, *args), kwargs)


class _InterceptForward(PreparedModule):
    def forward(self, *args, **kwargs):
        if not self._muppet_state.quantised:
            return super().forward(*args, **kwargs)
        return self._muppet_run(self._muppet_own_code, args, kwargs)


class _PassThroughForward(PreparedModule):
    """A module kept FP32 (or without quantisable code) below intercepted code."""

    def forward(self, *args, **kwargs):
        if not self._muppet_state.quantised:
            return super().forward(*args, **kwargs)
        return self._muppet_run(super().forward, args, kwargs)


class _LayerForward(PreparedModule):
    """A conv/linear module prepared on its own (a child of untraceable code, or the root)."""

    def forward(self, input, output_size=None):
        if not self._muppet_state.quantised:
            return super().forward(input) if output_size is None else super().forward(input, output_size)
        site = self._muppet_layer_site
        if isinstance(self, TRANSPOSED_CONVS):
            return self._muppet_run(quant_conv_transpose_module, (site, self, input, output_size), {})
        if isinstance(self, nn.Linear):
            return self._muppet_run(quant_linear, (site, input, self.weight, self.bias), {})
        if self.padding_mode != "zeros":
            input, padding = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        else:
            padding = self.padding
        args = (site, input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return self._muppet_run(quant_conv, args, {})


class _AttentionForward(PreparedModule):
    def forward(self, *args, **kwargs):
        if not self._muppet_state.quantised:
            return super().forward(*args, **kwargs)
        return self._muppet_run(quant_mha, (self._muppet_sites_mha, self, *args), kwargs)


_CLASSES: dict[tuple[type, type], type] = {}


def _prepared_class(base: type, mixin: type) -> type:
    if issubclass(base, PreparedModule):
        raise TypeError(f"{base.__name__} is already prepared; prepare the original model instead")
    key = (base, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Muppet{base.__name__}", (mixin, base), {"__module__": __name__})
    return _CLASSES[key]


def _unpickle_prepared(base: type, mixin: type) -> nn.Module:
    return _prepared_class(base, mixin).__new__(_prepared_class(base, mixin))


def _start_without_graphs(pm: nn.Module) -> None:
    """After unpickling: no graphs yet (each is traced again at its first use)."""
    if "_muppet_original" in pm.__dict__ and "_muppet_variants" not in pm.__dict__:
        pm.__dict__["_muppet_variants"] = {}


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing parameters, buffers and children, with its own containers."""
    new = type(module).__new__(type(module))
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v)
                         for k, v in module.__dict__.items()})
    return new


def _replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Set ``root.<path> = new``, shallow-copying the modules on the way so the user's model
    is never modified."""
    *parents, last = path.split(".")
    owner = root
    for name in parents:
        child = _shallow_copy(owner._modules[name])
        owner._modules[name] = child
        owner = child
    owner._modules[last] = new


def _finish(module: nn.Module, mixin: type, path: str, state: PrecisionState, sites) -> nn.Module:
    new = module if isinstance(module, PreparedModule) else _shallow_copy(module)
    new.__class__ = _prepared_class(type(module), mixin)
    new.__dict__.update(_muppet_state=state, _muppet_path=path, _muppet_sites=sites)
    return new


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _keep(state: PrecisionState):
    """The config's ``module_filter_fn``, or one that keeps every module."""
    return state.config.module_filter_fn or (lambda m, fqn: True)


def _prepare(module: nn.Module, path: str, state: PrecisionState, sites) -> nn.Module:
    keep = _keep(state)
    if path and not keep(module, path):
        state.keep_fp32(path, type(module).__name__, "excluded by module_filter_fn")
        return _finish(module, _PassThroughForward, path, state, sites)
    if stock_layer(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_CONVS)):
        new = _finish(module, _LayerForward, path, state, sites)
        kind = "conv_transpose" if isinstance(module, TRANSPOSED_CONVS) else "conv"
        op = "linear" if isinstance(module, nn.Linear) else f"{kind}{module.weight.dim() - 2}d"
        axis = 0 if state.config.weight_granularity == "channel" else None
        new.__dict__["_muppet_layer_site"] = state.site(path or type(module).__name__, op, axis, module.weight)
        return new
    fp32_reason = next((r for t, r in FP32_MODULES.items() if isinstance(module, t)), None)
    if isinstance(module, nn.MultiheadAttention):
        fp32_reason = mha_unsupported_reason(module)
        if fp32_reason is None:
            new = _finish(module, _AttentionForward, path, state, sites)
            new.__dict__["_muppet_sites_mha"] = AttentionSites(state, path + ".", "matmul", module)
            return new
    if fp32_reason is not None:
        state.keep_fp32(path or type(module).__name__, type(module).__name__, fp32_reason)
        return _finish(module, _PassThroughForward, path, state, sites)

    options = specialisable_arguments(module)
    # the first graph: every argument at its default, else optional tensors given; any other
    # call pattern gets its graph on first use
    defaults = tuple((type(o.default), o.default) for o in options)
    for pattern in dict.fromkeys([defaults, tuple((GIVEN, None) if o.default is None else d
                                                  for o, d in zip(options, defaults))]):
        graph, opaque, reasons = trace_with_leaves(module, pattern_constants(options, pattern), hooked_paths(module))
        if graph is not None:
            break
    if graph is None:  # its own code is not traceable: intercept it, prepare its children
        state.opaque[path or type(module).__name__] = "; ".join(reasons)
        new = _shallow_copy(module)
        for name, child in module.named_children():
            new._modules[name] = _prepare(child, _join(path, name), state, sites)
        return _finish(new, _InterceptForward, path, state, sites)

    new = _shallow_copy(module)
    graph, code = _rewrite(module, new, path, state, sites, graph, opaque)
    new.__dict__.update(_muppet_graph=graph, _muppet_code=code, _muppet_original=module, _muppet_options=options)
    new = _finish(new, _GraphForward, path, state, sites)
    key = (_modes(new), pattern if options else ())
    new.__dict__["_muppet_variants"] = {key: code}
    return new


_SCALARS = (bool, int, float, str, type(None))


def _settings(m: nn.Module) -> tuple:
    """The public scalar attributes of ``m`` (a temperature, a drop rate, a branch switch)."""
    return tuple((k, v) for k, v in m.__dict__.items() if k[0] != "_" and k != "training" and type(v) in _SCALARS)


def _settings_reader(modules: list[nn.Module]):
    """A function returning the current values of the modules' scalar attributes (those they
    have now; one C-level lookup per module, as it runs on every call)."""
    readers = [(m.__dict__, names, operator.itemgetter(*names)) for m in modules
               if (names := tuple(k for k, _ in _settings(m)))]

    def read() -> tuple:
        if torch.compiler.is_compiling():  # the same values; Dynamo cannot trace an itemgetter
            return tuple([d[names[0]] if len(names) == 1 else tuple([d[k] for k in names]) for d, names, _ in readers])
        return tuple(get(d) for d, _, get in readers)
    return read


def _inlined(pm: nn.Module) -> list[nn.Module]:
    """``pm`` and the modules below it whose code a graph of ``pm`` may inline (not torch.nn's
    own, which run as called modules, nor prepared ones, which key their own graphs)."""
    found, stack = [pm], list(pm.children())
    while stack:
        m = stack.pop()
        if isinstance(m, PreparedModule):
            continue
        if not type(m).__module__.startswith("torch.nn"):
            found.append(m)
        stack.extend(m.children())
    return found


def _modes(pm: nn.Module) -> tuple:
    """The ``training`` flags of ``pm`` and of every module below it (a trace may read any of
    them: the code of a child that runs on its own in one mode may be traceable, and inlined,
    in another), whether each submodule has forward hooks, and the scalar attributes a graph
    may have read as constants (a graph traced with ``temperature = 1.0`` would keep it)."""
    cached = pm.__dict__.get("_muppet_flagged")
    if cached is None:
        modules = list(pm.modules())
        cached = pm.__dict__["_muppet_flagged"] = (modules, _settings_reader(_inlined(pm)),
                                                   [m._modules for m in modules if m._modules])
    modules, settings, containers = cached
    try:
        values = settings()
    except KeyError:  # an attribute deleted since: read them afresh
        del pm.__dict__["_muppet_flagged"]
        return _modes(pm)
    # a hooked submodule is called as a module (hooked_paths); a replaced one needs a new graph
    return (tuple(m.training for m in modules) + tuple(bool(m._forward_hooks or m._forward_pre_hooks)
                                                       for m in modules[1:]) + values
            + tuple(tuple(d.values()) for d in containers))


@contextlib.contextmanager
def _modes_of(pm: nn.Module, module: nn.Module):
    """``module`` (the original of ``pm``) with each submodule's ``training`` flag set to that
    of its counterpart in ``pm``, and its own scalar attributes to ``pm``'s (children are
    shared), for the length of a trace."""
    saved = [(m, m.training) for m in module.modules()]
    own = dict(_settings(module))
    try:
        for name, m in module.named_modules():
            try:
                m.training = pm.get_submodule(name).training
            except AttributeError:  # not in pm's tree: keeps its own
                pass
        module.__dict__.update(_settings(pm))
        yield
    finally:
        for m, flag in saved:
            m.training = flag
        module.__dict__.update(own)


def _rewrite(module: nn.Module, new: nn.Module, path: str, state: PrecisionState, sites, graph, opaque):
    """Prepares the opaque submodules of ``graph`` (a trace of ``module``) inside ``new``, rewrites
    the graph and compiles it: ``(graph, forward)``."""
    for sub in opaque:
        if not isinstance(new.get_submodule(sub), PreparedModule):  # another pattern's graph did
            _replace_submodule(new, sub, _prepare(module.get_submodule(sub), _join(path, sub), state, sites))
    ctx = RewriteContext(graph, dict(module.named_modules()), state, path + "." if path else "", sites, _keep(state),
                         frozenset(opaque))
    owner = path or type(module).__name__
    graph = run_passes(graph, [lambda g: insert_quant_nodes(g, ctx), lambda g: compact_saved_tensors(g, ctx)],
                       owner=owner)
    return graph, _compile_graph(graph, owner)


MAX_PATTERNS = 8  # graphs per module; further call patterns (say, an int that changes every call) run its own code


def _variant(pm: nn.Module, key: tuple):
    """The forward for a (training flags, call pattern) key met for the first time: a graph
    traced for it, or the module's own code under interception where that code cannot be
    traced."""
    variants, own_code = pm._muppet_variants, type(pm)._muppet_own_code
    if len(variants) >= MAX_PATTERNS:
        return own_code
    module, state = pm._muppet_original, pm._muppet_state
    constants = pattern_constants(pm._muppet_options, key[1]) if pm._muppet_options else {}
    with _modes_of(pm, module), OutsideIntercepts():  # met inside intercepted code: trace outside it
        graph, opaque, reasons = trace_with_leaves(module, constants, hooked_paths(pm))
    if graph is None:  # reported in the summary, as untraceable modules are
        when = f"calls with {constants}" if constants else ("training" if key[0][0] else "eval") + " mode"
        state.opaque.setdefault(pm._muppet_path or type(module).__name__, f"own code for {when}: " + "; ".join(reasons))
        variants[key] = own_code
    else:
        for node in graph.nodes:  # constants the trace stored on the original (_tensor_constant<i>)
            if node.op == "get_attr" and "." not in node.target and node.target not in pm.__dict__ \
                    and node.target in module.__dict__:
                pm.__dict__[node.target] = module.__dict__[node.target]
        graph, variants[key] = _rewrite(module, pm, pm._muppet_path, state, pm._muppet_sites, graph, opaque)
        pm.__dict__.setdefault("_muppet_graph", graph)  # the first one (after unpickling)
        pm.__dict__.setdefault("_muppet_code", variants[key])
        pm.__dict__.pop("_muppet_flagged", None)  # it may have prepared children for this graph
        variants[_modes(pm), key[1]] = variants[key]
    return variants[key]


def _compile_graph(graph, owner: str):
    """The graph's Python forward ``fn(self, *inputs)``; it reaches modules, parameters and
    sites through ``self``, so copies of the module can share it."""
    src = graph.python_code(root_module="self")
    scope = dict(src.globals)
    exec(compile(src.src, f"<muppet_fx graph {owner}>", "exec"), scope)
    return scope["forward"]


def prepare(model: nn.Module, example_inputs=None, config: MuppetConfig | None = None,
            **overrides) -> nn.Module:
    """Make ``model`` train on the MuPPET precision ladder.

    Args:
        model: any ``nn.Module``; it is not modified, and the result shares its parameters.
        example_inputs: optional tuple of inputs; if given, one forward pass at the first level
            checks that the prepared model runs and registers the layers of untraceable code
            (so that ``torch.compile`` compiles it once). The pass changes no buffer and draws
            from no random stream of the caller's.
        config: a :class:`MuppetConfig`; ``overrides`` replace its fields (unknown names raise).

    Returns:
        The prepared module, called like ``model``, with ``.precision``, ``.set_precision(level)``
        and ``.summary()``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> pm = prepare(net, ladder=(8, 16, "fp32"))
        >>> pm(torch.randn(3, 4)).shape, pm.precision
        (torch.Size([3, 2]), 8)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, PreparedModule):
        raise TypeError(f"{type(model).__name__} is already prepared; prepare the original model instead")
    inner = next((name for name, m in model.named_modules() if isinstance(m, PreparedModule)), None)
    if inner is not None:  # its own precision state would not follow this model's levels
        raise ValueError(f"submodule {inner!r} is already prepared; prepare the whole model from its "
                         "original modules (muppet_fx.prepare returns a copy; the original is unchanged)")
    config = MuppetConfig.build(config, **overrides)
    state = PrecisionState(config)
    buffers = buffer_snapshot(model)
    pm = _prepare(model, "", state, types.SimpleNamespace())
    restore_buffers(buffers)  # what preparing ran on them (a spectral norm's power iteration) is undone
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # random streams untouched
            pm(*args)
            for _, b, _, value in buffers:  # running statistics as they were (the batch-norm
                b.copy_(value)              # kernels update them without a version bump)
    return pm


def _route_remark(route: str) -> str:
    """What the ``aten`` route computes on CPUs without int8 dot products, and why."""
    from muppet_fx.kernels import gemm_cpu

    if route.startswith("aten") and not gemm_cpu.fast_int8():
        how = "on the mantissas as floats (exact)" if route == "aten_exact" else \
            "in FP32 on the dequantised operands (as emulate), at about FP32's speed"
        if not gemm_cpu.integer_products_fast(8):
            return ("\nThis CPU has no int8 dot-product instructions (VNNI, AMX), so torch._int_mm would run "
                    f"30-50x slower than FP32; the route computes the quantised products {how}.")
        if route == "aten_exact":
            return ("\nThis CPU has no int8 dot-product instructions (VNNI, AMX): products up to 12 bits run on "
                    "the AVX2 integer kernel, 13-16 bit ones on the mantissas as floats (exact).")
        return ("\nThis CPU has no int8 dot-product instructions (VNNI, AMX): 8-bit products run on the "
                "AVX2 integer kernel (exact), 9-16 bit ones, whose integer products cost as much as FP32's "
                f"or more here, {how}.")
    return ""
