"""User-facing errors.

Every problem a user can cause (bad path, corrupt file, impossible target, unsupported
graph) is raised as :class:`LfgraphError`. The CLI prints its message on one line and exits
with code 2; library users catch it like any exception. Messages say what is wrong *and*
what to do about it.
"""

from __future__ import annotations


class LfgraphError(Exception):
    """A problem with the user's input or request, reported without a traceback."""

    exit_code = 2


class NoCompatibleGroupsError(LfgraphError):
    """The model has no pair of layers that could be compared or fused."""


class UnsupportedModelError(LfgraphError):
    """The model (or one of its ops) is outside what lfgraph can trace or rewrite."""


class RewriteCheckError(LfgraphError):
    """A rewrite produced an invalid graph: a bug in a pass, reported with its cause."""

    exit_code = 1
