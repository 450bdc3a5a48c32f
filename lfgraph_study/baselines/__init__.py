"""The comparison methods of the study, one interface (:mod:`.interface`: :func:`run_method`,
:data:`METHODS`): the paper's width methods (:mod:`.paper`: pruning, k-means, SVD, DAE), the
training-free depth pruners (ShortGPT, Gromov et al., SLEB, LaCo, ReplaceMe, LinearPatch)
and lfgraph's own layer fusion, each in its own module, registered on import below."""

from .interface import METHODS, Method, MethodResult, find_block_stack, removable_blocks, run_method
from .layers import LayerRef, compressible_layers, layer_weight_count
from .paper import BASELINES, Baseline, compress_baseline, compression_stats

# each method module registers itself in METHODS on import
from . import gromov, laco, lfgraph_fusion, linearpatch, replaceme, shortgpt, sleb, width  # noqa: E402,F401  isort: skip

__all__ = ["BASELINES", "METHODS", "Baseline", "LayerRef", "Method", "MethodResult", "compress_baseline", "compressible_layers",
           "compression_stats", "find_block_stack", "layer_weight_count", "removable_blocks", "run_method"]
