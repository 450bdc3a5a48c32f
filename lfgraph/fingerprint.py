"""The model fingerprint a plan records: the one rule, used by the in-memory graph
(:meth:`lfgraph.graph.LayerGraph.fingerprint`), whose checkpoint graphs hash each block
while a pass holds it (:class:`lfgraph.frontends.checkpoint.CheckpointLayerGraph`).

Two levels of SHA-256: each weighted layer's digest over its name, weight shape and float32
weight bytes (row-major), then its bias's float32 bytes if it has one
(:func:`layer_digest`); the fingerprint is the SHA-256 of the layers' digests taken in
sorted layer-name order, as 16 hex characters (:func:`combine`). A layer's digest depends
only on that layer, so a checkpoint read block by block hashes each decoder block's layers while the block
is in memory for the selection pass, in block order, and combines the digests at the end.

Plans made by lfgraph before :data:`FINGERPRINT_SINCE` recorded a one-level hash (all layers
in one SHA-256), which differs for the same weights.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Sequence

#: The first lfgraph version whose plans carry the two-level fingerprint.
FINGERPRINT_SINCE = "0.2.0"


def layer_digest(name: str, shape: Sequence[int], weight: Iterable[Any], bias: Iterable[Any] | None = None) -> bytes:
    """The 32-byte digest of one weighted layer: SHA-256 of ``name``, ``str(tuple(shape))``,
    then the float32 bytes of the weight and of the bias (``None``: no bias).

    ``weight`` and ``bias`` are iterables of C-contiguous float32 buffers (NumPy arrays,
    memoryviews) holding the values in row-major order: pieces of rows in order hash as
    the whole would."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(str(tuple(int(s) for s in shape)).encode())
    for piece in weight:
        h.update(piece)
    if bias is not None:
        for piece in bias:
            h.update(piece)
    return h.digest()


def combine(digests: Mapping[str, bytes]) -> str:
    """The fingerprint (16 hex characters) of the layers whose digests ``digests`` holds by
    layer name: SHA-256 of the digests in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()[:16]


def version_before(version: Any, since: str = FINGERPRINT_SINCE) -> bool:
    """Whether lfgraph version string ``version`` (``"0.1.0"``) is older than ``since``;
    ``False`` when it is not a version string."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(version)) < Version(since)  # 0.2.0.dev1 and 0.2.0rc1 are before 0.2.0
    except InvalidVersion:
        return False
