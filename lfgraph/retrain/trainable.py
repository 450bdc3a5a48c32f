"""What healing trains: every parameter, the blocks next to each removed run, or LoRA adapters.

``neighbors`` reads the plan: under ``merge`` the blocks that survive right before and right
after each removed run (and the run's kept block) train, everything else is frozen; under
``tie`` the layers that share a weight train. ``lora`` wraps the linear layers with
``peft`` low-rank adapters (:func:`add_lora`) that :func:`merge_lora` folds back into plain
weights before the model is returned or exported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import LfgraphError
from ..plan import FusionPlan

#: Trainable sets; the CLI's ``--trainable`` choices come from here.
TRAINABLE_SETS = ("all", "neighbors", "lora")


def _container(model: nn.Module, container: str) -> tuple[str, nn.Module]:
    """The block container of a plan's names inside ``model`` (the names may carry a
    wrapper prefix such as ``model.`` that ``model`` itself lacks)."""
    parts = container.split(".")
    for i in range(len(parts)):
        path = ".".join(parts[i:])
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    raise LfgraphError(f"the plan's block stack {container!r} is not in this model: heal the model the plan was applied to")


def neighbor_blocks(model: nn.Module, plan: FusionPlan) -> list[str]:
    """Module paths (in the rewritten ``model``) of the blocks next to each removed run.

    Expects ``model`` to be ``plan`` applied under ``merge`` (absorbed blocks gone, the
    survivors renumbered 0..n−1). Guarantees: sorted, unique paths; for a run of removed
    blocks ``[a, b]`` the surviving blocks ``a − 1`` and ``b + 1`` (old numbering) and the
    fusion's kept block, each in the new numbering.
    """
    if plan.mode != "merge":
        raise LfgraphError("neighbor blocks exist for merge plans; a tie plan trains its tied layers")
    removed = plan.absorbed
    if not removed:
        return []
    container = removed[0].rpartition(".")[0]
    path, stack = _container(model, container)
    old = lambda name: int(name.rpartition(".")[2])  # noqa: E731
    gone = {old(n) for n in removed}
    n_before = len(stack) + len(gone)
    survivors = [i for i in range(n_before) if i not in gone]
    new_index = {o: k for k, o in enumerate(survivors)}
    chosen: set[int] = set()
    for f in plan.fusions:
        run = sorted(old(a) for a in f.absorb)
        for i in range(min(run) - 1, -1, -1):
            if i in new_index:
                chosen.add(new_index[i])
                break
        for i in range(max(run) + 1, n_before):
            if i in new_index:
                chosen.add(new_index[i])
                break
        if old(f.keep) in new_index:
            chosen.add(new_index[old(f.keep)])
    return [f"{path}.{k}" for k in sorted(chosen)]


def tied_layers(model: nn.Module) -> list[str]:
    """Paths of modules whose weight is shared with another module (a tie plan's result)."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            users.setdefault(id(w), []).append(name)
    return sorted(n for names in users.values() if len(names) > 1 for n in names)


def freeze_except(model: nn.Module, prefixes: list[str]) -> list[nn.Parameter]:
    """Set ``requires_grad`` on exactly the parameters under ``prefixes``; return them.

    A parameter shared between a trained and a frozen module (tied weights) trains.
    """
    if not prefixes:
        raise LfgraphError("nothing to train: the plan names no neighbouring blocks (use --trainable all)")
    train_ids = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
            train_ids.add(id(p))
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) in train_ids)
        if id(p) in train_ids:
            params.append(p)
    return params


def lora_targets(model: nn.Module) -> list[str]:
    """Full paths of the ``nn.Linear`` layers LoRA adapts: all but an output head whose
    weight is shared with an embedding (adapting it would untie the embedding)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in embedding_weights]


def add_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0) -> nn.Module:
    """``model`` with ``peft`` LoRA adapters on its linear layers (a ``PeftModel``); only the
    adapters train. Modifies ``model`` in place (peft injects the adapters into it)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model)
    if not targets:
        raise LfgraphError(f"{type(model).__name__} has no nn.Linear layers for LoRA: use --trainable all")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, bias="none")
    return get_peft_model(model, config)


def merge_lora(model: Any) -> nn.Module:
    """Fold LoRA adapters into the base weights (``merge_and_unload``): a plain module again."""
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


__all__ = ["TRAINABLE_SETS", "add_lora", "freeze_except", "lora_targets", "merge_lora", "neighbor_blocks", "tied_layers"]
