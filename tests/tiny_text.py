"""A fixed English text and a tiny byte-level BPE tokenizer trained on it (no downloads)."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "Layer fusion compresses a trained network by merging similar layers. "
    "The quick brown fox jumps over the lazy dog. Tied weights are stored once. "
) * 20


def tiny_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (~300 tokens) trained on a fixed text, saved to ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, special_tokens=["<pad>", "<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(folder)
    return tok
