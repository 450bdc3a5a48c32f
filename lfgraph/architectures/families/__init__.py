"""The model families: one module per family (or a few per module), each class decorated
with ``@register`` (:mod:`lfgraph.architectures.registry`).

Importing this package imports every module in this folder, in file-name order, so adding a
family is adding one file here (and its test, ``tests/architectures/test_family_NAME.py``):
no list names the modules. A family module imports only :mod:`..base` and
:mod:`..registry` (never ``lfgraph.architectures`` itself, which imports this package).
The first families, Llama to BERT, share :mod:`.common`.
"""

from __future__ import annotations

import importlib
import pkgutil

#: the family modules imported, in the order they were (file names, sorted)
MODULES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in MODULES:
    importlib.import_module(f"{__name__}.{_name}")
