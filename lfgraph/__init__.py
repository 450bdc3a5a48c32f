"""lfgraph: compress trained networks by layer fusion and export a dense, shallower ONNX model."""

import os as _os

# OpenMP threads spin at every barrier by default. On a machine whose cores other processes
# also use (the project's shared 2-core machine), each of torch's parallel regions then
# waits for a thread that is not running while the other burns CPU: measured there, sampling
# 24 windows from SmolLM2 took 10x the wall time (252 s vs 26 s) and 6x the CPU time, and a
# distillation step 1.8x the time. Waiting passively costs microseconds per region when the
# cores are free. OpenMP reads this once, when torch loads it: set before torch is imported;
# an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"
