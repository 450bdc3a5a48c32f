"""Zero-shot task scores through EleutherAI's lm-evaluation-harness (``lm-eval``), offline.

lfgraph does not reimplement the harness: it hands the (compressed) Hugging Face model and
its tokenizer to ``lm_eval.models.huggingface.HFLM`` and runs ``lm_eval.simple_evaluate``
on tasks the harness knows or on local task files (``include_path``: a folder of task
YAMLs whose ``dataset_path: json`` points at local JSONL files, so nothing is downloaded).
:func:`write_cloze_task` writes such a task from any local text.

``lm-eval`` is an optional extra (``pip install 'lfgraph[lm-eval]'``); without it the
functions here raise one ``LfgraphError`` that says so.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from lfgraph.errors import LfgraphError
from lfgraph.fileio import write_text_atomic

INSTALL_HINT = "the zero-shot tasks run through lm-eval: pip install 'lfgraph[lm-eval]'"


def _harness() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LfgraphError(INSTALL_HINT) from None
    return lm_eval, HFLM, TaskManager


def hf_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face ``PreTrainedModel`` inside lfgraph's wrappers (``CausalLMLogits``)."""
    from lfgraph.models import inner_hf_model

    inner = inner_hf_model(model)
    if inner is None:
        raise LfgraphError(f"{type(model).__name__} is not a Hugging Face model: lm-eval tasks need one")
    return inner


def task_scores(model: nn.Module, tokenizer: Any, tasks: Sequence[str], include_path: str | Path | None = None,
                limit: int | None = None, batch_size: int = 4, lower_is_better: dict[str, bool] | None = None) -> dict[str, float]:
    """``{"<task>_<metric>": value}`` for every metric lm-eval reports (``acc``,
    ``acc_norm``, ``word_perplexity``...; standard errors left out), see :func:`read_results`.
    ``limit``: at most this many examples per task. ``lower_is_better``, when given, is
    filled with each metric's direction as the task declares it."""
    lm_eval, HFLM, TaskManager = _harness()
    if include_path is not None and not Path(include_path).is_dir():
        raise LfgraphError(f"lm-eval task folder {include_path} does not exist: give a folder of task YAML files")
    hf = hf_model_of(model)
    was = hf.training
    try:
        hf.eval()
        manager = TaskManager(include_path=str(include_path) if include_path else None)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise LfgraphError(f"lm-eval does not know task(s) {', '.join(unknown)}: check the names or the --lm-eval-include folder")
        lm = HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=batch_size, device=str(next(hf.parameters()).device))
        result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                                         verbosity="ERROR")
    finally:
        hf.train(was)
    scores, lower = read_results(result or {})
    if lower_is_better is not None:
        lower_is_better.update(lower)
    return scores


def read_results(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    """(scores, lower_is_better) from ``lm_eval.simple_evaluate``'s result: every numeric
    metric of ``result["results"]`` (keys ``"<metric>,<filter>"``; standard errors and
    aliases left out) as ``"<task>_<metric>"``, and its direction from
    ``result["higher_is_better"]`` (higher is better where a task does not say)."""
    scores: dict[str, float] = {}
    lower: dict[str, bool] = {}
    directions = result.get("higher_is_better", {})
    for task, metrics in result.get("results", {}).items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name and name != "alias":
                scores[f"{task}_{name}"] = float(value)
                lower[f"{task}_{name}"] = directions.get(task, {}).get(name, True) is False
    return scores, lower


def write_cloze_task(text: str, out_dir: str | Path, name: str, n: int = 200, choices: int = 4, context_words: int = 48,
                     seed: int = 0) -> Path:
    """Write an lm-eval multiple-choice task ``name`` to ``out_dir`` (``name.yaml`` and
    ``name.jsonl``): ``n`` passages of ``context_words`` words from ``text``, each followed
    by its true next word and ``choices − 1`` other words drawn from the same text. The
    model is right when it gives the true word the highest log-likelihood (``acc``), or the
    highest per-character log-likelihood (``acc_norm``). Returns the YAML path."""
    words = re.findall(r"\S+", text)
    alphabetic = sorted({w for w in words if w.isalpha() and len(w) > 2})
    need = context_words + 1
    if len(words) < need * 2 or len(alphabetic) < choices:
        raise LfgraphError(f"the text has {len(words)} words: a cloze task needs a few thousand")
    rng = random.Random(seed)
    items = []
    starts = [i for i in range(0, len(words) - need) if words[i + context_words].isalpha() and len(words[i + context_words]) > 2]
    for start in rng.sample(starts, min(n, len(starts))):
        true = words[start + context_words]
        others = rng.sample([w for w in alphabetic if w != true], choices - 1)
        options = others + [true]
        rng.shuffle(options)
        items.append({"context": " ".join(words[start : start + context_words]), "choices": options, "answer": options.index(true)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    write_text_atomic(data, "".join(json.dumps(i) + "\n" for i in items))
    yaml = out / f"{name}.yaml"
    write_text_atomic(yaml, "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",  # quoted: any path is one YAML string
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{answer}}"',
        'target_delimiter: " "',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ]))
    return yaml
