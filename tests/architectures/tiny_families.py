"""One tiny random model per architecture family, saved as a Hugging Face folder.

Each entry is the transformers config class and the keyword arguments that make it tiny
(2-4 layers, hidden 64, the tiny tokenizer's vocabulary). Weights are drawn with a wider
spread than transformers' default so that every layer changes the greedy tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_text import tiny_tokenizer  # tests/ is on sys.path through its conftest.py

_ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)

#: family -> (transformers config class name, config kwargs); families added later keep
#: theirs in their own test file (tests/architectures/test_family_NAME.py)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_ATTN)),
    "qwen2": ("Qwen2Config", dict(_ATTN)),
    "qwen3": ("Qwen3Config", dict(_ATTN, head_dim=16)),
    "mistral": ("MistralConfig", dict(_ATTN, sliding_window=None)),
    "gemma": ("GemmaConfig", dict(_ATTN, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_ATTN, head_dim=16, sliding_window=128)),
    "gemma3_text": ("Gemma3TextConfig", dict(_ATTN, head_dim=16, sliding_window=128, sliding_window_pattern=2)),
    "phi3": ("Phi3Config", dict(_ATTN, pad_token_id=0)),
    "phi": ("PhiConfig", dict(_ATTN)),
    "granite": ("GraniteConfig", dict(_ATTN)),
    "olmo": ("OlmoConfig", dict(_ATTN)),
    "olmo2": ("Olmo2Config", dict(_ATTN)),
    "stablelm": ("StableLmConfig", dict(_ATTN)),
    "cohere": ("CohereConfig", dict(_ATTN)),
    "smollm3": ("SmolLM3Config", dict(_ATTN, no_rope_layer_interval=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       max_position_embeddings=256)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=64,
                              max_position_embeddings=256)),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)),
    "mixtral": ("MixtralConfig", dict(_ATTN, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_ATTN, head_dim=16, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
}


def tiny_family_model(family: str, folder: Path, seed: int = 0, spread: float = 0.2):
    """Save a random ``family`` causal LM (an entry of :data:`FAMILIES`) with the tiny tokenizer
    in ``folder``; return the model."""
    cls_name, kwargs = FAMILIES[family]
    return tiny_model(cls_name, kwargs, folder, seed, spread)


def tiny_model(cls_name: str, kwargs: dict, folder: Path, seed: int = 0, spread: float = 0.2):
    """Save a random causal LM of the transformers config class ``cls_name`` (made with
    ``kwargs``, plus the tiny tokenizer's vocabulary and special tokens) in ``folder``, with
    the tokenizer; return the model. A family added in its own test file calls this."""
    import transformers

    kwargs = dict(kwargs)
    tok = tiny_tokenizer(folder)
    cfg = getattr(transformers, cls_name)(
        vocab_size=len(tok), initializer_range=spread, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=kwargs.pop("pad_token_id", tok.pad_token_id), **kwargs,
    )
    # the embedding takes every id of the tokenizer as the folder gives it back: under some
    # configs (Qwen2) transformers' tokenizer class adds its own special tokens
    cfg.save_pretrained(folder)
    read_back = transformers.AutoTokenizer.from_pretrained(folder)
    cfg.vocab_size = max(len(tok), len(read_back), max(read_back.get_vocab().values()) + 1)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    return model
