"""``lfgraph generate OUT_DIR --prompt "…"``: sample text from the compressed model (as it
ships: onnxruntime-genai from the deploy folder, or the with-past ONNX on ONNX Runtime) and,
with ``--original MODEL``, from the original model (PyTorch), side by side.

Wiring (two lines in ``lfgraph/cli.py``)::

    from .deploy.cli import add_subcommand as _add_generate, run as _run_generate
    _add_generate(sub)                      # in build_parser()
    if args.command == "generate": return _run_generate(args)   # in main()
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from ..errors import LfgraphError
from ..options import COUNT


def add_subcommand(subparsers: Any) -> None:
    """Register ``generate`` on the CLI's subparsers."""
    g = subparsers.add_parser(
        "generate", help="sample text from a compressed model folder (and the original, side by side)",
        description="Greedy text from the deploy folder lfgraph compress -o OUT_DIR/ wrote, beside the original model's.",
    )
    g.add_argument("folder", metavar="OUT_DIR", help="deploy folder (model.onnx with KV cache, genai_config.json, tokenizer)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several prompts)")
    g.add_argument("--original", default=None, metavar="MODEL", help="the uncompressed model (alias such as smollm2, or a Hugging Face folder) to compare with")
    g.add_argument("--max-new-tokens", type=COUNT, default=48, help="tokens to generate per prompt (default 48)")
    g.add_argument("--runtime", choices=["genai", "ort"], default=None,
                   help="run the compressed model with onnxruntime-genai (default when genai_config.json is present) or plain ONNX Runtime")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text even when the tokenizer has a chat template")


def _prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(text).input_ids]


def sample_texts(folder: str | Path, prompts: Sequence[str], original: str | None = None, max_new_tokens: int = 48,
                 runtime: str | None = None, chat: bool = True) -> list[dict[str, str]]:
    """For each prompt: ``{"prompt", "compressed", "original"?}`` greedy continuations."""
    from transformers import AutoTokenizer

    from .generation import OrtDecoder, genai_greedy, torch_greedy

    folder = Path(folder)
    if not (folder / "model.onnx").is_file():
        raise LfgraphError(f"{folder} has no model.onnx: give the folder lfgraph compress -o OUT_DIR/ wrote")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception:
        raise LfgraphError(f"{folder} has no tokenizer files (tokenizer.json): generate needs them to turn text into tokens") from None
    runtime = runtime or ("genai" if (folder / "genai_config.json").is_file() else "ort")
    if runtime == "genai" and not (folder / "genai_config.json").is_file():
        raise LfgraphError(f"{folder} has no genai_config.json: use --runtime ort")
    orig = None
    if original:
        from ..models import load_model

        orig = load_model(original).hf_model
        if orig is None or not hasattr(orig, "generate"):
            raise LfgraphError(f"{original} is not a causal language model")
    dec = OrtDecoder(folder / "model.onnx") if runtime == "ort" else None
    eos = [int(t) for t in ([tok.eos_token_id] if tok.eos_token_id is not None else [])]
    results = []
    for text in prompts:
        ids = _prompt_ids(tok, text, chat)
        if dec is not None:
            import json

            cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
            head = cfg.get("head_dim") or (cfg["hidden_size"] // cfg["num_attention_heads"] if cfg else None)
            new = dec.greedy(ids, max_new_tokens, eos=eos, head_dim=head)
        else:
            new = genai_greedy(folder, ids, max_new_tokens)
        row = {"prompt": text, "compressed": tok.decode(new, skip_special_tokens=True)}
        if orig is not None:
            row["original"] = tok.decode(torch_greedy(orig, ids, max_new_tokens), skip_special_tokens=True)
        results.append(row)
    return results


def run(args: argparse.Namespace) -> int:
    """``lfgraph generate``: print the samples; exit code 0."""
    empty = [i for i, p in enumerate(args.prompt, 1) if not p.strip()]
    if empty:
        raise LfgraphError(f"--prompt number {empty[0]} is empty: give some text to continue")
    rows = sample_texts(args.folder, args.prompt, args.original, args.max_new_tokens, args.runtime, not args.no_chat_template)
    width = 100
    for row in rows:
        print(f"prompt: {row['prompt']}")
        for key, label in (("original", f"original ({args.original}, PyTorch)"), ("compressed", f"compressed ({args.folder})")):
            if key in row:
                print(f"── {label} ".ljust(width, "─"))
                print(textwrap.fill(row[key].strip() or "(empty)", width=width))
        print()
    sys.stdout.flush()
    return 0
