"""Tiny models built in code for the tests (test fixtures): the ResNet-style CNN (and a
wider, shallower variant), a plain MLP, and tiny Hugging Face configurations (Llama, GPT-2,
BERT). Weights are random (seeded); nothing is downloaded.

One copy of the builders, in the study's model zoo (``lfgraph_study.zoo``, beside the
product in this repository, installed with it by ``setup.sh``): the product package
``lfgraph`` never imports the study; its tests take these models from there.
"""

from __future__ import annotations

from lfgraph_study.zoo import MLP, BasicBlock, ResNetCNN, randomize_batchnorm, tiny_bert, tiny_gpt2, tiny_llama, wide_resnet

__all__ = ["MLP", "BasicBlock", "ResNetCNN", "randomize_batchnorm", "tiny_bert", "tiny_gpt2", "tiny_llama", "wide_resnet"]
