#!/usr/bin/env python
"""Draw what a fusion plan did to a model, before → after (HTML with inline SVG, or PNG).

    python tools/visualize.py MODEL --plan plan.json --log rewrite.json -o view.html
    python tools/visualize.py MODEL --plan plan.json -o view.png      # the plan alone, as a PNG
    python tools/visualize.py --demo [--mode tie] -o demo.html         # tiny Llama, no input files

The work is done by ``lfgraph.visualize`` (``render_rewrite`` for use from Python).
"""

import sys

from lfgraph.visualize import main

if __name__ == "__main__":
    sys.exit(main())
