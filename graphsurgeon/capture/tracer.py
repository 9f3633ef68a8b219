"""A torch.fx tracer whose proxies carry meta tensors.

Plain ``symbolic_trace`` fails on transformer inference code that reads shapes as Python values
(``B, L, C = x.shape``, ``assert start + seq_len <= table.shape[4]``, ``x.reshape(*x.shape[:-1], -1, 2)``).
Here every node gets an example value, computed on the meta device as the graph is recorded, so shape
reads return plain ints and the graph is specialised to the shapes of one scale (the capture is per
scale). What cannot be decided from shapes (a branch on tensor data, ``.item()``) is refused with the
module it happened in. Autocast regions and item assignment, which ``symbolic_trace`` drops or rejects,
become graph nodes.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx
import torch.fx._symbolic_trace as fx_trace
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast
from torch.fx.node import map_aggregate

from ..errors import GraphsurgeonError
from .interception import ThreadLocalPatcher
from .locks import CAPTURE_LOCK

_NO_VALUE = (_enter_autocast, _exit_autocast)
_META = torch.device("meta")

class CaptureError(GraphsurgeonError):
    """The model cannot be captured as it is; the message names the module and what to do."""


def to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else value.detach().to("meta")
    return value


def _fetch_attribute(root: torch.nn.Module, target: str) -> Any:
    """Read ``a.b.c`` from module dictionaries directly (``getattr`` is patched while tracing)."""
    *path, leaf = target.split(".")
    owner: Any = root
    for part in path:
        owner = owner._modules[part] if isinstance(owner, torch.nn.Module) and part in owner._modules else vars(owner)[part]
    if isinstance(owner, torch.nn.Module):
        for store in (owner._parameters, owner._buffers, owner._modules):
            if leaf in store:
                return store[leaf]
    return vars(owner)[leaf]


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _tensor_attributes(root: torch.nn.Module) -> dict[Any, str]:
    """Constant attributes (tensors, script objects) by value -> qualified name, as fx's ``create_arg`` reads them."""
    found: dict[Any, str] = {}
    for path, module in root.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, fx_trace._constant_attribute_types):
                found[value] = f"{path}.{name}" if path else name
    return found


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (and its submodules) whose parameters and buffers are meta tensors and whose hooks are
    empty: evaluating a leaf on example values runs on the copy, so the model itself, which other threads may be
    running, is never changed, not even for a moment."""
    copied = copy.copy(module)
    state = copied.__dict__
    state["_parameters"] = {name: to_meta(p) for name, p in module._parameters.items()}
    state["_buffers"] = {name: to_meta(b) for name, b in module._buffers.items()}
    state["_modules"] = {name: meta_copy(m) if m is not None else None for name, m in module._modules.items()}
    for name, value in list(state.items()):
        if name.startswith(("_forward_", "_backward_")) and isinstance(value, dict):
            state[name] = type(value)()
    return copied


class ShapeProxy(torch.fx.Proxy):
    """A proxy that answers shape questions from its node's meta value."""

    def _value(self, what: str) -> Any:
        value = self.node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"{what} of {self.node.name}, which is not a tensor ({type(value).__name__})")
        return value

    @property
    def shape(self) -> torch.Size:
        return self._value("shape").shape

    def size(self, dim: Optional[int] = None):
        value = self._value("size()")
        return value.size() if dim is None else value.size(dim)

    def dim(self) -> int:
        return self._value("dim()").dim()

    def numel(self) -> int:
        return self._value("numel()").numel()

    @property
    def ndim(self) -> int:
        return self._value("ndim").ndim

    @property
    def dtype(self) -> torch.dtype:
        return self._value("dtype").dtype

    @property
    def device(self) -> torch.device:
        return self.tracer.device  # the device the graph will run on; example values live on meta

    @property
    def is_cuda(self) -> bool:
        return self.tracer.device.type == "cuda"

    @property
    def requires_grad(self) -> bool:
        return False

    def __len__(self) -> int:
        value = self.node.meta.get("val")
        return value.shape[0] if isinstance(value, torch.Tensor) else len(value)

    def __iter__(self) -> Iterator["ShapeProxy"]:
        return iter([self[i] for i in range(len(self))])

    def __bool__(self) -> bool:
        raise self.tracer.data_dependent(self.node, "a Python branch (bool) on a traced tensor")

    def __int__(self) -> int:
        raise self.tracer.data_dependent(self.node, "int() of a traced tensor")

    def __float__(self) -> float:
        raise self.tracer.data_dependent(self.node, "float() of a traced tensor")

    def __index__(self) -> int:
        raise self.tracer.data_dependent(self.node, "a traced tensor used as a Python index")

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class ShapeTracer(torch.fx.Tracer):
    """Records a graph while computing every node's value on the meta device."""

    def __init__(self, device: torch.device, leaf_types: Sequence[type] = (), leaf_functions: Iterable[Callable] = ()):
        super().__init__(autowrap_functions=tuple(leaf_functions))
        self.device = torch.device(device)
        self.leaf_types = tuple(leaf_types)
        self.placeholder_values: dict[str, Any] = {}
        self._meta_copies: dict[int, torch.nn.Module] = {}
        self._evaluating = False  # while computing a value, module attribute reads must not record nodes
        self._memo: dict[tuple, Any] = {}
        self._parameter_names: dict[int, str] = {}
        self._buffer_names: dict[int, str] = {}
        self._module_signatures: dict[str, tuple] = {}

    # -- proxies and values ---------------------------------------------------------------------------
    def proxy(self, node: torch.fx.Node) -> ShapeProxy:
        return ShapeProxy(node, self)

    def share_memo(self, memo: dict) -> None:
        """Reuse example values computed by another tracer of the same model (e.g. the previous scale)."""
        self._memo = memo

    def trace(self, root: torch.nn.Module, concrete_args: Optional[dict[str, Any]] = None) -> torch.fx.Graph:
        """Record ``root.forward`` as fx does, but intercepting only this thread (:mod:`.interception`): module
        calls, autocast regions and wrapped functions in other threads run as if nothing were traced."""
        with CAPTURE_LOCK:  # the replacements are still process-wide objects: one trace installs them at a time
            self._parameter_names = {id(p): name for name, p in root.named_parameters()}
            self._buffer_names = {id(b): name for name, b in root.named_buffers()}
            self.root, self.root_module_name = root, root._get_name()
            self.submodule_paths = {module: name for name, module in root.named_modules()}
            self.graph = torch.fx.Graph(tracer_cls=type(self))
            self.tensor_attrs = _tensor_attributes(root)
            forward = type(root).forward
            forward_globals = forward.__globals__
            forward, args = self.create_args_for_root(forward, True, concrete_args)
            with ThreadLocalPatcher(condition=lambda: not self._evaluating) as patcher:
                self._install(patcher, forward_globals)
                self.create_node("output", "output", (self.create_arg(forward(*args)),), {})
            self.submodule_paths = None
            return self.graph

    def _install(self, patcher: ThreadLocalPatcher, forward_globals: dict[str, Any]) -> None:
        """What fx replaces while tracing, plus autocast entry and exit recorded as nodes."""
        parameter_proxy_cache: dict[str, torch.fx.Proxy] = {}

        def module_getattr(module: torch.nn.Module, attr: str) -> Any:
            return self.getattr(attr, fx_trace._orig_module_getattr(module, attr), parameter_proxy_cache)

        def module_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                return fx_trace._orig_module_call(module, *args, **kwargs)

            code_globals = getattr(getattr(module, "forward", module), "__globals__", {})
            fx_trace._autowrap_check(patcher, code_globals, self._autowrap_function_ids)
            return self.call_module(module, forward, args, kwargs)

        autocast = torch.amp.autocast_mode.autocast
        enter, leave = autocast.__enter__, autocast.__exit__

        def autocast_enter(region: Any) -> Any:
            enter(region)
            region._graphsurgeon_node = self.create_proxy(
                "call_function", _enter_autocast,
                (region.device, region.fast_dtype, region._enabled, region._cache_enabled), {})
            return region

        def autocast_exit(region: Any, *exc: Any) -> Any:
            entered = region.__dict__.pop("_graphsurgeon_node", None)
            if entered is not None:
                self.create_proxy("call_function", _exit_autocast, (entered,), {})
            return leave(region, *exc)

        patcher.patch_method(torch.nn.Module, "__getattr__", module_getattr, deduplicate=False)
        patcher.patch_method(torch.nn.Module, "__call__", module_call, deduplicate=False)
        patcher.patch_method(autocast, "__enter__", autocast_enter, deduplicate=False)
        patcher.patch_method(autocast, "__exit__", autocast_exit, deduplicate=False)
        fx_trace._patch_wrapped_functions(patcher)
        fx_trace._autowrap_check(patcher, forward_globals, self._autowrap_function_ids)
        for module in self._autowrap_search:
            fx_trace._autowrap_check(patcher, module.__dict__, self._autowrap_function_ids)

    def create_arg(self, a: Any) -> Any:
        """Buffers become ``get_attr`` nodes, found by identity (fx would scan every buffer per use)."""
        if isinstance(a, torch.Tensor) and not isinstance(a, torch.fx.Proxy) and id(a) in self._buffer_names:
            return self.create_node("get_attr", self._buffer_names[id(a)], (), {})
        if type(a).__module__ == "numpy" and hasattr(a, "item") and getattr(a, "ndim", None) == 0:
            return a.item()  # numpy scalars (e.g. a slice bound from np.sum) become Python scalars
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        """Parameters become ``get_attr`` nodes (looked up by identity, not by scanning every parameter)."""
        if self._evaluating or not isinstance(attr_val, torch.nn.Parameter):
            return attr_val
        name = self._parameter_names.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> torch.fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            node.meta["val"] = self.placeholder_values.get(node.target)
        elif kind != "output" and target not in _NO_VALUE:
            node.meta["val"] = self._compute(node)
        return node

    def _value_of(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return arg.meta.get("val")
        if isinstance(arg, torch.device):
            return _META  # example values stay on meta whatever device the graph will run on
        return to_meta(arg)

    def _meta_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with meta parameters and buffers, made once per module (see :func:`meta_copy`)."""
        key = id(module)
        if key not in self._meta_copies:
            self._meta_copies[key] = meta_copy(module)
        return self._meta_copies[key]

    def _compute(self, node: torch.fx.Node) -> Any:
        """The node's example value; identical ops on identical shapes (every block alike) are computed once."""
        if node.op == "get_attr":
            return to_meta(_fetch_attribute(self.root, node.target))
        key = self._signature(node)
        if key is not None and key in self._memo:
            return self._memo[key]
        value = self._evaluate(node)
        if key is not None:
            self._memo[key] = value
        return value

    def _signature(self, node: torch.fx.Node) -> Optional[tuple]:
        def describe(arg: Any) -> Any:
            if isinstance(arg, torch.fx.Node):
                value = arg.meta.get("val")
                if isinstance(value, torch.Tensor):
                    return ("T", tuple(value.shape), value.stride(), value.dtype)
                return ("V", describe(value)) if isinstance(value, (int, float, bool, str, type(None))) else ("N", id(arg))
            if isinstance(arg, (list, tuple)):
                return (type(arg).__name__, tuple(describe(a) for a in arg))
            if isinstance(arg, dict):
                return ("dict", tuple((k, describe(v)) for k, v in arg.items()))
            if isinstance(arg, slice):
                return ("slice", describe(arg.start), describe(arg.stop), describe(arg.step))
            if isinstance(arg, torch.Tensor):
                return ("C", id(arg))
            if isinstance(arg, (int, float, bool, str, type(None), torch.dtype, torch.device, type(Ellipsis))):
                return arg
            return ("O", id(arg))

        if node.op == "call_module":
            owner: Any = self._module_signature(node.target)
        elif node.op in ("call_function", "call_method"):
            owner = node.target
        else:
            return None
        return (node.op, owner, describe(node.args), describe(node.kwargs))

    def _module_signature(self, target: str) -> tuple:
        """What a leaf module's output depends on besides its inputs: class, parameter shapes, settings."""
        if target not in self._module_signatures:
            module = self.root.get_submodule(target)
            self._module_signatures[target] = (
                type(module), tuple((n, tuple(t.shape), t.dtype) for n, t in _named_tensors(self._meta_copy(module))),
                tuple(sorted((k, v) for k, v in vars(module).items() if isinstance(v, (int, float, bool, str)))))
        return self._module_signatures[target]

    def _evaluate(self, node: torch.fx.Node) -> Any:
        args = map_aggregate(node.args, self._value_of)
        kwargs = map_aggregate(node.kwargs, self._value_of)
        if "device" in kwargs:
            kwargs["device"] = _META
        if node.op == "call_method" and node.target in ("to", "cuda", "cpu"):
            args = [a for a in args if not isinstance(a, (str, torch.device)) or a in ("meta", _META)]
            if node.target != "to":
                return args[0]
        try:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                module = self._meta_copy(self.root.get_submodule(node.target))
                self._evaluating = True
                try:
                    return module.forward(*args, **kwargs)  # no hooks: user hooks never see example values
                finally:
                    self._evaluating = False
        except CaptureError:
            raise
        except Exception as err:
            raise CaptureError(
                f"capture: cannot evaluate {node.format_node()} in {self.where()} on example shapes: "
                f"{type(err).__name__}: {err}. If it reads tensor data, declare the module or function a leaf."
            ) from None
        return None

    # -- context ------------------------------------------------------------------------------------
    def where(self) -> str:
        if not self.module_stack:
            return "the step function"
        path, (qualname, module_type) = next(reversed(self.module_stack.items()))
        name = getattr(module_type, "__qualname__", str(module_type))
        return f"module '{qualname}' ({name})"

    def data_dependent(self, node: torch.fx.Node, what: str) -> CaptureError:
        return CaptureError(
            f"capture: {what} in {self.where()} (value {node.name}): the branch would be frozen at trace "
            "time. Express it with tensor ops, or declare the module a leaf in the adapter."
        )
