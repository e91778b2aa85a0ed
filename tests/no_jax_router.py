"""Runs an export's reference_router.py in a fresh Python process where jax and flax cannot be imported (what a
server host without moa_jax has), for the reference-router tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def route_without_jax(export_dir: str, base_dir: str, prompts: list, workdir: str) -> list[dict]:
    """Each prompt (token ids, a str or a messages list) -> {'ids', 'logits', 'expert'} as the export's reference
    router computes them in a process that cannot import jax, flax or moa_jax."""
    given, taken = os.path.join(workdir, "prompts.json"), os.path.join(workdir, "theirs.json")
    with open(given, "w") as f:
        json.dump(prompts, f)
    script = (
        "import json, sys\n"
        "sys.modules['jax'] = None; sys.modules['flax'] = None\n"       # any import of them now fails
        f"sys.path.insert(0, {export_dir!r})\n"
        "import reference_router, torch\n"
        "torch.set_num_threads(2)\n"
        f"router = reference_router.load({export_dir!r}, base_model={base_dir!r})\n"
        f"prompts = json.load(open({given!r}))\n"
        "rows = [{'ids': p if reference_router._is_ids(p) else router.prompt_ids(p), 'logits': "
        "router.logits(p).tolist(), 'expert': router.route(p)} for p in prompts]\n"
        "assert 'moa_jax' not in sys.modules\n"
        f"json.dump(rows, open({taken!r}, 'w'))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(taken) as f:
        return json.load(f)
