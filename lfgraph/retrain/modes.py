"""Retraining modes: how the layers of a fused set are trained before they are tied.

The paper ("Fusing Layers") retrains a network whose top-k most similar layer pairs are
being fused, in one of three ways, and ties each pair into one layer at the end:

``mean``
    Every member starts at the average of the set and the gradient applied to each is the
    average of the members' gradients, so the members stay equal. Implemented exactly by
    sharing one ``nn.Parameter`` from the start with a gradient hook that divides its
    (summed) gradient by the number of members.
``freeze``
    One member is trainable, the others are frozen: their weights never change, but their
    gradients are still computed and steer the trainable member through eq. 6,
    ``dL/dW̄ = γ dL/dW_frozen + (1 − γ) dL/dW_trainable`` with ``γ`` the normalised
    Jensen-Shannon divergence of the two layers' Gaussian weight distributions (see
    :func:`js_gamma`); ``dL/dW_k`` is the gradient at member ``k``'s position. The pair is
    averaged at test time, and the training forward pass already uses that average
    ``W̄ = (W_trainable + W_frozen) / 2`` in both positions, so that retraining adapts the
    network that will be deployed. (Training each position with its own weight and
    averaging only afterwards undoes the retraining: on the project CNN it ended at the
    accuracy of untrained averaging.)
``mix``
    Before every training forward pass each output neuron (row) of the one mixed weight is
    drawn from one member (Bernoulli ½ for a pair, uniform for more), and that mixed weight
    is used in every member's place; biases are averaged. Gradients reach the drawn rows.
    At test time the set is averaged (the expected mixed weight).

Every mode is installed with :func:`torch.nn.utils.parametrize` or tensor hooks on the
existing modules, so one training loop serves all modes. In ``eval()`` mode a fused model
already computes what the tied model will compute, and :meth:`RetrainHandle.finalize`
removes all parametrizations and hooks and leaves every fused set sharing ONE
``nn.Parameter`` for its weight (and one for its bias).

A *fused set* is a list of module paths (relative to the model) of same-shape
``nn.Linear`` / ``nn.Conv*d`` / GPT-2 ``Conv1D`` modules; the first is the kept one. Modules
that already share a weight (tied by an earlier fusion) count as one member, and all of
them follow the new fusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from ..errors import LfgraphError

FusedSet = Sequence[str]


# --------------------------------------------------------------------------- layers


def is_conv1d_transposed(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D``: a linear layer that stores its weight as ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_fusable_layer(module: nn.Module) -> bool:
    """``nn.Linear``, ``nn.Conv1d/2d/3d`` or GPT-2 ``Conv1D`` with a weight parameter."""
    ok_type = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_conv1d_transposed(module)
    return ok_type and isinstance(getattr(module, "weight", None), torch.Tensor)


def output_dim(module: nn.Module) -> int:
    """The weight dimension that indexes output neurons (1 for ``Conv1D``, else 0)."""
    return 1 if is_conv1d_transposed(module) else 0


def _raw(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored tensor behind ``module.<name>``, also when it is parametrized."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name, None)


def _conv_signature(module: nn.Module) -> tuple:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (module.stride, module.padding, module.dilation, module.groups, module.padding_mode)
    return ()


def layer_positions(model: nn.Module) -> dict[str, int]:
    """Depth index of every fusable layer: its rank in ``named_modules`` order (input first).

    Layers sharing one weight get the index of its first user. Used by ``freeze`` to find
    the layer of a pair closer to the middle of the network.
    """
    out: dict[str, int] = {}
    seen: dict[int, int] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if not is_fusable_layer(module):
            continue
        key = id(_raw(module, "weight"))
        if key not in seen:
            seen[key] = len(seen)
        out[path] = seen[key]
    return out


@dataclass
class _Member:
    """One distinct weight tensor of a fused set and every module that uses it."""

    paths: list[str]
    modules: list[nn.Module]

    @property
    def module(self) -> nn.Module:
        return self.modules[0]

    @property
    def weight(self) -> torch.Tensor:
        return _raw(self.module, "weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return _raw(self.module, "bias")


@dataclass
class _Group:
    """A resolved fused set: its members (kept one first) and the layer kind."""

    names: list[str]
    members: list[_Member]
    out_dim: int
    has_bias: bool


def _resolve(model: nn.Module, fused_sets: Sequence[FusedSet]) -> list[_Group]:
    """Check the fused sets and group the modules of each by the weight tensor they use."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if is_fusable_layer(module):
            users.setdefault(id(_raw(module, "weight")), []).append((path, module))
    taken: dict[int, str] = {}
    groups: list[_Group] = []
    for names in fused_sets:
        names = list(names)
        if len(names) < 2:
            raise LfgraphError(f"fused set {names} has fewer than two layers: give at least two module paths")
        modules = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise LfgraphError(
                    f"fused set {names}: {name!r} is not a module of {type(model).__name__}: "
                    "give module paths as in model.named_modules()"
                ) from None
            if parametrize.is_parametrized(module):
                raise LfgraphError(
                    f"layer {name!r} already has a parametrization (an installed retraining mode?): finalize() it first"
                )
            if not is_fusable_layer(module):
                raise LfgraphError(
                    f"fused set {names}: {name!r} is a {type(module).__name__}; only nn.Linear, nn.Conv*d and "
                    "GPT-2 Conv1D layers can be fused"
                )
            modules.append(module)
        first = modules[0]
        for name, module in zip(names[1:], modules[1:]):
            if type(module) is not type(first) or _raw(module, "weight").shape != _raw(first, "weight").shape:
                raise LfgraphError(
                    f"fused set {names}: {name!r} ({type(module).__name__} {tuple(_raw(module, 'weight').shape)}) does not "
                    f"match {names[0]!r} ({type(first).__name__} {tuple(_raw(first, 'weight').shape)}): "
                    "only layers of one type and weight shape can be fused"
                )
            if _conv_signature(module) != _conv_signature(first):
                raise LfgraphError(f"fused set {names}: {name!r} has other stride/padding/dilation/groups than {names[0]!r}")
            if (_raw(module, "bias") is None) != (_raw(first, "bias") is None):
                raise LfgraphError(f"fused set {names}: {name!r} and {names[0]!r} differ in having a bias; cannot fuse them")
        members: list[_Member] = []
        seen: set[int] = set()
        for module in modules:
            key = id(_raw(module, "weight"))
            if key in seen:
                continue
            seen.add(key)
            if key in taken:
                raise LfgraphError(f"layer {users[key][0][0]!r} is in two fused sets ({taken[key]} and {names}): merge the sets")
            taken[key] = str(names)
            if any(parametrize.is_parametrized(m) for _, m in users[key]):
                raise LfgraphError(
                    f"layer {users[key][0][0]!r} already has a parametrization (an installed retraining mode?): finalize() it first"
                )
            members.append(_Member(paths=[p for p, _ in users[key]], modules=[m for _, m in users[key]]))
        if len(members) < 2:
            continue  # every name already shares one weight: nothing left to fuse
        groups.append(_Group(names=names, members=members, out_dim=output_dim(first), has_bias=_raw(first, "bias") is not None))
    return groups


# --------------------------------------------------------------------------- eq. 6


def gaussian_kl_to_mixture(mu_p: float, sd_p: float, mu_q: float, sd_q: float) -> tuple[float, float]:
    """``(KL(p ‖ m), KL(q ‖ m))`` in nats for ``p = N(mu_p, sd_p²)``, ``q = N(mu_q, sd_q²)``
    and their equal-weight mixture ``m = (p + q) / 2``.

    The mixture of two Gaussians is not Gaussian, so the KL has no closed form; it is
    integrated numerically (trapezoid rule on a grid that is dense over ±12 standard
    deviations of each component, in log space for stability). Accurate to ~1e-7.
    """
    sd_p, sd_q = max(float(sd_p), 1e-12), max(float(sd_q), 1e-12)
    grids = [np.linspace(mu - 12 * sd, mu + 12 * sd, 4001) for mu, sd in ((mu_p, sd_p), (mu_q, sd_q))]
    x = np.unique(np.concatenate(grids))

    def log_normal(mu: float, sd: float) -> np.ndarray:
        return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)

    lp, lq = log_normal(mu_p, sd_p), log_normal(mu_q, sd_q)
    lm = np.logaddexp(lp, lq) - math.log(2.0)
    kl_p = float(np.trapezoid(np.exp(lp) * (lp - lm), x))
    kl_q = float(np.trapezoid(np.exp(lq) * (lq - lm), x))
    # both are in [0, ln 2] (m >= p/2); clip the quadrature's last-digit noise
    return min(max(kl_p, 0.0), math.log(2.0)), min(max(kl_q, 0.0), math.log(2.0))


def gaussian_fit(weight: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of all entries of ``weight`` (the layer's Gaussian)."""
    w = weight.detach().to(torch.float64).flatten()
    return float(w.mean()), float(w.std(unbiased=False))


def js_gamma(w_i: torch.Tensor, w_j: torch.Tensor) -> float:
    """``γ`` of eq. 6 for layers ``W_i`` and ``W_j``, normalised to ``[0, 1]``.

    How it is computed: each layer's weights (all entries) are modelled by a univariate
    Gaussian ``N(mean, std²)`` (the paper's CLT assumption); ``W̄_ij`` is the equal-weight
    mixture of the two Gaussians;
    ``JS = ½ (KL(W_i ‖ W̄_ij) + KL(W_j ‖ W̄_ij))`` in nats, integrated numerically
    (:func:`gaussian_kl_to_mixture`). JS of any two distributions lies in ``[0, ln 2]``, so
    ``γ = JS / ln 2`` lies in ``[0, 1]``: 0 for identical distributions, → 1 for disjoint
    ones. ``γ`` is symmetric in ``i, j``.
    """
    kl_i, kl_j = gaussian_kl_to_mixture(*gaussian_fit(w_i), *gaussian_fit(w_j))
    return min(max(0.5 * (kl_i + kl_j) / math.log(2.0), 0.0), 1.0)


class _RouteGrad(torch.autograd.Function):
    """Forward: ``value``. Backward: the incoming gradient times ``scale`` goes to ``source``.

    ``freeze`` uses it to hand the gradient at every position of a fused set to the one
    trainable member, weighted as eq. 6 says.
    """

    @staticmethod
    def forward(ctx: Any, source: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return grad * ctx.scale, None, None


# --------------------------------------------------------------------------- parametrizations


class _GroupState:
    """What the parametrizations of one fused set share: the members' stored tensors."""

    def __init__(self, group: _Group) -> None:
        self.group = group
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []

    def capture(self) -> None:
        """Read the members' stored tensors (call after the parametrizations are registered)."""
        self.weights = [m.weight for m in self.group.members]
        self.biases = [m.bias for m in self.group.members] if self.group.has_bias else []

    def average(self, kind: str) -> torch.Tensor:
        tensors = self.weights if kind == "weight" else self.biases
        return torch.stack(list(tensors)).mean(0)


class _Frozen(nn.Module):
    """``freeze`` for one member's position and tensor kind (weight or bias).

    Forward: the set's average ``W̄`` (what finalize() ties). Training backward: the
    gradient at this position goes to the trainable member only, scaled by ``scale``
    (``1 − γ̄`` at the trainable member's own position, ``γ_k/(n−1)`` at frozen member
    ``k``'s), which sums to eq. 6 over the positions.
    """

    def __init__(self, state: _GroupState, kind: str, index: int, source: int, scale: float) -> None:
        super().__init__()
        self._state = [state]  # a list, so that nn.Module does not register it
        self.kind, self.index, self.source, self.scale = kind, index, source, scale

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        state = self._state[0]
        if not self.training:
            return state.average(self.kind)
        tensors = state.weights if self.kind == "weight" else state.biases
        return _RouteGrad.apply(tensors[self.source], state.average(self.kind).detach(), self.scale)


class _Mixed(nn.Module):
    """``mix`` for one member: the row-mixed weight (training) or the average (eval)."""

    def __init__(self, state: "_MixState", kind: str) -> None:
        super().__init__()
        self._state = [state]
        self.kind = kind

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        state = self._state[0]
        if self.kind == "bias" or not self.training:
            return state.average(self.kind)
        return state.mixed_weight()


class _MixState(_GroupState):
    """Row choices of one mixed set; resampled before every training forward pass."""

    def __init__(self, group: _Group, generator: torch.Generator) -> None:
        super().__init__(group)
        self.generator = generator
        self.choice = torch.zeros(0, dtype=torch.long)

    def resample(self) -> None:
        w = self.weights[0]
        rows = w.shape[self.group.out_dim]
        self.choice = torch.randint(len(self.weights), (rows,), generator=self.generator).to(w.device)

    def mixed_weight(self) -> torch.Tensor:
        stacked = torch.stack(list(self.weights))  # (n, *weight.shape)
        shape = [1] * stacked.dim()
        shape[1 + self.group.out_dim] = -1
        index = self.choice.view(shape).expand(1, *stacked.shape[1:])
        return stacked.gather(0, index).squeeze(0)


# --------------------------------------------------------------------------- modes


@dataclass
class _Installed:
    """One fused set as installed: how to read its tied value and how to undo the install."""

    group: _Group
    fused: Callable[[str], torch.Tensor]  # "weight" | "bias" -> the test-time value
    undo: list[Callable[[], None]] = field(default_factory=list)
    trainable: list[nn.Parameter] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrainMode:
    """A registered retraining mode: ``install`` prepares one fused set for retraining."""

    name: str
    description: str
    install: Callable[[nn.Module, _Group, dict[str, Any]], _Installed]
    options: tuple[str, ...] = ()


def _set_on_users(member: _Member, kind: str, value: nn.Parameter | None) -> None:
    for module in member.modules:
        setattr(module, kind, value)


def _install_mean(model: nn.Module, group: _Group, options: dict[str, Any]) -> _Installed:
    n = len(group.members)
    shared: dict[str, nn.Parameter] = {}
    undo = []
    for kind in ("weight", "bias") if group.has_bias else ("weight",):
        values = [getattr(m, kind) for m in group.members]
        param = nn.Parameter(torch.stack([v.detach() for v in values]).mean(0))
        for member in group.members:
            _set_on_users(member, kind, param)
        # one shared parameter receives the SUM of its users' gradients; the paper applies
        # their average to every member
        undo.append(param.register_hook(lambda g, n=n: g / n).remove)
        shared[kind] = param
    return _Installed(group=group, fused=lambda kind: shared[kind], undo=undo, trainable=list(shared.values()))


def _install_freeze(model: nn.Module, group: _Group, options: dict[str, Any]) -> _Installed:
    members = group.members
    freeze_by = options.get("freeze_by", "middle")
    if freeze_by == "middle":
        # computed once per install, before any set is parametrized
        positions = options.get("positions") or options.setdefault("_positions", layer_positions(model))
        depth = max(positions.values()) if positions else 0
        middle = depth / 2

        def distance(m: _Member) -> float:
            return abs(min(positions.get(p, 0) for p in m.paths) - middle)

        # the layer closest to the middle is frozen; the most salient one (nearest the
        # input or output, Zhang et al. 2019) keeps training
        trainable = max(range(len(members)), key=lambda k: (distance(members[k]), -k))
    elif freeze_by == "divergence":
        fits = [gaussian_fit(m.weight) for m in members]
        # the divergence asymmetry: the member its mixture with the others represents worst
        # (largest KL(W_k ‖ W̄)) trains; the ones the mixture already stands for are frozen
        def spread(k: int) -> float:
            return sum(gaussian_kl_to_mixture(*fits[k], *fits[j])[0] for j in range(len(members)) if j != k)

        trainable = max(range(len(members)), key=lambda k: (spread(k), -k))
    else:
        raise LfgraphError(f"freeze_by={freeze_by!r} is not one of ('middle', 'divergence')")
    override = options.get("gamma")
    if override is not None and not 0.0 <= float(override) <= 1.0:
        raise LfgraphError(f"gamma must be in [0, 1], got {override}")
    # ``gamma`` overrides eq. 6's value (for measuring whether it matters)
    gammas = {
        k: float(override) if override is not None else js_gamma(members[trainable].weight, members[k].weight)
        for k in range(len(members)) if k != trainable
    }
    n_frozen = len(gammas)
    own_scale = 1.0 - sum(gammas.values()) / n_frozen
    state = _GroupState(group)
    undo: list[Callable[[], None]] = []
    kinds = ("weight", "bias") if group.has_bias else ("weight",)
    for k, member in enumerate(members):
        for kind in kinds:
            param = getattr(member.module, kind)
            if k != trainable:
                param.requires_grad_(False)
            scale = own_scale if k == trainable else gammas[k] / n_frozen
            for module in member.modules:
                parametrize.register_parametrization(
                    module, kind, _Frozen(state, kind, k, trainable, scale), unsafe=True
                )
                undo.append(lambda module=module, kind=kind: parametrize.remove_parametrizations(module, kind, leave_parametrized=False))
    state.capture()
    trainable_params = [getattr(members[trainable], kind) for kind in kinds]
    info = {
        "trainable": members[trainable].paths[0],
        "frozen": [members[k].paths[0] for k in gammas],
        "gamma": {members[k].paths[0]: gammas[k] for k in gammas},
    }
    return _Installed(group=group, fused=state.average, undo=undo, trainable=trainable_params, info=info)


def _install_mix(model: nn.Module, group: _Group, options: dict[str, Any]) -> _Installed:
    generator = options.setdefault("_generator", torch.Generator().manual_seed(int(options.get("seed", 0))))
    state = _MixState(group, generator)
    undo: list[Callable[[], None]] = []
    kinds = ("weight", "bias") if group.has_bias else ("weight",)
    for member in group.members:
        for kind in kinds:
            for module in member.modules:
                parametrize.register_parametrization(module, kind, _Mixed(state, kind), unsafe=True)
                undo.append(lambda module=module, kind=kind: parametrize.remove_parametrizations(module, kind, leave_parametrized=False))
    state.capture()
    state.resample()

    def before_forward(_module: nn.Module, _args: Any) -> None:
        if model.training:
            state.resample()

    # one draw per forward pass of the whole model, shared by every position of the set
    undo.append(model.register_forward_pre_hook(before_forward).remove)
    trainable = [t for t in state.weights + state.biases if isinstance(t, nn.Parameter)]
    return _Installed(group=group, fused=state.average, undo=undo, trainable=trainable, info={"state": state})


#: Retraining modes by name; the CLI's ``--retrain-mode`` choices come from here.
RETRAIN_MODES: dict[str, RetrainMode] = {
    "mean": RetrainMode("mean", "members shared from their average; each gets the average gradient", _install_mean),
    "freeze": RetrainMode(
        "freeze", "one member trains with the JS-weighted gradient of eq. 6, the others are frozen",
        _install_freeze, options=("freeze_by", "positions", "gamma"),
    ),
    "mix": RetrainMode("mix", "rows drawn from a random member before each forward; biases averaged", _install_mix, options=("seed",)),
}


# --------------------------------------------------------------------------- handle


class RetrainHandle:
    """Fused sets installed on a model for retraining; :meth:`finalize` ties them.

    Create the optimizer *after* installing: installation replaces parameters (``mean``)
    and freezes some (``freeze``). :meth:`trainable_parameters` lists the parameters of the
    fused sets that retraining should update.
    """

    def __init__(self, model: nn.Module, mode: RetrainMode, installed: list[_Installed]) -> None:
        self.model = model
        self.mode = mode
        self.installed = installed
        self.finalized = False

    @property
    def fused_sets(self) -> list[list[str]]:
        return [inst.group.names for inst in self.installed]

    def info(self) -> list[dict[str, Any]]:
        """Per fused set: its names and what the mode decided (e.g. ``freeze``'s γ)."""
        return [{"names": inst.group.names, **{k: v for k, v in inst.info.items() if k != "state"}} for inst in self.installed]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for inst in self.installed for p in inst.trainable]

    def finalize(self) -> nn.Module:
        """Tie every fused set to its test-time value and remove all fusion machinery.

        Guarantees: the model (modified in place and returned) has no parametrizations or
        hooks from this handle; every module of a fused set uses one shared
        ``nn.Parameter`` as weight (and one as bias), so the unique-parameter count drops by
        ``(members − 1) × (weight + bias size)`` per set; in ``eval()`` mode the outputs
        equal those of the installed model in ``eval()`` mode. Calling it twice is an error.
        """
        if self.finalized:
            raise LfgraphError("this fusion was already finalized")
        for inst in self.installed:
            kinds = ("weight", "bias") if inst.group.has_bias else ("weight",)
            values = {kind: inst.fused(kind) for kind in kinds}
            if self.mode.name != "mean":
                values = {kind: v.detach().clone() for kind, v in values.items()}
            for undo in inst.undo:
                undo()
            for kind, value in values.items():
                param = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
                param.requires_grad_(True)
                for member in inst.group.members:
                    _set_on_users(member, kind, param)
        self.finalized = True
        return self.model


def install_retrain_mode(model: nn.Module, fused_sets: Sequence[FusedSet], mode: str = "mean", **options: Any) -> RetrainHandle:
    """Prepare ``fused_sets`` of ``model`` for retraining under fusion ``mode``.

    Expects: each set lists module paths of same-type, same-shape layers (first = kept);
    no layer in two sets. Options: ``freeze``: ``freeze_by="middle"`` (freeze the member
    nearest the middle of the network; default) or ``"divergence"`` (train the member with the
    largest ``KL(W_k ‖ W̄)`` to its mixture with the others, freeze the rest), ``positions`` (module
    path → depth index, default :func:`layer_positions`), ``gamma`` (a fixed value in [0, 1] instead of
    eq. 6's); ``mix``: ``seed``.
    Modifies ``model`` in place (parameters replaced or parametrized). Raises
    ``LfgraphError`` for an unknown mode or an invalid set.
    """
    if mode not in RETRAIN_MODES:
        raise LfgraphError(f"unknown retraining mode {mode!r}: choose one of {sorted(RETRAIN_MODES)}")
    fm = RETRAIN_MODES[mode]
    unknown = set(options) - set(fm.options)
    if unknown:
        raise LfgraphError(f"retraining mode {mode!r} takes options {list(fm.options)}, not {sorted(unknown)}")
    groups = _resolve(model, fused_sets)
    opts = dict(options)
    installed = [fm.install(model, group, opts) for group in groups]
    return RetrainHandle(model, fm, installed)


def unique_parameter_count(model: nn.Module) -> int:
    """Number of scalars in the model's distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "RETRAIN_MODES",
    "RetrainHandle",
    "RetrainMode",
    "gaussian_fit",
    "gaussian_kl_to_mixture",
    "install_retrain_mode",
    "is_fusable_layer",
    "js_gamma",
    "layer_positions",
    "output_dim",
    "unique_parameter_count",
]
