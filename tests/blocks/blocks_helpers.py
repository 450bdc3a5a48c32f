"""Tiny decoder checkpoints for the block-by-block tests, saved as Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_text import tiny_tokenizer


def tiny_decoder(arch: str, layers: int, vocab_size: int, hidden: int = 64, intermediate: int = 128, seed: int = 0) -> torch.nn.Module:
    """A random ``LlamaForCausalLM`` (tied embeddings) or ``Qwen2ForCausalLM`` (q/k/v biases,
    untied head, per-layer ``layer_types``)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)).eval()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # random biases, so that the bias path is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.02)
    return model


def save_folder(folder: Path, arch: str = "llama", layers: int = 8, sharded: bool = False, dtype: torch.dtype = torch.float32,
                **kwargs) -> Path:
    """``folder`` with a tiny tokenizer and a random decoder saved in ``dtype`` (sharded in
    pieces of ~100 kB when ``sharded``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(folder)
    # rows to spare, as real checkpoints have: the folder's tokenizer read back under a Qwen2
    # config gains Qwen2's <|endoftext|> (id 300), which the embedding must take
    model = tiny_decoder(arch, layers, len(tok) + 20, **kwargs).to(dtype)
    model.save_pretrained(folder, max_shard_size="100KB" if sharded else "10GB")
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    return folder
