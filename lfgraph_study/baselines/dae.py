"""Denoising-autoencoder student rollout (the paper's ``dae`` baseline).

The network is rebuilt layer by layer from the input to the output ("student rollout").
For layer ``ℓ`` with weight ``W`` (``out × d``, convolutions on their ``d = in·kh·kw``
input patches) and bias ``b``:

1. Its inputs ``x`` are recorded by running ``data`` through the network *as compressed so
   far* (the layers below ``ℓ`` already replaced), so each autoencoder also absorbs the
   cascade of approximation errors from below.
2. A one-hidden-layer denoising autoencoder is fitted on them: encoder
   ``h = act(E x̃ + c)`` with ``E`` ``(r × d)``, decoder ``x̂ = D h + e`` with ``D``
   ``(d × r)``, input noise ``x̃ = x + noise · std(x) · ε`` (per feature), minimising the
   expected mean squared error ``‖x̂ − x‖²``: in closed form for the identity activation
   (reduced-rank ridge regression, see :func:`fit_dae`), by Adam from that solution
   otherwise.
3. The encoder takes the layer's place and the decoder is folded into the layer, so the
   network stays dense:
   ``W x + b ≈ W (D h + e) + b = (W D) h + (W e + b)``, i.e. two dense layers
   ``x ↦ (W D) · act(E x + c) + (W e + b)`` (for a convolution: an ``r``-channel
   convolution with the original kernel, stride, padding and dilation, then a 1×1
   convolution).

The bottleneck ``r`` is chosen like the ``svd`` rank, so that the two dense layers hold
``(1 − fraction)`` of the layer's weights; a layer where ``r ≥ min(out, d)`` stays as it is.
``act`` defaults to the identity (then the replacement is a data-fitted, denoised rank-``r``
factorization of the layer); ``activation="tanh"``/``"relu"``/... uses the network's own
nonlinearity, as the paper does, at the cost of a nonlinearity inside the layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .pruning import progress_over
from lfgraph.errors import LfgraphError
from .svd import can_factorize, factorized_layer, factorized_weight_count, rank_for, replace_module, weight_matrix

if TYPE_CHECKING:
    from .layers import LayerRef

ACTIVATIONS = {"identity": None, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}


class _Captured(Exception):
    """Raised from a hook to stop a forward pass once the layer's input is recorded."""


def _inputs_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise LfgraphError(f"dae data must yield input tensors or (inputs, targets) pairs, got {type(batch).__name__}")


def execution_order(model: nn.Module, layers: list["LayerRef"], batch: torch.Tensor) -> list["LayerRef"]:
    """``layers`` sorted by when they first run in a forward pass (unused ones last)."""
    first_call: dict[int, int] = {}
    handles = []
    for ref in layers:
        def hook(module: nn.Module, args: Any, key: int = id(ref.module)) -> None:
            first_call.setdefault(key, len(first_call))

        handles.append(ref.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return sorted(layers, key=lambda r: first_call.get(id(r.module), len(layers)))


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of what the layer's weight matrix multiplies: features or conv patches."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def record_inputs(model: nn.Module, module: nn.Module, batches: list[torch.Tensor], max_samples: int, seed: int) -> torch.Tensor:
    """Up to ``max_samples`` input rows (features or patches) of ``module`` on ``batches``."""
    rows: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: Any) -> None:
        rows.append(_patches(module, args[0].detach()).float())
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                model(batch)
            except _Captured:
                pass
            if sum(r.shape[0] for r in rows) >= 4 * max_samples:
                break
    finally:
        handle.remove()
    if not rows:
        raise LfgraphError(f"the data never reaches layer {type(module).__name__}: check the input batches")
    x = torch.cat(rows)
    if x.shape[0] > max_samples:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=g)[:max_samples]]
    return x


def fit_dae(
    x: torch.Tensor, r: int, activation: nn.Module | None = None, noise: float = 0.1, steps: int = 200, lr: float = 1e-3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a denoising autoencoder with bottleneck ``r`` on rows ``x`` ``(N, d)``.

    Returns ``(E, c, D, e)``: encoder ``(r, d)`` and bias ``(r,)``, decoder ``(d, r)`` and
    bias ``(d,)`` (float32), minimising ``E_ε ‖D act(E x̃ + c) + e − x‖²`` with
    ``x̃ = x + noise · std(x) · ε``.

    With the identity activation the optimum is closed-form (reduced-rank ridge
    regression): with ``C = cov(x)`` and noise covariance ``Nσ = diag(noise² std²)``, the
    best unconstrained map is ``M = C (C + Nσ)⁻¹`` and the best rank-``r`` one is
    ``V_r V_rᵀ M`` with ``V_r`` the top eigenvectors of ``M (C + Nσ) Mᵀ = C (C + Nσ)⁻¹ C``;
    so ``D = V_r``, ``E = V_rᵀ M``, ``c = −E μ``, ``e = μ``. With another activation this
    is the starting point for ``steps`` Adam steps on freshly noised inputs.
    """
    x64 = x.to(torch.float64)
    mu = x64.mean(0)
    xc = x64 - mu
    cov = xc.t() @ xc / max(x64.shape[0], 1)
    var = torch.diagonal(cov).clamp_min(0)
    # a tiny ridge keeps C + Nσ invertible when a feature never varies (padding, dead units)
    ridge = 1e-8 * float(var.mean()) + 1e-12
    noisy_cov = cov + torch.diag(noise**2 * var + ridge)
    m = torch.linalg.solve(noisy_cov, cov).t()  # C (C + Nσ)^-1; both symmetric
    target = m @ cov
    evals, evecs = torch.linalg.eigh((target + target.t()) / 2)
    v = evecs[:, torch.argsort(evals, descending=True)[:r]]  # (d, r)
    enc_w, dec_w = v.t() @ m, v
    enc_b, dec_b = -(enc_w @ mu), mu
    if activation is None:
        return enc_w.float(), enc_b.float(), dec_w.float(), dec_b.float()
    params = [nn.Parameter(t.float().clone()) for t in (enc_w, enc_b, dec_w, dec_b)]
    x = x.float()
    std = x.std(0, unbiased=False)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            noisy = x + noise * std * torch.randn(x.shape, generator=g)
            recon = activation(noisy @ params[0].t() + params[1]) @ params[2].t() + params[3]
            loss = F.mse_loss(recon, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tuple(p.detach() for p in params)  # type: ignore[return-value]


def _replacement(module: nn.Module, enc_w: torch.Tensor, enc_b: torch.Tensor, dec_w: torch.Tensor, dec_b: torch.Tensor, activation: nn.Module | None) -> nn.Sequential:
    """Encoder in the layer's place, decoder folded into the layer (see module docstring)."""
    w = weight_matrix(module).float()  # (out, d)
    b = module.bias.detach().float() if getattr(module, "bias", None) is not None else torch.zeros(w.shape[0])
    return factorized_layer(module, enc_w, w @ dec_w, enc_b, w @ dec_b + b, activation)


@torch.no_grad()
def compress_dae(
    model: nn.Module,
    layers: list["LayerRef"],
    fraction: float,
    data: Iterable[Any] | None = None,
    progress: bool = False,
    activation: str = "identity",
    noise: float = 0.1,
    steps: int = 200,
    lr: float = 1e-3,
    max_samples: int = 8192,
    max_batches: int = 8,
    seed: int = 0,
) -> tuple[nn.Module, float]:
    """Student rollout: replace every layer, input to output, by its DAE encoder + folded layer.

    Expects ``data`` batches the model accepts (input tensors or ``(inputs, targets)``);
    the first ``max_batches`` are used. Modifies ``model`` in place (eval mode). Layers
    that are tied, grouped or non-2-D convolutions, or too small to shrink, stay.
    The achieved fraction is ``1 − (weights after) / (weights before)``.
    """
    if data is None:
        raise LfgraphError("dae fits each layer on its inputs: pass data=<a list of input batches>")
    if activation not in ACTIVATIONS:
        raise LfgraphError(f"unknown dae activation {activation!r}: choose one of {sorted(ACTIVATIONS)}")
    device = next(model.parameters()).device
    batches = []
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        batches.append(_inputs_of(batch).to(device))
    if not batches:
        raise LfgraphError("dae data yielded no batches: pass a non-empty list of input batches")
    model.eval()
    ordered = execution_order(model, layers, batches[0])
    it = progress_over(ordered, progress, "dae rollout")
    before = after = 0
    for ref in it:
        module = ref.module
        n = ref.weight_count
        before += n
        r = rank_for(module, fraction)
        supported = can_factorize(module) and (isinstance(module, nn.Conv2d) or not isinstance(module, (nn.Conv1d, nn.Conv3d)))
        if ref.users > 1 or not supported or r >= min(weight_matrix(module).shape):
            after += n
            continue
        x = record_inputs(model, module, batches, max_samples, seed).cpu()
        act_cls = ACTIVATIONS[activation]
        enc_w, enc_b, dec_w, dec_b = fit_dae(x, r, act_cls() if act_cls else None, noise, steps, lr, seed)
        new = _replacement(module, enc_w, enc_b, dec_w, dec_b, act_cls() if act_cls else None)
        replace_module(model, ref.path, new.to(device))
        after += factorized_weight_count(new)
    return model, 1.0 - after / max(before, 1)
