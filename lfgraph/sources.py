"""Sources: what the one pipeline needs from a PyTorch model or an ONNX file.

A :class:`Source` turns a model spec into a LayerGraph, applies a plan with the rewrite
of its own kind (torch or ONNX), writes the result as ONNX, and says what the written file
must compute (the parity reference) and how far the result is from the original (the
quality check's raw outputs). Everything else — planning, verification, timing, the
report, exit codes — is the pipeline's and is the same for both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from . import __version__
from .errors import LfgraphError
from .evaluate import QualityReport
from .graph import LayerGraph
from .model_types import CalibrationOptions, ModelType, model_type
from .cache import cache_dir, cache_entry, cached_folder
from .models import ALIASES, LoadedModel, load_model
from .onnx_io import runner, save_onnx
from .passes.base import PassResult
from .plan import FusionPlan


class Source:
    """A model the pipeline compresses. Subclasses: :class:`TorchSource`, :class:`OnnxSource`."""

    kind: str = ""
    name: str = ""
    family: str = ""
    #: the model family's architecture config (:mod:`lfgraph.architectures`); ``None`` for
    #: plain modules and ONNX sources
    architecture: Any = None

    def graph(self) -> LayerGraph:
        raise NotImplementedError

    def block_source(self) -> Any:
        """The model's stack as a :class:`~lfgraph.blocks.BlockSource`, for the passes that walk its blocks."""
        raise LfgraphError(f"{self.name}: activation-based selection needs the PyTorch model; ONNX files support --select similarity")

    def has_calibration(self, options: CalibrationOptions) -> bool:
        return False

    def calibration(self, options: CalibrationOptions) -> Any:
        raise LfgraphError(f"{self.name}: activation-based selection and the calibrated fusion rule need the PyTorch model; ONNX files support --select similarity")

    def rewrite(self, plan: FusionPlan, calibration: Any = None, progress: bool = True) -> PassResult:
        raise NotImplementedError

    def write(self, compressed: Any, out: Path, metadata: Mapping[str, str]) -> list[Path]:
        raise NotImplementedError

    def verification_feed(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reference_outputs(self, compressed: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the written file must compute on ``feed``: the rewritten model's outputs."""
        raise NotImplementedError

    def original_file(self, quiet: bool = True) -> Path:
        """The uncompressed model as an ONNX file (for timing and file size)."""
        raise NotImplementedError

    def latency_feed(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def parameter_count(self, compressed: Any) -> int:
        raise NotImplementedError

    def quality(self, compressed: Any, written: Path, feed: Mapping[str, np.ndarray], eval_windows: int, eval_seq_len: int) -> QualityReport | None:
        """The compressed model against the original (see :mod:`lfgraph.evaluate`)."""
        raise NotImplementedError

    def heal(self, compressed: Any, plan: FusionPlan, options: CalibrationOptions, steps: int,
             heal_options: dict[str, Any], progress: bool = True) -> tuple[Any, dict[str, Any]]:
        raise LfgraphError(f"{self.name}: healing trains the model, which needs its PyTorch form; an ONNX file cannot heal")

    @property
    def rtol(self) -> float:
        return 1e-4


class TorchSource(Source):
    """A PyTorch / Hugging Face model (traced with ``torch.export``)."""

    kind = "pytorch"

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.type: ModelType = model_type(model)
        self.name, self.family = model.name, model.family
        from .architectures import of_model

        self.architecture = of_model(model.module)
        self._graph: LayerGraph | None = None

    def graph(self) -> LayerGraph:
        if self._graph is None:
            from .frontends.torch_fx import build_layer_graph

            self._graph = build_layer_graph(self.model.module, self.model.example_inputs, model_name=self.model.name)
        return self._graph

    def block_source(self) -> Any:
        """The model's blocks in memory, for the passes that walk them
        (:class:`~lfgraph.blocks.HeldBlocks` over the graph's block stack)."""
        from .blocks import HeldBlocks

        blocks = self.graph().removable_blocks() or self.graph().blocks
        if not blocks:
            raise LfgraphError(f"{self.name} has no stack of blocks")
        return HeldBlocks(self.model.module, blocks[0].name.rpartition(".")[0], name=self.name)

    def has_calibration(self, options: CalibrationOptions) -> bool:
        return self.type.has_calibration(options)

    def calibration(self, options: CalibrationOptions) -> Any:
        return self.type.calibration(options)

    def rewrite(self, plan: FusionPlan, calibration: Any = None, progress: bool = True) -> PassResult:
        from .passes.rewrite_torch import apply_plan

        result = apply_plan(self.model.module, self.graph(), plan, calibration=calibration, progress=progress)
        result.model.eval()
        return result

    def write(self, compressed: torch.nn.Module, out: Path, metadata: Mapping[str, str]) -> list[Path]:
        from .export import export_onnx

        export_onnx(compressed, self.type.export_args(), out, self.type.input_names, self.type.output_names,
                    self.type.dynamic_axes(), metadata)
        return [p for p in (out, out.with_name(out.name + ".data")) if p.exists()]

    def verification_feed(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.type.verification_inputs().items()}

    def reference_outputs(self, compressed: torch.nn.Module, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .verify import torch_outputs

        inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
        return torch_outputs(compressed, inputs, self.type.input_names, self.type.output_names)

    def original_file(self, quiet: bool = True) -> Path:
        """The uncompressed model exported once and cached by weight fingerprint (a cache
        entry of its own: made again when damaged, :mod:`lfgraph.cache`)."""
        folder = cache_dir() / "onnx" / self.graph().fingerprint()
        if cached_folder(folder, ["model.onnx"]) is None:
            if not quiet:
                print(f"lfgraph: exporting the original {self.name} once for comparison (cached in {folder})", flush=True)
            with cache_entry(folder, ["model.onnx"]) as tmp:
                self.write(self.model.module, tmp / "model.onnx", {"lfgraph.version": __version__})
        return folder / "model.onnx"

    def latency_feed(self) -> dict[str, np.ndarray]:
        return self.type.latency_feed()

    def parameter_count(self, compressed: torch.nn.Module | None = None) -> int:
        from .passes.rewrite_torch import unique_parameter_count

        return unique_parameter_count(self.model.module if compressed is None else compressed)

    def heal(self, compressed: torch.nn.Module, plan: FusionPlan, options: CalibrationOptions, steps: int,
             heal_options: dict[str, Any], progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Fine-tune ``compressed`` by distillation from the original (:mod:`lfgraph.retrain`);
        returns the healed module and its loss curve. Language models heal on windows of
        the calibration text (or token file); other models on their calibration samples."""
        from .retrain.stage import HEAL_DEFAULTS, heal_compressed, max_positions, training_windows

        heal_options = dict(heal_options)
        if self.type.input_names == ["input_ids", "attention_mask"]:
            if options.token_file:
                data = self.type.calibration(CalibrationOptions(token_file=options.token_file, windows=options.windows, seq_len=options.seq_len))
            else:
                from .calibration import load_calibration_text

                tok = self.model.require_tokenizer("healing")
                text = load_calibration_text(options.text_file) if options.text_file else None
                seq_len = heal_options.pop("seq_len", HEAL_DEFAULTS["seq_len"])
                data = training_windows(tok, text, heal_options.pop("windows", HEAL_DEFAULTS["windows"]), seq_len, max_positions(compressed))
                if heal_options.get("eval_every"):
                    from .calibration import heldout_windows

                    heal_options["eval_windows"] = heldout_windows(tok, 4, seq_len)
        else:
            data = self.type.calibration(options)
        heal_options.pop("windows", None)
        heal_options.pop("seq_len", None)
        return heal_compressed(self.model, compressed, plan, data, steps, progress=progress, **heal_options)

    def quality(self, compressed: torch.nn.Module, written: Path, feed: Mapping[str, np.ndarray], eval_windows: int, eval_seq_len: int) -> QualityReport | None:
        return self.type.quality(compressed, feed, eval_windows, eval_seq_len)

    @property
    def rtol(self) -> float:
        return self.type.rtol


class OnnxSource(Source):
    """An ``.onnx`` file from any exporter, rewritten as a graph (no framework involved)."""

    kind = "onnx"
    family = "onnx"

    def __init__(self, path: str | os.PathLike) -> None:
        from .frontends.onnx_graph import load_onnx

        self.path = Path(path)
        self.name = self.path.stem
        self.model: onnx.ModelProto = load_onnx(self.path)
        self._graph: LayerGraph | None = None

    def graph(self) -> LayerGraph:
        if self._graph is None:
            from .frontends.onnx_graph import build_layer_graph

            self._graph = build_layer_graph(self.model, model_name=self.name)
        return self._graph

    def rewrite(self, plan: FusionPlan, calibration: Any = None, progress: bool = True) -> PassResult:
        from .passes.rewrite_onnx import apply_plan

        return apply_plan(self.model, self.graph(), plan)

    def write(self, compressed: onnx.ModelProto, out: Path, metadata: Mapping[str, str]) -> list[Path]:
        from .onnx_io import add_metadata

        if out.resolve() == self.path.resolve():
            raise LfgraphError("the output would overwrite the input model: choose another -o path")
        add_metadata(compressed, metadata)
        return save_onnx(compressed, out)

    def verification_feed(self) -> dict[str, np.ndarray]:
        from .passes.rewrite_onnx import make_inputs

        return make_inputs(self.model, batch=2)

    def reference_outputs(self, compressed: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return runner(compressed, exact=True).run(feed)

    def original_file(self, quiet: bool = True) -> Path:
        return self.path

    def latency_feed(self) -> dict[str, np.ndarray]:
        from .passes.rewrite_onnx import make_inputs

        return make_inputs(self.model, batch=1, seq_len=128)

    def quality(self, compressed: onnx.ModelProto, written: Path, feed: Mapping[str, np.ndarray], eval_windows: int, eval_seq_len: int) -> QualityReport:
        """Input graph vs compressed graph on the verification inputs, both on ORT."""
        from .evaluate import output_quality

        reference = runner(self.path).run(feed)
        got = runner(written).run(feed)
        return output_quality(reference, got, "verification inputs, input graph vs compressed graph on ONNX Runtime", "onnx")

    def parameter_count(self, compressed: onnx.ModelProto | None = None) -> int:
        if compressed is None:
            return self.graph().total_params
        from .frontends.onnx_graph import build_layer_graph

        return build_layer_graph(compressed).total_params


def is_onnx_spec(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(".onnx")


def check_model_spec(spec: str) -> None:
    """Cheap checks before any loading: the path exists (or is an alias)."""
    if spec == "":
        raise LfgraphError(f"MODEL is empty: give a Hugging Face model folder, a .gguf or .onnx file, or one of {sorted(ALIASES)}")
    if spec not in ALIASES and not Path(spec).exists():
        raise LfgraphError(f"model {spec!r} not found: give a Hugging Face model folder, a .gguf or .onnx file, or one of {sorted(ALIASES)}")


def open_source(spec: str | os.PathLike | LoadedModel | Source) -> Source:
    """The :class:`Source` for a spec: an ``.onnx`` path, an alias, a Hugging Face folder,
    a ``.gguf`` file, or an already loaded model."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, LoadedModel):
        return TorchSource(spec)
    check_model_spec(str(spec))
    if is_onnx_spec(spec):
        return OnnxSource(spec)
    return TorchSource(load_model(str(spec)))


class CheckpointSource(Source):
    """A causal LM's safetensors checkpoint folder, compressed block by block without ever
    holding the model (:class:`~lfgraph.blocks.CheckpointBlocks`): the same stages, recipes,
    calibration windows, plans and quality measure as a :class:`TorchSource` of the same
    folder, and the same plan and weights (``tests/blocks/test_equivalence.py``).

    What differs is what it cannot hold: the rewrite's distillation trains by the logit
    objective only when the compressed model and the original fit in memory together, else
    block-wise (:mod:`lfgraph.passes.blockwise_distillation`), and says which; healing
    (which trains the whole model) is refused; the output is the checkpoint written shard by
    shard (and ONNX by onnxruntime-genai's builder when ONNX Runtime can hold the model)."""

    kind = "checkpoint"
    family = "causal-lm"

    def __init__(self, folder: str | os.PathLike, device: str = "cpu", objective: str | None = None) -> None:
        from .allocator import return_freed_memory
        from .blocks import CheckpointBlocks
        from .model_types import TextModelType
        from .models import _tokenizer_or_none, check_tokenizer_fits

        return_freed_memory()  # block after block: each one's memory goes back when it is closed
        self.folder = Path(folder)
        self.blocks = CheckpointBlocks(self.folder, device=device)
        self.name = self.folder.name
        self.architecture = self.blocks.architecture
        vocab = int(getattr(self.blocks.config, "vocab_size", 0) or 0)
        tok = _tokenizer_or_none(self.folder)
        check_tokenizer_fits(tok, vocab, self.folder)
        self.model = LoadedModel(module=None, example_inputs=(), name=self.name, family="causal-lm", tokenizer=tok,  # type: ignore[arg-type]
                                 input_names=("input_ids",), output_names=("logits",), vocab_size=vocab)
        self.type = TextModelType(self.model)
        self.objective = objective
        self.notes: list[str] = []
        self._graph: LayerGraph | None = None
        self.pass_seconds: tuple[float, float] | None = None

    def graph(self) -> LayerGraph:
        if self._graph is None:
            from .frontends.checkpoint import build_layer_graph

            self._graph = build_layer_graph(self.blocks)
            self.blocks.observers.append(self._graph.hash_block)  # the fingerprint from the blocks as passes read them
        return self._graph

    def block_source(self) -> Any:
        return self.blocks

    def has_calibration(self, options: CalibrationOptions) -> bool:
        return self.type.has_calibration(options)

    def calibration(self, options: CalibrationOptions) -> Any:
        return self.type.calibration(options)

    def distill_objective_fits(self) -> bool:
        """Whether the logit distillation (the compressed model and the original held in
        memory, :func:`lfgraph.estimate.logit_distillation_peak`) fits the memory available."""
        from .estimate import available_memory, logit_distillation_peak

        return logit_distillation_peak(self.blocks.parameter_count()) <= available_memory()

    def distill_objective(self, plan: FusionPlan) -> tuple[str, str]:
        """(objective, why) of a distilling rule on this checkpoint: ``logit`` when the
        compressed model and the original fit in memory together with the training
        (:meth:`distill_objective_fits`), else ``blockwise``; a user's choice
        (``objective``) wins."""
        from .estimate import GB, available_memory, logit_distillation_peak

        need = logit_distillation_peak(self.blocks.parameter_count(), plan)
        free = available_memory()
        if self.objective is not None:
            what = "block-wise" if self.objective == "blockwise" else self.objective
            return self.objective, f"{what} distillation (asked for; logit distillation would need about {need / GB:.1f} GB, {free / GB:.1f} GB available)"
        if need <= free:
            return "logit", f"logit distillation: the compressed model and the original fit in memory (about {need / GB:.1f} GB of {free / GB:.1f} GB)"
        return "blockwise", (f"block-wise distillation: logit distillation would hold the model twice in memory (about {need / GB:.1f} GB, "
                             f"{free / GB:.1f} GB available); each trained block reproduces the original's hidden states instead")

    def rewrite(self, plan: FusionPlan, calibration: Any = None, progress: bool = True) -> PassResult:
        from .passes.rewrite_blocks import apply_plan_to_blocks
        from .recipes import distills

        objective = "logit"
        if distills(plan):
            objective, why = self.distill_objective(plan)
            self.notes.append(why)
        states = self.blocks.memory.take(calibration) if self.blocks.memory is not None else None
        return apply_plan_to_blocks(self.blocks, self.graph(), plan, calibration, objective=objective, states=states, progress=progress)

    def verification_feed(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.type.verification_inputs().items()}

    def reference_outputs(self, compressed: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rewritten model's logits on each row of ``feed`` (unpadded part), block by block."""
        from .evaluate import final_states

        out = {}
        for r, (ids, mask) in enumerate(zip(feed["input_ids"], feed["attention_mask"])):
            row = torch.from_numpy(np.asarray(ids[np.asarray(mask) > 0]))[None, :]
            states, batches, _ = final_states(compressed, row, 1)
            out[f"logits[{r}]"] = compressed.logits(states[0], batches[0]).numpy()
        return out

    def original_file(self, quiet: bool = True) -> Path:
        return self.folder

    def latency_feed(self) -> dict[str, np.ndarray]:
        return self.type.latency_feed()

    def parameter_count(self, compressed: Any = None) -> int:
        return (self.blocks if compressed is None else compressed).parameter_count()

    def quality(self, compressed: Any, written: Path, feed: Mapping[str, np.ndarray], eval_windows: int, eval_seq_len: int) -> QualityReport | None:
        """The report's quality measure, block by block for both models (held-out perplexity,
        top-1 agreement, KL to the original)."""
        if eval_windows <= 0:
            return None
        if self.model.tokenizer is None:
            return QualityReport(kind="causal-lm", loss=float("nan"), loss_name="not measured", protocol="no tokenizer",
                                 skipped="the model folder has no tokenizer files, and held-out text needs one")
        from .calibration import heldout_windows
        from .evaluate import blockwise_lm_quality

        limit = int(getattr(self.blocks.config, "max_position_embeddings", 0) or eval_seq_len)
        windows = heldout_windows(self.model.tokenizer, eval_windows, min(eval_seq_len, limit))
        report, self.pass_seconds = blockwise_lm_quality(self.blocks, compressed, windows)
        report.completions, why = self.completions(compressed)
        if why:
            self.notes.append(why)
        return report

    def completions(self, compressed: Any) -> tuple[list[tuple[str, str, str]], str]:
        """Greedy completions of the report's prompts by both models, where both fit in
        memory together (generation runs the whole model at every token: block by block it
        would read the checkpoint once a token); else none and the reason."""
        from .estimate import GB, available_memory, logit_distillation_peak

        need, free = logit_distillation_peak(self.blocks.parameter_count()), available_memory()
        if need > free:
            return [], (f"no sample completions: generation holds both models in memory (about {need / GB:.1f} GB, "
                        f"{free / GB:.1f} GB available); the held-out measure above ran block by block")
        from .evaluate import PROMPTS, greedy

        original = self.blocks.to_module()
        before = [greedy(original, self.model.tokenizer, p, 16) for p in PROMPTS]
        del original
        after_model = compressed.to_module()
        after = [greedy(after_model, self.model.tokenizer, p, 16) for p in PROMPTS]
        return list(zip(PROMPTS, before, after)), ""

    def heal(self, compressed: Any, plan: FusionPlan, options: CalibrationOptions, steps: int,
             heal_options: dict[str, Any], progress: bool = True) -> tuple[Any, dict[str, Any]]:
        raise LfgraphError(f"{self.name}: --heal trains the whole model, which the block-by-block path does not hold; "
                           "use the distilling fusion rules (the default), or --in-memory where the model fits")
