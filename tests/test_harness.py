"""lm-eval tasks: the cloze task file lfgraph writes, the harness's score against a second
computation, and one clear line when lm-eval is not installed (the default install)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lfgraph.errors import LfgraphError
from lfgraph.harness import task_scores, write_cloze_task
from lfgraph.models import CausalLMLogits
from lfgraph.zoo import tiny_llama
from tiny_text import TEXT, tiny_tokenizer

LICENSE = "/usr/share/common-licenses/GPL-3"


def _text() -> str:
    try:
        return open(LICENSE).read()
    except OSError:
        return TEXT * 10


def test_cloze_items_hold_the_true_next_word(tmp_path) -> None:
    text = _text()
    yaml = write_cloze_task(text, tmp_path, "cloze", n=30, choices=4, context_words=12)
    items = [json.loads(line) for line in (tmp_path / "cloze.jsonl").read_text().splitlines()]
    assert len(items) == 30 and "output_type: multiple_choice" in yaml.read_text()
    words = text.split()
    joined = " ".join(words)
    for it in items:
        assert len(it["choices"]) == len(set(it["choices"])) == 4
        # the context followed by the answer is a passage of the text
        assert f"{it['context']} {it['choices'][it['answer']]}" in joined
    with pytest.raises(LfgraphError, match="cloze task needs"):
        write_cloze_task("too short", tmp_path, "x")


def test_missing_lm_eval_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(LfgraphError, match=r"pip install 'lfgraph\[lm-eval\]'"):
        task_scores(torch.nn.Linear(2, 2), None, ["x"])


def test_study_refuses_lm_eval_on_the_cnn_track_before_loading(capsys) -> None:
    from lfgraph.cli import main

    assert main(["study", "cnn", "--lm-eval", "cloze"]) == 2
    assert "lfgraph: error" in capsys.readouterr().err


def test_harness_accuracy_equals_a_second_computation(tmp_path) -> None:
    """``acc`` is the share of items whose true word has the highest summed log-likelihood
    after the context (lm-eval's multiple-choice rule), recomputed here with the model."""
    pytest.importorskip("lm_eval")
    tok = tiny_tokenizer(tmp_path / "tok")
    model = CausalLMLogits(tiny_llama(layers=2, vocab_size=len(tok))).eval()
    write_cloze_task(TEXT * 5, tmp_path / "tasks", "cloze_tiny", n=12, choices=3, context_words=8)
    got = task_scores(model, tok, ["cloze_tiny"], tmp_path / "tasks")
    items = [json.loads(line) for line in (tmp_path / "tasks" / "cloze_tiny.jsonl").read_text().splitlines()]
    right = 0
    with torch.no_grad():
        for it in items:
            ctx = tok(it["context"])["input_ids"]
            lls = []
            for c in it["choices"]:
                cont = tok(it["context"] + " " + c)["input_ids"][len(ctx):]
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
                lls.append(float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont))))
            right += int(max(range(len(lls)), key=lls.__getitem__) == it["answer"])
    assert got["cloze_tiny_acc"] == pytest.approx(right / len(items))
    assert 0.0 <= got["cloze_tiny_acc_norm"] <= 1.0
