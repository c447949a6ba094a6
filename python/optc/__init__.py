"""optc: optimizer update rules compiled to fused kernels.

Any rule — from the standard library, a file, or a string — becomes a drop-in
``torch.optim.Optimizer`` that updates the tensors torch owns, in place::

    import torch, optc
    model = torch.nn.Linear(10, 1)
    opt = optc.Optimizer(model.parameters(), "adamw", lr=1e-3, weight_decay=0.01)
    loss = model(torch.randn(4, 10)).pow(2).mean()
    loss.backward()
    opt.step()

``optc.compile(source)`` checks and compiles a rule on its own; ``optc.ArrayOptimizer`` runs a
rule over NumPy arrays. Errors are the exceptions of ``optc._errors`` (``RuleError``,
``ConfigError``, ``CheckpointError``, ``NonFiniteError``, ``EngineError``); a call that fails
changes no parameter and no state.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import _optc
from ._errors import (CheckpointError, ConfigError, Diagnostic, EngineError, NonFiniteError,
                      OptcError, RuleError)

__version__ = _optc.__version__

__all__ = [
    "Rule", "compile", "compile_all", "rule", "stdlib_names", "stdlib_source", "Optimizer",
    "ArrayOptimizer", "OptcError", "RuleError", "ConfigError", "CheckpointError",
    "NonFiniteError", "EngineError", "Diagnostic",
]

#: A compiled rule (see :func:`compile`): ``name``, ``doc``, ``hypers``, ``spaces``,
#: ``buffers``, ``scalar_inputs``, ``scalar_outs``, ``stages``, ``axis``.
Rule = _optc.Rule


def compile_all(source: str, file: str = "<rule>") -> List[Rule]:
    """Compiles rule source and returns every rule it defines; raises :class:`RuleError` with
    the rendered report when it does not compile."""
    return _optc.compile(source, file)


def compile(source: str, file: str = "<rule>") -> Rule:
    """Compiles rule source holding exactly one rule. Raises :class:`RuleError` (with the
    rendered report, the first error's ``code`` and byte ``span``) when it does not compile."""
    rules = _optc.compile(source, file)
    if len(rules) != 1:
        raise ConfigError(f"{file}: expected one rule, found {len(rules)} "
                          f"({', '.join(r.name for r in rules)}); use compile_all")
    return rules[0]


def stdlib_names() -> List[str]:
    """The names of the standard library's rules."""
    return list(_optc.stdlib_names())


def stdlib_source(name: str) -> str:
    """The source of a standard-library rule."""
    src = _optc.stdlib_source(name)
    if src is None:
        raise ConfigError(f"no standard-library rule `{name}` (there are: {', '.join(stdlib_names())})")
    return src


def rule(spec: Union[str, "os.PathLike[str]", Rule]) -> Rule:
    """A rule from a standard-library name, a path to a ``.opt`` file, rule source text, or a
    compiled :class:`Rule` (returned as it is)."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, os.PathLike):
        path = os.fspath(spec)
        with open(path, encoding="utf-8") as f:
            return compile(f.read(), path)
    if not isinstance(spec, str):
        raise ConfigError(f"a rule is a name, a path or source text, not {type(spec).__name__}")
    if "{" in spec:
        return compile(spec)
    if _optc.stdlib_source(spec) is not None:
        return compile(_optc.stdlib_source(spec), f"stdlib/rules/{spec}.opt")
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return compile(f.read(), spec)
    raise ConfigError(f"`{spec}` is neither a standard-library rule ({', '.join(stdlib_names())}), "
                      "a file, nor rule source")


# --- hyperparameters ---------------------------------------------------------------------------

_BETAS = ("beta1", "beta2", "beta3")

#: The reference implementations' names for hyperparameters a standard-library rule names
#: otherwise (rule -> reference name -> optc name), accepted as aliases.
_ALIASES = {
    "adan": {"weight_decouple": "no_prox"},  # pytorch_optimizer.Adan
}

#: Keys a parameter group may hold besides the rule's hyperparameters.
_GROUP_KEYS = {"params", "space", "name", "initial_lr"}


def _hyper_names(r: Rule) -> List[str]:
    return [h[0] for h in r.hypers]


def _normalize(r: Rule, values: Dict[str, Any], where: str, strict: bool = True) -> Dict[str, Any]:
    """Hyperparameter values with torch's ``betas=(b1, b2[, b3])`` split into beta1.. and
    unknown names refused (``strict``)."""
    names = _hyper_names(r)
    out = dict(values)
    for alias, name in _ALIASES.get(r.name, {}).items():
        if alias in out and alias not in names:
            if name in out:
                raise ConfigError(f"{where}: `{alias}` and `{name}` are the same hyperparameter of `{r.name}`")
            out[name] = out.pop(alias)
    if "betas" in out:
        betas = tuple(out.pop("betas"))
        wanted = [b for b in _BETAS if b in names]
        if not wanted or len(betas) > len(wanted):
            raise ConfigError(f"{where}: rule `{r.name}` takes {len(wanted)} betas "
                              f"({', '.join(wanted) or 'none'}), got betas={betas!r}")
        for k, v in zip(wanted, betas):
            out[k] = v
    if strict:
        unknown = [k for k in out if k not in names and k not in _GROUP_KEYS]
        if unknown:
            raise ConfigError(f"{where}: rule `{r.name}` has no hyperparameter "
                              f"{', '.join(f'`{k}`' for k in unknown)} (it has: {', '.join(names)})")
    return out


def _number(name: str, v: Any) -> float:
    try:
        if hasattr(v, "item"):
            v = v.item()
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"hyperparameter `{name}` must be a number or a boolean, not {v!r}") from None


# --- tensors -----------------------------------------------------------------------------------

class _Tensors:
    """What the binding needs of one kind of array: torch tensors or NumPy arrays."""

    def dtype(self, t) -> str: ...
    def addr(self, t) -> int: ...
    def numel(self, t) -> int: ...
    def shape(self, t) -> Tuple[int, ...]: ...
    def contiguous(self, t) -> bool: ...
    def device(self, t) -> str: ...
    def is_tensor(self, t) -> bool: ...

    def fast_addrs(self, items, attr: Optional[str], dtype: str, device: str,
                   shapes: List[Tuple[int, ...]]) -> Optional[List[int]]:
        """The addresses of `items` (of `item.<attr>`), when every one is present and of this
        dtype, device and shape and contiguous; None to take the checks that say what is wrong."""
        return None


class _Binding:
    """A rule bound to the host's parameter tensors through a session: resolves inputs (the
    gradient among them), checks every tensor, and runs steps and stages."""

    def __init__(self, r: Rule, spaces: List[List[Any]], kind: _Tensors, *, engine: str,
                 threads: Optional[int], seed: Optional[int], non_finite: str,
                 master_weights: bool = False, bf16_state: bool = False,
                 stochastic_rounding: bool = False):
        self.rule = r
        self.kind = kind
        self.spaces = spaces
        tensors = [p for ps in spaces for p in ps]
        dtypes = {kind.dtype(p) for p in tensors}
        if len(dtypes) > 1:
            raise ConfigError(f"the parameters have different dtypes ({', '.join(sorted(dtypes))}): "
                              "one optimizer steps one dtype; make one optimizer per dtype")
        self.dtype = dtypes.pop() if dtypes else "float32"
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ConfigError(f"parameters of dtype {self.dtype} are not supported "
                              "(float32, float64, bfloat16, float16)")
        devices = {kind.device(p) for p in tensors}
        if len(devices) > 1:
            raise ConfigError(f"the parameters are on different devices ({', '.join(sorted(devices))})")
        self.device = devices.pop() if devices else "cpu"
        if self.device.startswith("cuda"):
            if engine in ("auto", "cuda"):
                index = self.device.split(":")[1] if ":" in self.device else "0"
                engine = f"cuda:{index}"
            elif not engine.startswith("cuda"):
                raise ConfigError(f"engine `{engine}` runs on the CPU; the parameters are on {self.device}")
        elif self.device != "cpu":
            raise ConfigError(f"parameters on {self.device} are not supported (cpu, cuda)")
        # Device addresses go through the CUDA engine's step_device: on a GPU, or on the CUDA
        # emulator, whose device memory is the host's (the same code path, testable anywhere).
        self.device_path = self.device.startswith("cuda") or engine == "cuda-emulator"
        for i, p in enumerate(tensors):
            self._check_param(i, p)
        self.shapes = [[tuple(kind.shape(p)) for p in ps] for ps in spaces]
        self.numels = [[kind.numel(p) for p in ps] for ps in spaces]
        names: List[List[Tuple[str, List[int]]]] = []
        k = 0
        for ps in spaces:
            row = []
            for p in ps:
                row.append((str(k), list(kind.shape(p))))
                k += 1
            names.append(row)
        self.names = names
        if threads is None:
            threads = _default_threads()
        self.session = _optc.Session(r, self.dtype, names, engine=engine, threads=threads,
                                     master_weights=master_weights, bf16_state=bf16_state,
                                     stochastic_rounding=stochastic_rounding, seed=seed,
                                     non_finite=non_finite)
        info = r.buffers
        self.inputs = [(n, space, per_sample) for n, role, space, per_sample in info if role == "input"]
        self.scalar_inputs = dict(r.scalar_inputs)
        self.stage_names = list(r.stages)

    def _check_param(self, i: int, p) -> None:
        k = self.kind
        if not k.contiguous(p):
            raise ConfigError(f"parameter {i} (shape {tuple(k.shape(p))}) is not contiguous: "
                              "optc updates parameters in place and needs them dense")
        if k.dtype(p) != getattr(self, "dtype", k.dtype(p)):
            raise ConfigError(f"parameter {i} changed dtype to {k.dtype(p)} (was {self.dtype})")

    def param_addrs(self) -> List[List[int]]:
        k = self.kind
        fast = [k.fast_addrs(ps, None, self.dtype, self.device, shapes)
                for ps, shapes in zip(self.spaces, self.shapes)]
        if all(a is not None for a in fast):
            return fast
        out = []
        i = 0
        for ps, numels in zip(self.spaces, self.numels):
            row = []
            for p, n in zip(ps, numels):
                if k.numel(p) != n or k.dtype(p) != self.dtype or not k.contiguous(p) \
                        or k.device(p) != self.device:
                    raise ConfigError(
                        f"parameter {i} changed since the optimizer was made (now {k.dtype(p)} "
                        f"{tuple(k.shape(p))} on {k.device(p)}, contiguous={k.contiguous(p)}; "
                        f"was {self.dtype} {self.shapes[self._space_of(i)][self._index_of(i)]})")
                row.append(k.addr(p))
                i += 1
            out.append(row)
        return out

    def _space_of(self, i: int) -> int:
        for s, ps in enumerate(self.spaces):
            if i < len(ps):
                return s
            i -= len(ps)
        return 0

    def _index_of(self, i: int) -> int:
        for ps in self.spaces:
            if i < len(ps):
                return i
            i -= len(ps)
        return 0

    def _input_tensors(self, name: str, space: int, per_sample: bool, given) -> Tuple[List[Any], Optional[int]]:
        """The tensors of per-element input `name`, checked; and the number of samples they hold."""
        k = self.kind
        ps = self.spaces[space]
        if k.is_tensor(given):
            given = [given]
        given = list(given)
        if len(given) != len(ps):
            raise ConfigError(f"input `{name}`: expected {len(ps)} tensors (one per tensor of "
                              f"`{self.rule.spaces[space]}`), got {len(given)}")
        samples = None
        for j, (t, shape) in enumerate(zip(given, self.shapes[space])):
            if not k.is_tensor(t):
                raise ConfigError(f"input `{name}`[{j}] is a {type(t).__name__}, not a tensor")
            if k.device(t) != self.device:
                raise ConfigError(f"input `{name}`[{j}] is on {k.device(t)}; the parameters are on {self.device}")
            if k.dtype(t) != self.dtype:
                raise ConfigError(f"input `{name}`[{j}] is {k.dtype(t)}; the parameters are {self.dtype}")
            if not k.contiguous(t):
                raise ConfigError(f"input `{name}`[{j}] is not contiguous")
            got = tuple(k.shape(t))
            if per_sample:
                if got[1:] != shape:
                    raise ConfigError(f"input `{name}`[{j}] has shape {got}; a per-sample input of "
                                      f"a tensor of shape {shape} has shape (samples, *{shape})")
                if samples is not None and got[0] != samples:
                    raise ConfigError(f"input `{name}`: tensors hold different numbers of samples "
                                      f"({samples} and {got[0]})")
                samples = got[0]
            elif got != shape and k.numel(t) != 0 or k.numel(t) != self.numels[space][j]:
                raise ConfigError(f"input `{name}`[{j}] has shape {got}; its parameter has shape {shape}")
        return given, samples

    def run(self, inputs: Optional[Dict[str, Any]], stage: Optional[int],
            grad_attr: Optional[str] = None) -> bool:
        """Runs the rest of the step (stage None) or one stage. The one per-element input of
        each space that `inputs` does not name is each parameter's `grad_attr` (torch: `grad`).
        Returns False, having done nothing, for a whole step where no parameter has one."""
        if grad_attr is not None and not any(self.spaces):
            return False  # every parameter was left out (frozen): nothing to step, as in torch
        inputs = dict(inputs or {})
        tensors: List[Tuple[str, List[int]]] = []
        scalars: List[Tuple[str, float]] = []
        particles: List[Tuple[str, List[float]]] = []
        samples = None
        keep = []  # the tensors whose addresses are passed: alive until the call returns
        k = self.kind
        input_names = {n for n, _, _ in self.inputs}
        for name, value in inputs.items():
            if name in input_names:
                continue
            if name in self.scalar_inputs:
                if self.scalar_inputs[name]:
                    vals = [_number(name, v) for v in value]
                    particles.append((name, vals))
                else:
                    scalars.append((name, _number(name, value)))
                continue
            known = sorted(input_names | set(self.scalar_inputs))
            raise ConfigError(f"rule `{self.rule.name}` has no input `{name}` "
                              f"(its inputs: {', '.join(known) or 'none'})")
        given_tensors = any(n in inputs for n in input_names)
        auto_spaces = 0
        gradless_spaces = 0
        for space in range(len(self.spaces)):
            missing = [n for n, s, per in self.inputs if s == space and not per and n not in inputs]
            ps = self.spaces[space]
            if len(missing) != 1 or not ps or grad_attr is None:
                continue
            auto_spaces += 1
            if all(getattr(p, grad_attr) is None for p in ps):
                gradless_spaces += 1
                continue
            addrs = k.fast_addrs(ps, grad_attr, self.dtype, self.device, self.shapes[space])
            if addrs is not None:
                tensors.append((missing[0], addrs))
                continue
            gs = [getattr(p, grad_attr) for p in ps]
            present = [g is not None for g in gs]
            if all(present):
                inputs[missing[0]] = gs
            elif any(present):
                i = present.index(False)
                raise ConfigError(
                    f"parameter {i} of `{self.rule.spaces[space]}` has no gradient (.grad is None) "
                    "while others have one: optc steps every parameter of an optimizer "
                    "together; leave it out of the optimizer or give it a gradient")
        if stage is None and auto_spaces and gradless_spaces == auto_spaces and not given_tensors:
            # No parameter has a gradient: as torch's optimizers do, the step does nothing.
            return False
        for name, space, per_sample in self.inputs:
            if name not in inputs:
                continue
            given = inputs[name]
            if not per_sample and not k.is_tensor(given):
                given = list(given)
                addrs = k.fast_addrs(given, None, self.dtype, self.device, self.shapes[space])
                if addrs is not None:
                    keep.append(given)
                    tensors.append((name, addrs))
                    continue
            ts, n = self._input_tensors(name, space, per_sample, given)
            if n is not None:
                if samples is not None and n != samples:
                    raise ConfigError(f"the per-sample inputs hold different numbers of samples ({samples} and {n})")
                samples = n
            keep.append(ts)
            tensors.append((name, [k.addr(t) for t in ts]))
        params = self.param_addrs()
        if not self.device_path:
            self.session.step(params, tensors, scalars, particles, stage=stage, samples=samples)
        elif self.device == "cpu":  # the CUDA emulator
            if stage is not None or particles:
                raise ConfigError("on the CUDA engine, optc runs whole steps without per-particle inputs")
            self.session.step_device(params, tensors, scalars, samples=samples)
        else:
            if stage is not None or particles:
                raise ConfigError("on the CUDA engine, optc runs whole steps without per-particle inputs")
            import torch
            dev = torch.device(self.device)
            # The engine works on the legacy default stream: wait for torch's current stream
            # before the step, and for the step before torch's next work.
            torch.cuda.current_stream(dev).synchronize()
            self.session.step_device(params, tensors, scalars, samples=samples)
            torch.cuda.synchronize(dev)
        del keep
        return True

    def stage_index(self, stage: Union[int, str]) -> int:
        if isinstance(stage, int):
            if not 0 <= stage < len(self.stage_names):
                raise ConfigError(f"rule `{self.rule.name}` has no stage {stage} "
                                  f"(its stages: {', '.join(self.stage_names)})")
            return stage
        if stage not in self.stage_names:
            raise ConfigError(f"rule `{self.rule.name}` has no stage `{stage}` "
                              f"(its stages: {', '.join(self.stage_names)})")
        return self.stage_names.index(stage)

    def read(self, name: str):
        """The tensors of per-element state or output `name`, as NumPy arrays shaped like
        their parameters."""
        import numpy as np
        lens, data = self.session.read(name)
        dt = np.float64 if self.session.state_itemsize == 8 else np.float32
        flat = np.frombuffer(data, dtype=dt)
        space = next((s for n, _, s, _ in self.rule.buffers if n == name), 0)
        out = []
        off = 0
        for j, n in enumerate(lens):
            a = flat[off:off + n].copy()
            off += n
            shape = self.shapes[space][j] if j < len(self.shapes[space]) else (n,)
            out.append(a.reshape(shape) if int(np.prod(shape)) == n else a)
        return out


def _default_threads() -> int:
    try:
        import torch
        return max(1, torch.get_num_threads())
    except ImportError:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _NumpyKind(_Tensors):
    def dtype(self, t) -> str:
        return {"float32": "float32", "float64": "float64", "float16": "float16"}.get(
            t.dtype.name, t.dtype.name) if t.dtype.isnative else f"{t.dtype} (not native byte order)"

    def addr(self, t) -> int:
        return t.__array_interface__["data"][0]

    def numel(self, t) -> int:
        return int(t.size)

    def shape(self, t):
        return tuple(t.shape)

    def contiguous(self, t) -> bool:
        return bool(t.flags.c_contiguous)

    def device(self, t) -> str:
        return "cpu"

    def is_tensor(self, t) -> bool:
        import numpy as np
        return isinstance(t, np.ndarray)


class ArrayOptimizer:
    """A rule over NumPy arrays, updated in place.

    ``params`` is a list of arrays (the rule's one param) or a dict from each param's name to
    its list of arrays. Every input is given by name to :meth:`step`::

        w = np.zeros(3, np.float32)
        opt = optc.ArrayOptimizer([w], "sgd", lr=0.1)
        opt.step({"g": [np.ones(3, np.float32)]})
    """

    def __init__(self, params, rule_spec, *, engine: str = "auto", threads: Optional[int] = None,
                 seed: Optional[int] = None, non_finite: str = "proceed", **hypers):
        import numpy as np
        self.rule = rule(rule_spec)
        spaces = _spaces_of(self.rule, params)
        for ps in spaces:
            for p in ps:
                if not isinstance(p, np.ndarray):
                    raise ConfigError(f"parameters must be NumPy arrays, not {type(p).__name__}")
                if not p.flags.writeable:
                    raise ConfigError("a parameter array is read-only")
        self._b = _Binding(self.rule, spaces, _NumpyKind(), engine=engine, threads=threads,
                           seed=seed, non_finite=non_finite)
        for name, v in _normalize(self.rule, hypers, "ArrayOptimizer").items():
            self.set_hyper(name, v)

    def set_hyper(self, name: str, value) -> None:
        """Sets a hyperparameter for the next steps."""
        self._b.session.set_hyper(0, name, _number(name, value))

    def hyper(self, name: str) -> float:
        v = self._b.session.hyper(0, name)
        if v is None:
            raise ConfigError(f"rule `{self.rule.name}` has no hyperparameter `{name}`")
        return v

    @property
    def steps(self) -> int:
        return self._b.session.steps

    def step(self, inputs: Optional[Dict[str, Any]] = None) -> None:
        """Runs a step (the rest of it, after :meth:`run_stage`)."""
        self._b.run(inputs, None)

    def run_stage(self, stage: Union[int, str], inputs: Optional[Dict[str, Any]] = None):
        """Runs one stage; returns its per-element outputs (lists of arrays) by name."""
        k = self._b.stage_index(stage)
        self._b.run(inputs, k)
        return {n: self._b.read(n) for n in self.rule.stage_outputs(k)}

    def state(self, name: str):
        """Per-element state or output `name`: one array per parameter tensor (a copy)."""
        return self._b.read(name)

    def scalar_state(self) -> Dict[str, float]:
        return dict(self._b.session.scalar_states())


def _spaces_of(r: Rule, params) -> List[List[Any]]:
    if isinstance(params, dict):
        unknown = [k for k in params if k not in r.spaces]
        if unknown:
            raise ConfigError(f"rule `{r.name}` has no param {', '.join(map(repr, unknown))} "
                              f"(its params: {', '.join(r.spaces)})")
        return [list(params.get(s, [])) for s in r.spaces]
    if len(r.spaces) != 1:
        raise ConfigError(f"rule `{r.name}` has {len(r.spaces)} params ({', '.join(r.spaces)}): "
                          "pass a dict from each to its tensors")
    return [list(params)]


try:  # the torch optimizer, where torch is installed
    import torch as _torch
except ImportError:  # pragma: no cover
    _torch = None

if _torch is not None:
    from ._torch import Optimizer  # noqa: E402
else:  # pragma: no cover
    class Optimizer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("optc.Optimizer needs torch (pip install torch)")
