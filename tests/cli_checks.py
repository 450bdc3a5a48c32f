"""What every refused command must look like to a user: the exit code, and one line on
stderr that starts ``lfgraph: error:`` and names the problem, never a traceback."""

from __future__ import annotations


def one_line(capsys, code: int, match: str, want: int = 2) -> str:
    """Assert the command's exit code and its single error line (returned), which holds ``match``."""
    err = capsys.readouterr().err.strip()
    assert code == want, err
    lines = [line for line in err.splitlines() if line.startswith("lfgraph: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]
