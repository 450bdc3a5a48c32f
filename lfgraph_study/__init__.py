"""The research study around lfgraph, kept apart from the product: the comparison methods
(:mod:`lfgraph_study.baselines`), the study sweep and its command ``lfgraph-study``
(:mod:`lfgraph_study.study`, :mod:`lfgraph_study.cli`), lm-eval scoring
(:mod:`lfgraph_study.harness`), the compress-and-retrain research loops
(:mod:`lfgraph_study.loops`) and the small models the study trains (:mod:`lfgraph_study.zoo`).

It imports ``lfgraph``; ``lfgraph`` never imports it (``tests/test_imports.py``).
"""
