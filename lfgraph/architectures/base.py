"""The architecture config: what one model family is, in one class.

:class:`Architecture` holds the Llama-style defaults (``model.layers`` stack, pre-norm
residual blocks, ``mlp.down_proj`` / ``self_attn.o_proj`` output projections, one
``layer_types`` list per layer); a family overrides only what differs, so most families
are a few lines (:mod:`lfgraph.architectures.families`). Instances are stateless: every
method takes the model or config it works on and modifies nothing unless it says so.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import nn

from ..errors import LfgraphError

#: Block kinds: how a block's output is made from its input and its two branches.
#: ``pre-norm``: ``x + attn(norm(x))``, then ``h + mlp(norm(h))`` (the refit target is the
#: MLP output projection's output, added straight to the residual stream);
#: ``parallel``: ``x + attn(norm(x)) + mlp(norm(x))`` (one residual add; same refit);
#: ``post-norm``: ``h + post_norm(mlp(norm(h)))`` (Gemma 2/3, OLMo 2: the refit fits
#: through the post-feedforward norm, see ``lfgraph.passes.calibrated_fusion``);
#: ``post-norm-residual``: ``norm(x + f(x))`` (BERT): the residual stream itself is
#: normalised, the closed-form refit cannot run.
BLOCK_KINDS = ("pre-norm", "parallel", "post-norm", "post-norm-residual")


class Architecture:
    """One model family. Class attributes are the Llama-style defaults.

    Attributes (paths are module paths relative to the family's *base model*, the
    ``PreTrainedModel`` that holds the stack, e.g. ``LlamaModel``; block-relative paths
    are relative to one element of the stack):

    - ``name``: the family key (``lfgraph``'s name, usually the HF ``model_type``);
    - ``model_types``: the ``config.model_type`` values this class owns;
    - ``stack``: path of the ``nn.ModuleList`` of blocks inside the base model;
    - ``per_layer_keys``: config attributes holding one entry per block, sliced with the
      kept blocks when blocks go;
    - ``mlp_out``: block-relative path of the MLP output projection the refit folds into
      (an ``nn.Linear``/``Conv1D``; for MoE the sparse-MoE module, with ``experts_down``);
    - ``experts_down``: MoE only: block-relative path of the experts' stacked down
      projections ``(experts, hidden, intermediate)``; the refit is a square map on the
      MoE's combined output, folded into every expert (exact: the map is linear);
    - ``attn_out``: block-relative path of the attention output projection;
    - ``block``: one of :data:`BLOCK_KINDS`;
    - ``post_mlp_norm`` and ``norm_offset``: post-norm only: the norm after the MLP and the
      constant its scale adds to its weight (Gemma: ``x * (1 + w)``, offset 1);
    - ``genai_type``: the ``genai_config.json`` model type (``"llama"`` tells
      onnxruntime-genai to run a plain decoder loop over lfgraph's standard-op ONNX);
    - ``default_fuse``: the family's default fusion rule when it differs from its task's
      (``None``: ``lfgraph.recipes.DEFAULT_RECIPES``);
    - ``no_onnx``: why the KV-cache ONNX export cannot take the family (``None``: it can);
      a deploy folder of such a family holds the checkpoint only, and says why.
    """

    name: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    stack: ClassVar[str] = "layers"
    #: every per-layer list name transformers configs use; only those a config holds are sliced
    per_layer_keys: ClassVar[tuple[str, ...]] = ("layer_types", "no_rope_layers", "sliding_window_pattern_list", "attention_type_per_layer")
    mlp_out: ClassVar[str] = "mlp.down_proj"
    experts_down: ClassVar[str | None] = None
    attn_out: ClassVar[str] = "self_attn.o_proj"
    block: ClassVar[str] = "pre-norm"
    post_mlp_norm: ClassVar[str | None] = None
    norm_offset: ClassVar[float] = 0.0
    genai_type: ClassVar[str] = "llama"
    default_fuse: ClassVar[str | None] = None
    no_onnx: ClassVar[str | None] = None

    # -- the model ----------------------------------------------------------------------

    def base_model(self, model: nn.Module) -> tuple[str, nn.Module]:
        """``(path, module)`` of the base model inside ``model`` (any wrapper around a
        Hugging Face model): the outermost submodule whose config has one of
        ``model_types`` and that holds ``stack``. Raises ``LfgraphError`` when none does."""
        for path, m in model.named_modules():
            cfg = getattr(m, "config", None)
            if getattr(cfg, "model_type", None) in self.model_types:
                try:
                    stack = m.get_submodule(self.stack)
                except AttributeError:
                    continue
                if isinstance(stack, nn.ModuleList):
                    return path, m
        raise LfgraphError(f"{type(model).__name__} has no {self.name} block stack ({self.stack}): "
                           "the family's class in lfgraph/architectures/ does not match the model")

    def stack_path(self, model: nn.Module) -> str:
        """Module path of the block stack in ``model`` (e.g. ``model.model.layers``)."""
        prefix, _ = self.base_model(model)
        return f"{prefix}.{self.stack}" if prefix else self.stack

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The block stack of ``model`` (the ``nn.ModuleList`` itself, not a copy)."""
        return model.get_submodule(self.stack_path(model))

    # -- the config ---------------------------------------------------------------------

    def per_layer_lists(self, cfg: Any) -> list[str]:
        """The ``per_layer_keys`` that ``cfg`` holds as lists."""
        return [k for k in self.per_layer_keys if isinstance(getattr(cfg, k, None), (list, tuple))]

    def slice_config(self, cfg: Any, kept: Sequence[int]) -> None:
        """Make ``cfg`` (modified in place) describe only the blocks ``kept`` (original
        indices, ascending): ``num_hidden_layers`` and every per-layer list. Lists that
        already have ``len(kept)`` entries are left as they are."""
        old_n = self.depth(cfg)
        self.set_depth(cfg, len(kept))
        for key in self.per_layer_lists(cfg):
            value = list(getattr(cfg, key))
            if len(value) == old_n and old_n != len(kept):
                setattr(cfg, key, [value[i] for i in kept])

    def depth(self, cfg: Any) -> int:
        return int(cfg.num_hidden_layers)

    def set_depth(self, cfg: Any, n: int) -> None:
        cfg.num_hidden_layers = n

    def tied_embeddings(self, cfg: Any) -> bool:
        """Whether the output head reads the input embedding's weight."""
        return bool(getattr(cfg, "tie_word_embeddings", False))

    # -- the refit ----------------------------------------------------------------------

    def block_kind(self, cfg: Any) -> str:
        """The kind (:data:`BLOCK_KINDS`) of the blocks of a model with config ``cfg``."""
        return self.block

    def mlp_target(self, block: nn.Module) -> tuple[str, str | None]:
        """``(module, experts)`` the refit changes in ``block``: the MLP output projection's
        block-relative path, and for an MoE block the path of its experts' stacked down
        projections (``None`` for a dense block)."""
        return self.mlp_out, None

    def residual_scale(self, cfg: Any) -> float:
        """The factor a branch's output is multiplied by before the residual add."""
        return 1.0

    def refit_refusal(self, cfg: Any) -> str | None:
        """``None`` when the calibrated refit can run on blocks of a model with config
        ``cfg``, else the one-line reason."""
        if self.block_kind(cfg) == "post-norm-residual":
            return (f"{self.name} blocks normalise the residual stream after the add (post-LayerNorm): "
                    "calibrated fusion cannot refit them in closed form; use --fuse remove or mean")
        return None

    # -- block by block -----------------------------------------------------------------

    #: why a checkpoint of this family cannot be compressed block by block (``None``: it can)
    no_stream: ClassVar[str | None] = None

    def stream_refusal(self, cfg: Any) -> str | None:
        """``None`` when a checkpoint of this family (config ``cfg``) can be read block by
        block (:class:`lfgraph.blocks.CheckpointBlocks`), else the one-line reason."""
        return self.no_stream

    def __repr__(self) -> str:
        return f"<architecture {self.name}>"
