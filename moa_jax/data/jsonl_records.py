"""One JSONL file of examples, line by line: decoding (UTF-8, a leading byte-order mark accepted), JSON parsing and
the record checks, every error naming file:line and the field; and the stable hash that assigns a flat-layout
example to its split. moa_jax/data/sources.py groups the records into domains and splits (layout: docs/data.md).

A record is {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ..., assistant last]}, with
optional "domain", "answer" and "metadata"; it becomes (domain, example) with the example keys of sources.py. A
domain name follows moa_jax/names.py (letters, digits, '._-+'): a `../x` or `/x` domain is refused with file:line.
"""
from __future__ import annotations

import hashlib
import json

from moa_jax.data.tasks import DataError
from moa_jax.names import check_name

_ROLES = ("system", "user", "assistant")


def read_jsonl_file(path: str, default_domain: str):
    """Yields (JSON object, domain, example) for every non-blank line of one JSONL file; errors name file:line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue  # blank lines are allowed
            obj = _parse_json_line(line, f"{path}:{lineno}")
            domain, ex = parse_record(obj, where=f"{path}:{lineno}", default_domain=default_domain)
            yield obj, domain, ex


def _parse_json_line(line: str, where: str):
    """json.loads of one line (no line terminator, so columns are the line's own); an error names the column,
    or says the line stops before the value is complete (a line cut off at its end)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        if e.pos >= len(line.rstrip()) or e.msg.startswith("Unterminated string"):
            raise DataError(f"{where}: malformed JSON: the line ends before the JSON value is complete ({e.msg} "
                            f"at column {e.colno}); is the line cut off?") from None
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None


def parse_record(obj, *, where: str, default_domain: str) -> tuple[str, dict]:
    """Validates one JSONL record; returns (domain, example). Errors name `where` (file:line) and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    domain = obj.get("domain", default_domain)
    if not isinstance(domain, str) or not domain.strip():
        raise DataError(f"{where}: field 'domain' must be a non-empty string, got {domain!r}")
    check_name(domain.strip(), where, DataError)   # it will name a folder (moa_jax/names.py)
    if "messages" in obj and "prompt" in obj:
        raise DataError(f"{where}: give either 'messages' or 'prompt'/'response', not both")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise DataError(f"{where}: 'messages' must be a list of at least 2 {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] must be {{'role': one of {list(_ROLES)}, "
                                f"'content': str}}, got {m!r}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's response, got role "
                            f"{msgs[-1]['role']!r}")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise DataError(f"{where}: 'messages' has no user turn before the response")
        prompt_msgs = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
        response = msgs[-1]["content"]
    else:
        for key in ("prompt", "response"):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r} (need 'prompt' and 'response', or 'messages')")
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        prompt_msgs = [{"role": "user", "content": obj["prompt"]}]
        response = obj["response"]
    if not prompt_msgs[-1]["content"].strip() and len(prompt_msgs) == 1:
        raise DataError(f"{where}: empty prompt")
    if not response.strip():
        raise DataError(f"{where}: empty response")
    meta = obj.get("metadata", "")
    return domain.strip(), {"messages": prompt_msgs, "response": response, "answer": str(obj.get("answer", response)),
                            "metadata": meta if isinstance(meta, str) else json.dumps(meta)}


def hash_split(example: dict, holdout_fraction: float) -> str:
    """The split of a flat-layout example: a stable hash of its prompt messages (disjoint, duplicates together)."""
    key = json.dumps(example["messages"], sort_keys=True).encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2 ** 64
    return "validation" if u < holdout_fraction else "test" if u < 2 * holdout_fraction else "train"
