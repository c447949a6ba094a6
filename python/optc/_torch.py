"""optc.Optimizer: any rule as a ``torch.optim.Optimizer`` over torch tensors, in place."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from . import _optc, _Binding, _GROUP_KEYS, _Tensors, _normalize, _number, _spaces_of, rule as _rule
from ._errors import CheckpointError, ConfigError

_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


#: torch.optim's implementation switches (which loop runs, not what it computes).
_TORCH_FLAGS = ("foreach", "fused", "capturable", "differentiable")


class _TorchKind(_Tensors):
    def dtype(self, t) -> str:
        return _DTYPES.get(t.dtype, str(t.dtype).replace("torch.", ""))

    def addr(self, t) -> int:
        return t.data_ptr()

    def numel(self, t) -> int:
        return t.numel()

    def shape(self, t):
        return tuple(t.shape)

    def contiguous(self, t) -> bool:
        return t.is_contiguous()

    def device(self, t) -> str:
        d = t.device
        return "cpu" if d.type == "cpu" else (f"{d.type}:{d.index}" if d.index is not None else d.type)

    def is_tensor(self, t) -> bool:
        return isinstance(t, torch.Tensor)

    _TORCH = {v: k for k, v in _DTYPES.items()}

    def fast_addrs(self, items, attr, dtype, device, shapes):
        td = self._TORCH.get(dtype)
        if td is None:
            return None
        dev = None if device == "cpu" else torch.device(device)
        return _optc.torch_addrs(items, attr, td, dev, shapes)


class Optimizer(torch.optim.Optimizer):
    """A rule as a torch optimizer.

    ``rule`` is a standard-library name (``"adamw"``), a path to a ``.opt`` file, rule source
    text, or an :class:`optc.Rule`. ``params`` is an iterable of tensors or of param-group dicts
    (torch's ``param_groups``), each group with its own hyperparameter values; a rule with
    several params takes ``"space": NAME`` in a group to say which param its tensors are (the
    first by default). Keyword arguments are the rule's hyperparameters (torch's
    ``betas=(b1, b2)`` is ``beta1``, ``beta2``); values changed in ``param_groups`` (by an LR
    scheduler, say) take effect at the next step.

    The gradient input of each param is ``p.grad``; other per-element inputs, scalar inputs
    (a loss) and per-particle inputs are given by name: ``step(inputs={"hv": [...]})``.
    Parameters are float32, float64, bfloat16 or float16 tensors (16-bit ones are computed in
    float32, with optional ``master_weights``, ``bf16_state`` and ``stochastic_rounding``), on
    the CPU or one CUDA device, contiguous; each step writes them in place and bumps their
    version counters.

    Options: ``engine`` (``"auto"``: native vector code where a C compiler works, else
    Cranelift; ``"native"``, ``"cranelift"``, ``"interpreter"``, ``"cuda"``), ``threads``
    (default ``torch.get_num_threads()``), ``seed`` of the rule's random draws,
    ``non_finite`` (``"proceed"``, ``"skip"`` or ``"error"`` for a step whose inputs hold an
    infinity or a NaN).
    """

    def __init__(self, params, rule, *, engine: str = "auto", threads: Optional[int] = None,
                 seed: Optional[int] = None, non_finite: str = "proceed",
                 master_weights: bool = False, bf16_state: bool = False,
                 stochastic_rounding: bool = False, **hypers):
        r = _rule(rule)
        rule_names = {h[0] for h in r.hypers}
        # torch's implementation switches: optc always runs its fused kernels, and these do
        # not change the numbers, so they are accepted and ignored.
        for flag in _TORCH_FLAGS:
            if flag not in rule_names:
                hypers.pop(flag, None)
        hypers = _normalize(r, hypers, "Optimizer")
        unknown = [k for k in hypers if k in _GROUP_KEYS]
        if unknown:
            raise ConfigError(f"`{unknown[0]}` is a parameter-group key, not an option")
        defaults: Dict[str, Any] = {name: (bool(default) if is_bool else default)
                                    for name, is_bool, default, _, _ in r.hypers}
        defaults.update(hypers)
        self._rule = r
        self._options = dict(engine=engine, threads=threads, seed=seed, non_finite=non_finite,
                             master_weights=master_weights, bf16_state=bf16_state,
                             stochastic_rounding=stochastic_rounding)
        self._binding: Optional[_Binding] = None
        self._pushed: List[Dict[str, float]] = []
        self._shared: List[str] = []
        super().__init__(params, defaults)
        self._build()

    # --- groups ----------------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if getattr(self, "_binding", None) is not None and self._binding.session.steps > 0:
            raise ConfigError("optc cannot add a parameter group after the first step: make the "
                              "optimizer with every group")
        if isinstance(param_group, dict):
            param_group = _normalize(self._rule, param_group, "parameter group")
            space = param_group.get("space", self._rule.spaces[0])
            if space not in self._rule.spaces:
                raise ConfigError(f"parameter group: rule `{self._rule.name}` has no param "
                                  f"`{space}` (its params: {', '.join(self._rule.spaces)})")
        super().add_param_group(param_group)
        if getattr(self, "_binding", None) is not None:
            self._binding = None
            self._build()

    @property
    def rule(self):
        """The compiled rule."""
        return self._rule

    def _build(self) -> _Binding:
        """Binds the rule to the groups' tensors. As torch's optimizers skip parameters
        without a gradient, `nn.Parameter`s that do not require one (frozen) are left out where
        the rule's gradient input would be their gradient; each step checks they still have
        none. Plain tensors are always stepped (their inputs may come from elsewhere)."""
        if self._binding is not None:
            return self._binding
        r = self._rule
        inputs = [(space, per) for _, role, space, per in r.buffers if role == "input"]
        grad_space = {r.spaces[s]: sum(1 for sp, per in inputs if sp == s and not per) == 1
                      for s in range(len(r.spaces))}
        spaces: Dict[str, List[Any]] = {s: [] for s in r.spaces}
        self._frozen = []
        for gi, g in enumerate(self.param_groups):
            space = g.get("space", r.spaces[0])
            for p in g["params"]:
                if grad_space[space] and isinstance(p, torch.nn.Parameter) and not p.requires_grad:
                    self._frozen.append(p)
                else:
                    spaces[space].append(p)
        # Tensors are named by their place in the param groups (torch's state_dict index); a
        # rule with several params keeps each param's tensors together.
        binding = _Binding(r, _spaces_of(r, spaces) if len(r.spaces) > 1 else [spaces[r.spaces[0]]],
                           _TorchKind(), **self._options)
        index = {}
        k = 0
        flat = [p for ps in binding.spaces for p in ps]
        for p in flat:
            index[id(p)] = str(k)
            k += 1
        self._names = [[index[id(p)] for p in g["params"] if id(p) in index] for g in self.param_groups]
        self._order = [index.get(id(p)) for g in self.param_groups for p in g["params"]]
        self._shared = list(binding.session.shared_hypers())
        hyper_names = [h[0] for h in r.hypers]
        self._pushed = []
        for gi, g in enumerate(self.param_groups):
            values = []
            for name in hyper_names:
                if name in self._shared:
                    continue
                values.append((name, _number(name, g[name])))
            binding.session.add_group(self._names[gi], values)
            self._pushed.append({n: v for n, v in values})
        self._binding = binding
        self._sync()
        return binding

    def _sync(self) -> None:
        """Pushes the hyperparameter values of `param_groups` that changed."""
        b = self._binding
        for gi, g in enumerate(self.param_groups):
            pushed = self._pushed[gi]
            for name, old in pushed.items():
                v = g[name]
                if v is old:
                    continue
                f = _number(name, v)
                if f != old:
                    b.session.set_hyper(gi + 1, name, f)
                pushed[name] = f
        for name in self._shared:
            vals = {_number(name, g[name]) for g in self.param_groups}
            if len(vals) > 1:
                raise ConfigError(f"`{name}` feeds the rule's scalar state, shared by every tensor: "
                                  f"it must be equal in every parameter group (got {sorted(vals)})")
            v = vals.pop()
            if b.session.hyper(0, name) != v:
                b.session.set_hyper(0, name, v)

    # --- steps -----------------------------------------------------------------------------

    def _run(self, inputs, stage) -> None:
        b = self._build()
        for p in self._frozen:
            if p.grad is not None:
                raise ConfigError(
                    f"a parameter of shape {tuple(p.shape)} did not require a gradient when the "
                    "optimizer was made, so optc left it out, and now it has one: make a new "
                    "optimizer after unfreezing parameters")
        self._sync()
        if b.run(inputs, stage, "grad"):
            torch.autograd.graph.increment_version([p for ps in b.spaces for p in ps])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, inputs: Optional[Dict[str, Any]] = None):
        """Runs a step (the rest of one, after :meth:`run_stage`). ``closure`` re-evaluates
        the model and returns the loss, which is returned; ``inputs`` names the inputs other
        than the gradients. As with torch's optimizers, a step where no parameter has a
        gradient does nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run(inputs, None)
        return loss

    @torch.no_grad()
    def run_stage(self, stage: Union[int, str], inputs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Runs one stage of the current step (stages run in order) and returns the
        per-element outputs it writes, each a list of tensors shaped like the parameters."""
        b = self._build()
        k = b.stage_index(stage)
        self._run(inputs, k)
        return {n: self._outs(n) for n in self._rule.stage_outputs(k)}

    def _outs(self, name: str) -> List[torch.Tensor]:
        return [torch.from_numpy(a) for a in self._binding.read(name)]

    def outputs(self) -> Dict[str, Any]:
        """Every per-element output (lists of tensors) and scalar output (floats) as the last
        step left them."""
        b = self._build()
        out: Dict[str, Any] = {n: self._outs(n) for n, role, _, _ in self._rule.buffers if role == "output"}
        scalars = dict(b.session.scalar_states())
        for n in self._rule.scalar_outs:
            out[n] = scalars[n]
        return out

    def state_of(self, name: str) -> List[torch.Tensor]:
        """The values of per-element state `name`, one tensor per parameter (copies)."""
        return self._outs(name)

    @property
    def steps(self) -> int:
        """Completed steps."""
        return self._binding.session.steps if self._binding is not None else 0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite inputs (``non_finite="skip"``)."""
        return self._binding.session.skipped_steps if self._binding is not None else 0

    @property
    def seed(self) -> int:
        """The seed of the rule's random draws (saved in the state dict)."""
        return self._build().session.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._build().session.seed = int(value)

    @property
    def engine(self) -> str:
        """The engine that runs the kernels."""
        return self._build().session.engine

    # --- state -----------------------------------------------------------------------------

    def __getstate__(self):
        raise TypeError("an optc.Optimizer holds compiled kernels and the addresses of its "
                        "tensors, so it cannot be pickled or copied: save its state_dict() and "
                        "load it into a new optc.Optimizer")

    def state_dict(self) -> Dict[str, Any]:
        """torch's layout: ``state`` maps each parameter's index to its ``step`` and the rule's
        per-element state tensors, ``param_groups`` holds each group's hyperparameters and
        parameter indices. ``optc`` holds the rule's name, scalar state, seed and the whole
        state as an optc checkpoint (what :meth:`load_state_dict` restores)."""
        groups = []
        k = 0
        for g in self.param_groups:
            d = {key: copy.deepcopy(v) for key, v in g.items() if key != "params"}
            d["params"] = list(range(k, k + len(g["params"])))
            k += len(g["params"])
            groups.append(d)
        state: Dict[int, Dict[str, torch.Tensor]] = {}
        extra: Dict[str, Any] = {"rule": self._rule.name}
        b = self._binding
        if b is not None and b.session.steps > 0:
            steps = torch.tensor(float(b.session.steps))
            names = [n for n, role, _, _ in self._rule.buffers if role == "state"]
            values = {n: b.read(n) for n in names}
            flat_pos = {name: i for i, name in enumerate(self._order)}
            per_tensor = [p for ps in b.spaces for p in ps]
            for i, name in enumerate(self._order):
                if name is None:  # left out (frozen): no state, as in torch
                    continue
                j = int(name)
                entry: Dict[str, torch.Tensor] = {"step": steps.clone()}
                space, idx = b._space_of(j), b._index_of(j)
                for n in names:
                    if any(bn == n and s == space for bn, _, s, _ in self._rule.buffers):
                        entry[n] = torch.from_numpy(values[n][idx])
                state[i] = entry
            del flat_pos, per_tensor
            extra["scalar_states"] = dict(b.session.scalar_states())
            extra["seed"] = b.session.seed
            extra["checkpoint"] = bytes(b.session.checkpoint())
        return {"state": state, "param_groups": groups, "optc": extra}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned, for the same rule and parameter shapes.
        Validated first: on an error nothing changes."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise CheckpointError(f"the state dict has {len(groups) if isinstance(groups, list) else 'no'} "
                                  f"parameter groups; this optimizer has {len(self.param_groups)}")
        for gi, (saved, g) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", ())) != len(g["params"]):
                raise CheckpointError(f"parameter group {gi} of the state dict has "
                                      f"{len(saved.get('params', ()))} parameters; this optimizer's has {len(g['params'])}")
        extra = state_dict.get("optc", {})
        if extra.get("rule", self._rule.name) != self._rule.name:
            raise CheckpointError(f"the state dict is of rule `{extra.get('rule')}`; this optimizer runs `{self._rule.name}`")
        blob = extra.get("checkpoint")
        if blob is None and state_dict.get("state"):
            raise CheckpointError("the state dict has per-parameter state but no optc checkpoint "
                                  "(`optc`/`checkpoint`): it was not made by optc.Optimizer.state_dict")
        new_groups = []
        for saved, g in zip(groups, self.param_groups):
            d = dict(g)
            for key, v in saved.items():
                if key != "params":
                    d[key] = copy.deepcopy(v)
            new_groups.append(d)
        if blob is not None:
            b = self._build()
            if isinstance(blob, torch.Tensor):
                blob = blob.cpu().numpy().tobytes()
            b.session.load_checkpoint(bytes(blob))
            # the checkpoint set every group's values: push them all again at the next step
            self._pushed = [{n: float("nan") for n in p} for p in self._pushed]
        self.param_groups[:] = new_groups
