"""Command line: the OpenAI-compatible routing front end of an exported MoA model (moa_jax/route_serve.py).

    python -m moa_jax.cli.route_serve --export export/peft --upstream http://127.0.0.1:8000 [--port 8080]
        [--model-map NAME=MODEL ...] [--model-format '{export}/{expert}'] [--max-batch 16] [--batch-window-ms 5]

The same program as the route_serve.py copy in a servable export directory; `moa-jax route-serve ...` too.
"""
from __future__ import annotations

import sys

from moa_jax.route_serve import main

if __name__ == "__main__":
    sys.exit(main())
