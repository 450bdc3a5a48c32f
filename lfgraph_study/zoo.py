"""Small models built in code for the study, the tools and the examples: the project's
ResNet-style CNN, a plain MLP, tiny Hugging Face configurations (Llama, GPT-2, BERT), and
:func:`train_classifier` (the vision track's training). The tests take the builders from here
(``tests/tiny_models.py``).

Nothing here downloads anything: weights are random (seeded) unless a caller trains them.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a skip path.

    The skip is the identity when shape is preserved, else a 1x1 conv + BN projection
    (``downsample``), exactly as in torchvision's ResNet.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetCNN(nn.Module):
    """A small ResNet for 3x32x32 images: stem, stages of basic blocks, pooled linear head.

    ``stages`` lists (channels, blocks); the first block of each stage after the first
    downsamples (projection skip), the others keep an identity skip and can be merged.
    """

    def __init__(self, stages: tuple[tuple[int, int], ...] = ((16, 3), (32, 3)), num_classes: int = 10) -> None:
        super().__init__()
        c0 = stages[0][0]
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        blocks: list[nn.Module] = []
        in_ch = c0
        for si, (ch, n) in enumerate(stages):
            for bi in range(n):
                stride = 2 if (si > 0 and bi == 0) else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def wide_resnet(widen: int = 4, blocks: int = 2, num_classes: int = 10) -> ResNetCNN:
    """A WideResNet-style CNN (Zagoruyko & Komodakis): the basic blocks of :class:`ResNetCNN`,
    ``widen`` times wider (16k/32k channels) and ``blocks`` per stage (shallower). Unlike WRN
    proper the blocks are post-activation (conv-BN-ReLU), as everywhere in this zoo."""
    return ResNetCNN(stages=((16 * widen, blocks), (32 * widen, blocks)), num_classes=num_classes)


class MLP(nn.Module):
    """A plain multilayer perceptron: ``depth`` hidden layers of equal width (no blocks)."""

    def __init__(self, d_in: int = 16, width: int = 32, depth: int = 4, d_out: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_llama(layers: int = 4, hidden: int = 64, seed: int = 0, vocab_size: int = 128) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` with a small configuration."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 4, hidden: int = 64, seed: int = 0, vocab_size: int = 128) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` (its projections are ``Conv1D``: x @ W)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=hidden, n_layer=layers, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(layers: int = 4, hidden: int = 64, seed: int = 0, vocab_size: int = 128) -> nn.Module:
    """A randomly initialised ``BertModel`` (post-LayerNorm encoder)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=hidden * 2, max_position_embeddings=256,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0,
                     lr: float = 3e-3, batch: int = 64) -> torch.Tensor:
    """Train ``model`` in place with Adam on random batches of ``(x, y)`` (cross entropy);
    returns the last batch's loss. The model is left in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.detach()
