"""Calibration data: disjoint calibration / held-out windows, user text, vision samples,
perplexity and activation capture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfgraph import calibration as C
from lfgraph.errors import LfgraphError

torch.set_num_threads(2)


class CharTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per character (code point mod 256)."""

    name_or_path = "chars"

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, add_special_tokens: bool = True) -> "CharTokenizer._Out":
        return self._Out([ord(c) % 256 for c in text])

    class _Out:
        def __init__(self, ids: list[int]) -> None:
            self.input_ids = ids


def test_corpus_is_deterministic_and_split_is_disjoint() -> None:
    text = C.corpus_text()
    assert text == C.corpus_text() and len(text) > 100_000
    tok = CharTokenizer()
    pool, held = C.corpus_split(tok)
    assert len(pool) + len(held) == len(text)
    assert len(pool) == int(len(text) * C.CALIBRATION_FRACTION)


def test_windows_never_overlap_between_calibration_and_heldout() -> None:
    tok = CharTokenizer()
    pool, held = C.corpus_split(tok)
    # the same windows drawn from position indices instead of tokens tell where they came from
    n_cal, n_held, seq = 40, 20, 512
    cal_pos = C.windows_from_tokens(torch.arange(len(pool)), n_cal, seq)
    held_pos = C.windows_from_tokens(torch.arange(len(held)), n_held, seq) + len(pool)
    cal_set, held_set = set(cal_pos.flatten().tolist()), set(held_pos.flatten().tolist())
    assert len(cal_set) == n_cal * seq and len(held_set) == n_held * seq  # no overlap within either
    assert not cal_set & held_set
    # and the token windows are those slices
    assert torch.equal(C.calibration_windows(tok, n_cal, seq), pool[cal_pos])
    assert torch.equal(C.heldout_windows(tok, n_held, seq), torch.cat([pool, held])[held_pos])


def test_too_many_windows_is_a_clear_error() -> None:
    with pytest.raises(LfgraphError, match="fewer"):
        C.windows_from_tokens(torch.arange(100), 3, 40)


def test_user_text(tmp_path) -> None:
    with pytest.raises(LfgraphError, match="does not exist"):
        C.load_calibration_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(LfgraphError, match="empty"):
        C.load_calibration_text(empty)
    (tmp_path / "a.txt").write_text("hello world " * 50)
    text = C.load_calibration_text(tmp_path / "a.txt")
    windows = C.calibration_windows(CharTokenizer(), 4, 16, text=text)
    assert windows.shape == (4, 16) and windows[0, 0] == ord("h")
    assert C.load_calibration_text(tmp_path).startswith("hello")  # a folder of *.txt files


def test_vision_samples_from_tensor_and_dataset() -> None:
    x = torch.randn(10, 3, 4, 4)
    ds = torch.utils.data.TensorDataset(x, torch.arange(10))
    assert torch.equal(C.vision_samples(x, 4), x[:4])
    assert torch.equal(C.vision_samples(ds, 6), x[:6])
    with pytest.raises(LfgraphError):
        C.vision_samples([1, 2, 3])  # type: ignore[arg-type]


class Uniform(nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 50)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    ids = torch.randint(0, 50, (5, 9))
    assert C.perplexity(Uniform(), ids, batch_size=2) == pytest.approx(50.0)
    assert C.mean_nll(Uniform(), ids) == pytest.approx(math.log(50.0))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_activation_capture_and_run_from() -> None:
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(3, 4)
    states, _ = C.stack_hidden_states(model, list(model.layers), x)
    assert len(states) == 4
    torch.testing.assert_close(states[2], model.layers[1](model.layers[0](x)))
    hidden, kwargs = C.capture_block_input(model, model.layers[2], x)
    torch.testing.assert_close(hidden, states[2])
    assert kwargs == {}
    # skipping layer 1: feed the input of layer 1 straight to layer 2
    out = C.run_from(model, "layers", states[1], [model.layers[2]], x)
    torch.testing.assert_close(out, model.head(model.layers[2](states[1])))
    assert isinstance(model.layers, nn.ModuleList) and len(model.layers) == 3  # restored
