"""Block sources: a model's stack of blocks, held in memory or onloaded one at a time from
a safetensors checkpoint, and what walks them (the stack's input, the block-by-block
pass, the checkpoint reader and shard writer).

    from lfgraph.blocks import CheckpointBlocks
    source = CheckpointBlocks("llama-8b/")          # the model on the meta device
    inputs = source.stack_input([ids])               # the hidden states entering block 0
    for i, block in source.blocks():                 # one block in memory at a time
        ...
"""

from .source import BlockSource, CheckpointBlocks, HeldBlocks, LayerCall, StackInput, block_output, regroup

__all__ = ["BlockSource", "CheckpointBlocks", "HeldBlocks", "LayerCall", "StackInput", "block_output", "regroup"]
