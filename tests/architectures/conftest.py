import sys
from pathlib import Path

# the tiny family builders live beside the tests that use them
sys.path.insert(0, str(Path(__file__).parent))
