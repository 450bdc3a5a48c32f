"""lm-eval tasks: the cloze task file lfgraph writes, the harness's score against a second
computation, and one clear line when lm-eval is not installed (the default install)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lfgraph.errors import LfgraphError
from lfgraph_study.harness import read_results, task_scores, write_cloze_task
from lfgraph.models import CausalLMLogits
from lfgraph_study.zoo import tiny_llama
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


def test_task_file_names_its_data_in_any_folder(tmp_path) -> None:
    """The YAML's data path is one string even where the folder name holds ': ' or '#'."""
    yaml = pytest.importorskip("yaml")
    folder = tmp_path / "odd: name #1"
    path = write_cloze_task(_text(), folder, "cloze", n=5)
    spec = yaml.safe_load(path.read_text())
    assert spec["dataset_kwargs"]["data_files"]["test"] == str((folder / "cloze.jsonl").resolve())


def test_results_keep_each_metric_and_its_declared_direction() -> None:
    """lm-eval's result layout: ``"<metric>,<filter>"`` keys, standard errors and aliases
    beside them, directions under ``higher_is_better``."""
    result = {
        "results": {
            "cloze": {"alias": "cloze", "acc,none": 0.75, "acc_stderr,none": 0.02, "acc_norm,none": 0.5},
            "wikitext": {"word_perplexity,none": 31.5, "word_perplexity_stderr,none": "N/A", "bits_per_byte,none": 1.1},
        },
        "higher_is_better": {"cloze": {"acc": True, "acc_norm": True}, "wikitext": {"word_perplexity": False, "bits_per_byte": False}},
    }
    scores, lower = read_results(result)
    assert scores == {"cloze_acc": 0.75, "cloze_acc_norm": 0.5, "wikitext_word_perplexity": 31.5, "wikitext_bits_per_byte": 1.1}
    assert lower == {"cloze_acc": False, "cloze_acc_norm": False, "wikitext_word_perplexity": True, "wikitext_bits_per_byte": True}


def test_missing_lm_eval_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(LfgraphError, match=r"pip install 'lfgraph\[lm-eval\]'"):
        task_scores(torch.nn.Linear(2, 2), None, ["x"])


def test_study_refuses_lm_eval_on_the_cnn_track_before_loading(capsys) -> None:
    from lfgraph_study.cli import main

    assert main(["cnn", "--lm-eval", "cloze"]) == 2
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
