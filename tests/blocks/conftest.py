import sys
from pathlib import Path

# the tiny checkpoint builders live beside the tests that use them; the tiny families too
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "architectures"))
