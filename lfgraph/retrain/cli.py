"""``lfgraph heal``: rewrite a model (or take a rewritten one) and heal it, from the command line.

Registered by the main CLI through :func:`add_subcommand` / :func:`run`; also runnable on its
own (``python -m lfgraph.retrain.cli heal …``), which is how ``torchrun`` starts it::

    lfgraph heal smollm2 -o out/smollm2-healed --target 0.25 --steps 200
    torchrun --nproc_per_node 2 -m lfgraph.retrain.cli heal smollm2 -o out/h --strategy fsdp

:func:`heal_compressed` is the stage ``compress --heal STEPS`` calls on its rewritten model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LfgraphError
from ..fileio import check_outputs, commit_folder, signals_as_interrupts, staging_folder
from ..options import COUNT, EVERY, FRACTION, NON_NEGATIVE, POSITIVE, SEED, SEQ_LEN, STEPS, WARMUP, Parser, add_overwrite_option
from ..plan import FusionPlan
from ..registry import fusion_rule
from .stage import HEAL_DEFAULTS, heal_compressed, max_positions, training_windows
from .distributed import STRATEGIES
from .heal import HEAL_OBJECTIVES
from .modes import RETRAIN_MODES
from .trainable import TRAINABLE_SETS

# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The healing options (shared by ``heal`` and, under other names, ``compress --heal``)."""
    g = p.add_argument_group("healing")
    g.add_argument("--steps", type=STEPS, default=HEAL_DEFAULTS["steps"], help="optimizer steps (default 120)")
    g.add_argument("--trainable", choices=TRAINABLE_SETS, default=HEAL_DEFAULTS["trainable"],
                   help="what trains: all parameters, the blocks next to each removed run, or LoRA adapters merged back (default all)")
    g.add_argument("--lr", type=POSITIVE, default=None, help="peak learning rate (default 1e-4; 1e-3 for --trainable lora)")
    g.add_argument("--batch-size", type=COUNT, default=HEAL_DEFAULTS["batch_size"], help="windows per step, all processes together (default 4)")
    g.add_argument("--accumulation", type=COUNT, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--seq-len", type=SEQ_LEN, default=HEAL_DEFAULTS["seq_len"], help="tokens per training window (default 128)")
    g.add_argument("--windows", type=COUNT, default=HEAL_DEFAULTS["windows"], help="training windows drawn from the text (default 128)")
    g.add_argument("--text", default=None, help="training text file or folder of *.txt (default: the bundled calibration text)")
    g.add_argument("--objective", choices=HEAL_OBJECTIVES, default="auto", help="default auto: distillation from the original model")
    g.add_argument("--temperature", type=POSITIVE, default=2.0, help="distillation temperature (default 2)")
    g.add_argument("--hidden-weight", type=NON_NEGATIVE, default=0.0, help="weight of a hidden-state loss at matching depths (default 0: off)")
    g.add_argument("--warmup", type=WARMUP, default=0.1, help="warm-up: a fraction of --steps, or a step count >= 1 (default 0.1)")
    g.add_argument("--clip", type=NON_NEGATIVE, default=1.0, help="gradient-norm clip (default 1; 0 = off)")
    g.add_argument("--lora-rank", type=COUNT, default=16, help="LoRA rank (default 16)")
    g.add_argument("--retrain-mode", choices=sorted(RETRAIN_MODES), default=None,
                   help="with --mode tie: train the tied sets under this retraining mode, tie at the end")
    g.add_argument("--eval-every", type=EVERY, default=0, help="held-out perplexity every K steps, best state kept (default 0: off)")
    g.add_argument("--eval-windows", type=COUNT, default=4, help="held-out windows for --eval-every (default 4)")
    g.add_argument("--checkpoint-dir", default=None, help="write a checkpoint here every --checkpoint-every steps")
    g.add_argument("--checkpoint-every", type=EVERY, default=0, help="default: --eval-every, else a tenth of --steps")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir (an error when there is none)")
    g.add_argument("--resume-if-present", action="store_true", help="continue from the checkpoint in --checkpoint-dir when there is one, else start")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--strategy", choices=STRATEGIES, default="auto", help="under torchrun: ddp (auto) or fsdp")


def add_compress_options(p: argparse.ArgumentParser) -> None:
    """``compress``'s healing options (``--heal STEPS`` and ``--heal-*``); read them back with
    :func:`compress_heal_options`."""
    g = p.add_argument_group("healing (fine-tune the rewritten model before export)")
    g.add_argument("--heal", type=STEPS, default=0, metavar="STEPS", help="heal for STEPS optimizer steps by distillation from the original (default 0: off)")
    # the --heal-* defaults are None here and filled in by compress_heal_options, so that one
    # given without --heal is seen (and refused) rather than ignored
    g.add_argument("--heal-trainable", choices=TRAINABLE_SETS, default=None, help="what trains (default all)")
    g.add_argument("--heal-lr", type=POSITIVE, default=None, help="peak learning rate (default 1e-4; 1e-3 for lora)")
    g.add_argument("--heal-batch-size", type=COUNT, default=None, help="windows per step (default 4)")
    g.add_argument("--heal-seq-len", type=SEQ_LEN, default=None, help="tokens per training window (default 128)")
    g.add_argument("--heal-windows", type=COUNT, default=None, help="training windows from the calibration text (default 128)")
    g.add_argument("--heal-eval-every", type=EVERY, default=None, help="held-out perplexity every K steps, best state kept")
    g.add_argument("--heal-checkpoint-dir", default=None, help="checkpoint the healing here")
    g.add_argument("--heal-resume", action="store_true", help="continue healing from --heal-checkpoint-dir (an error when there is no checkpoint)")
    g.add_argument("--heal-resume-if-present", action="store_true", help="continue from --heal-checkpoint-dir's checkpoint when there is one, else start")


#: compress's --heal-* options (argparse dest, flag)
_HEAL_FLAGS = [(f.replace("-", "_")[2:], f) for f in ("--heal-trainable", "--heal-lr", "--heal-batch-size", "--heal-seq-len",
                                                        "--heal-windows", "--heal-eval-every", "--heal-checkpoint-dir",
                                                        "--heal-resume", "--heal-resume-if-present")]


def compress_heal_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`heal_compressed` from :func:`add_compress_options`' flags
    (``steps``, ``windows`` and ``seq_len`` included; the caller adds the training and
    evaluation windows). A ``--heal-*`` option without ``--heal`` is refused: it would be
    ignored."""
    if not args.heal:
        given = [flag for dest, flag in _HEAL_FLAGS if getattr(args, dest) not in (None, False)]
        if given:
            raise LfgraphError(f"{', '.join(given)} {'says' if len(given) == 1 else 'say'} how --heal trains, and --heal is not "
                               "given: add --heal STEPS, or drop "
                               f"{'it' if len(given) == 1 else 'them'}")

    def value(dest: str, default: Any) -> Any:
        v = getattr(args, dest)
        return default if v is None else v

    return {"steps": args.heal, "trainable": value("heal_trainable", HEAL_DEFAULTS["trainable"]), "lr": args.heal_lr,
            "batch_size": value("heal_batch_size", HEAL_DEFAULTS["batch_size"]), "eval_every": value("heal_eval_every", 0),
            "checkpoint_dir": args.heal_checkpoint_dir,
            "windows": value("heal_windows", HEAL_DEFAULTS["windows"]), "seq_len": value("heal_seq_len", HEAL_DEFAULTS["seq_len"]),
            "resume": resume_mode(args.heal_resume, args.heal_resume_if_present, args.heal_checkpoint_dir,
                                  "--heal-resume", "--heal-checkpoint-dir")}


def add_subcommand(subparsers: Any) -> None:
    """Register ``heal`` with the main CLI's subparsers."""
    from ..registry import FUSION_RULE_REGISTRY, SELECTION_REGISTRY, choices_help

    p = subparsers.add_parser("heal", help="rewrite a model and fine-tune it to recover what the rewrite lost",
                              description="Rewrite MODEL as compress would (or take an already rewritten model with "
                                          "--teacher), heal it by distillation from the original, and save the healed "
                                          "model as a Hugging Face folder. Runs under torchrun for DDP/FSDP.")
    p.add_argument("model", help="alias (smollm2), Hugging Face folder or .gguf; with --teacher: an already rewritten model folder")
    p.add_argument("-o", "--out", required=True, help="output folder for the healed model (Hugging Face format) and heal.json")
    p.add_argument("--teacher", default=None, help="the uncompressed model: MODEL is then healed as it is, without a rewrite")
    p.add_argument("--plan", default=None, help="apply this plan (JSON) instead of planning")
    p.add_argument("--target", type=FRACTION, default=0.25, help="share of blocks to remove (default 0.25)")
    p.add_argument("--mode", choices=["merge", "tie"], default="merge")
    p.add_argument("--select", choices=list(SELECTION_REGISTRY), default=None,
                   help=choices_help("selection (default: the model family's recipe)", SELECTION_REGISTRY))
    p.add_argument("--fuse", choices=list(FUSION_RULE_REGISTRY), default=None,
                   help=choices_help("fusion rule (default: the model family's recipe)", FUSION_RULE_REGISTRY))
    p.add_argument("--quiet", action="store_true")
    add_overwrite_option(p)
    add_arguments(p)


def resume_mode(resume: bool, if_present: bool, checkpoint_dir: str | None,
                flag: str = "--resume", dir_flag: str = "--checkpoint-dir") -> bool:
    """Whether to resume: ``--resume`` needs a checkpoint in ``--checkpoint-dir`` (a missing
    one is an error, not a silent fresh start); ``--resume-if-present`` resumes only when
    there is one. ``flag``/``dir_flag`` name the options as the subcommand calls them."""
    from .checkpoint import checkpoint_path

    if (resume or if_present) and not checkpoint_dir:
        raise LfgraphError(f"{flag} needs {dir_flag} (where the interrupted run wrote its checkpoints)")
    present = bool(checkpoint_dir) and checkpoint_path(checkpoint_dir).is_file()
    if resume and not present:
        raise LfgraphError(f"{flag}: there is no checkpoint in {checkpoint_dir} (no {checkpoint_path(checkpoint_dir).name}): "
                           f"check the folder, or use {flag}-if-present to start afresh when there is none")
    return present and (resume or if_present)


def _say(msg: str, quiet: bool) -> None:
    if not quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"lfgraph: {msg}", flush=True)


def _prepare(args: argparse.Namespace, text: str | None) -> tuple[Any, nn.Module, nn.Module, FusionPlan | None, list[list[str]], torch.Tensor]:
    """(loaded model for its tokenizer, teacher module, student module, plan, fused sets,
    training windows of ``text``).

    With ``--mode tie --retrain-mode M`` the student is the *untied* original and the fused
    sets are the plan's layer sets: the retraining mode trains them and ties them at the end
    (applying the tie first would leave nothing for the mode to do).
    """
    import copy

    from .. import pipeline

    if args.teacher:
        student_model = pipeline.load(args.model)
        teacher_model = pipeline.load(args.teacher)
        tokenizer = teacher_model.require_tokenizer("healing") if teacher_model.tokenizer is not None else student_model.require_tokenizer("healing")
        windows = training_windows(tokenizer, text, args.windows, args.seq_len, max_positions(student_model.module))
        return teacher_model, teacher_model.module, student_model.module, None, [], windows
    model = pipeline.load(args.model)
    windows = training_windows(model.require_tokenizer("healing"), text, args.windows, args.seq_len, max_positions(model.module))
    if model.family != "causal-lm":
        raise LfgraphError(f"{model.name} is a {model.family} model: lfgraph heal trains causal language models from the CLI; use lfgraph.retrain.heal in Python")
    graph = pipeline.trace(model)
    calibration = None
    if args.plan:
        plan = FusionPlan.load(args.plan)
        plan.check_applies_to(graph.fingerprint())
        if fusion_rule(plan.fuse).needs_calibration:
            calibration = pipeline.calibration_tokens(model)
    else:
        from ..model_types import CalibrationOptions
        from ..sources import TorchSource

        # compress's calibration defaults, the window no longer than the model's positions
        default = CalibrationOptions()
        options = CalibrationOptions(windows=default.windows, seq_len=min(default.seq_len, max_positions(model.module) or default.seq_len))
        recipe = pipeline.resolve_recipe(TorchSource(model), args.mode, args.select, args.fuse, args.target, "blocks", options)
        select, fuse = recipe.select, recipe.fuse
        if recipe.needs_calibration:
            calibration = TorchSource(model).calibration(options)
        _say(f"planning: {args.mode}, select {select}, fuse {fuse}, target {args.target}", args.quiet)
        plan = pipeline.plan_model(model, graph, args.target, mode=args.mode, select=select, fuse=fuse,
                                   calibration=calibration, progress=False)
    if plan.mode == "tie" and args.retrain_mode:
        sets = [[graph.node(n).ref or n for n in (f.keep, *f.absorb)] for f in plan.fusions]
        _say(f"{len(sets)} tie sets trained under retraining mode {args.retrain_mode}", args.quiet)
        return model, model.module, copy.deepcopy(model.module), plan, sets, windows
    if args.retrain_mode:
        raise LfgraphError("--retrain-mode trains tie sets: use it with --mode tie")
    _say(f"rewriting: {len(plan.fusions)} fusions", args.quiet)
    student = pipeline.rewrite(model, graph, plan, calibration=calibration, progress=False).model
    return model, model.module, student, plan, [], windows


def untied_copy(hf: nn.Module) -> tuple[nn.Module, list[list[str]]]:
    """``(hf, [])``, or for a tie plan's model a copy whose tied layers hold equal but separate
    tensors, plus the tied sets (parameter names).

    Hugging Face folders (safetensors) cannot store weights shared between layers (only the
    embedding/head tie the config declares), so a tied model is written untied: it computes
    the same function, and ``heal.json`` lists the sets; the ONNX export (``compress --heal``)
    stores each set once.
    """
    embedding = {id(m.weight) for m in hf.modules() if isinstance(m, nn.Embedding)}
    users: dict[int, list[str]] = {}
    for name, p in hf.named_parameters(remove_duplicate=False):
        if id(p) not in embedding:
            users.setdefault(id(p), []).append(name)
    tied = [names for names in users.values() if len(names) > 1]
    if not tied:
        return hf, []
    import copy

    out = copy.deepcopy(hf)
    for names in tied:
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            module = out.get_submodule(owner)
            setattr(module, attr, nn.Parameter(getattr(module, attr).detach().clone()))
    return out, tied


def save_healed(module: nn.Module, tokenizer: Any, out: str | Path, curve: dict[str, Any]) -> Path:
    """Write the healed model (Hugging Face folder) and ``heal.json`` to ``out`` atomically:
    into a temporary sibling folder that replaces ``out`` only when complete."""
    out = Path(out)
    if not out.parent.exists():
        raise LfgraphError(f"output folder {out.parent} does not exist: create it or choose another -o path")
    hf = getattr(module, "model", module)
    if not hasattr(hf, "save_pretrained"):
        raise LfgraphError(f"{type(module).__name__} is not a Hugging Face model: save it with torch.save in Python")
    hf, tied = untied_copy(hf)
    if tied:
        curve = {**curve, "tied_sets": tied}
    with staging_folder(out) as tmp:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "heal.json").write_text(json.dumps(curve, indent=1) + "\n", encoding="utf-8")
        commit_folder(tmp, out)
    return out


def run(args: argparse.Namespace) -> int:
    """``lfgraph heal``: 0 on success; user errors raise ``LfgraphError`` (the CLI prints one line)."""
    args.resume = resume_mode(args.resume, args.resume_if_present, args.checkpoint_dir)
    # every output checked before the model loads (numbers by their argparse rules)
    # a checkpoint folder resumed from is an input; otherwise it is an output like -o
    check_outputs({"-o": args.out, "--checkpoint-dir": None if args.resume else args.checkpoint_dir},
                  [args.model, args.teacher, args.plan, args.text], args.overwrite, folders=["-o", "--checkpoint-dir"])
    torch.manual_seed(args.seed)
    text = None
    if args.text:
        from ..calibration import load_calibration_text

        text = load_calibration_text(args.text)
    _say("loading the model", args.quiet)
    # the data is checked before the (slow) planning and rewriting
    model, teacher, student, plan, fused_sets, windows = _prepare(args, text)
    eval_windows = None
    if args.eval_every:
        from ..calibration import heldout_windows

        eval_windows = heldout_windows(model.tokenizer, args.eval_windows, args.seq_len)
    _say(f"healing: {args.steps} steps, trainable {args.trainable}, {len(windows)} windows of {args.seq_len} tokens", args.quiet)
    healed, curve = heal_compressed(
        model, student, plan, windows, args.steps, trainable=args.trainable, lr=args.lr, batch_size=args.batch_size,
        eval_windows=eval_windows, eval_every=args.eval_every, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        progress=not args.quiet, accumulation=args.accumulation, objective=args.objective, temperature=args.temperature,
        hidden_weight=args.hidden_weight, warmup=args.warmup, clip=args.clip, lora_rank=args.lora_rank,
        retrain_mode=args.retrain_mode, fused_sets=fused_sets,
        checkpoint_every=args.checkpoint_every, seed=args.seed, strategy=args.strategy,
    )
    curve["plan"] = json.loads(plan.to_json()) if plan is not None else None
    if int(os.environ.get("RANK", "0")) == 0:
        save_healed(healed, model.tokenizer, args.out, curve)
        last = curve["train_loss"][-1] if curve["train_loss"] else float("nan")
        _say(f"healed model written to {args.out} (final training loss {last:.4f}, {curve['tokens_per_second']:.0f} tokens/s)", args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with only ``heal`` (for ``python -m lfgraph.retrain.cli`` and torchrun)."""
    parser = Parser(prog="lfgraph")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        with signals_as_interrupts():
            return run(build_parser().parse_args(argv))
    except LfgraphError as e:
        print(f"lfgraph: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the staging folders are gone by now
        signum = int(getattr(e, "signum", 2))
        print("lfgraph: interrupted; nothing was left at the output paths", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
