"""Route, then serve (moa_jax/route_serve.py):
  - ReferenceRouter.logits_batch (one right-padded forward) equals logits() of each prompt alone;
  - the front end against a stand-in upstream (a stdlib HTTP server written here): routed and forced experts, the
    model map, moa_expert in the body, the header and every SSE chunk, micro-batching, bad requests, a dead upstream;
  - bad configurations are one `error:` line and exit code 2;
  - export_peft writes the trained base (base/) and names it, so PEFT and the reference router load offline;
  - end to end on loopback against `transformers serve` (a real OpenAI-compatible server no one here wrote), with
    the front end started from its command line over an export of a tiny model whose experts and routers are
    random: each answer names the expert moa_jax routes the prompt to and is moa_jax's greedy generation for it;
  - benchmarks/studies/base_drift.py on the export's own base (no drift) and on a base that cannot be loaded.
"""
import concurrent.futures
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from moa_jax import reference_router, route_serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERTS = ["alpha", "beta", "gamma"]


# ---- the batched reference-router forward -----------------------------------------------------------------------
def _tiny_router(router_type="linear", decision="last"):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if router_type == "mlp":
        weights = {"hidden/kernel": torch.randn(2, 16, 8), "out/kernel": torch.randn(2, 8, 3)}
    else:
        weights = {"kernel": torch.randn(2, 16, 3)}
    spec = {"experts": EXPERTS, "num_layers": 2, "decision": decision, "router": {"type": router_type},
            "prompt": {"system_prompt": None}}
    return reference_router.ReferenceRouter(spec, weights, model, tokenizer=None)


@pytest.mark.parametrize("router_type,decision", [("linear", "last"), ("mlp", "vote")])
def test_logits_batch_equals_each_prompt_alone(router_type, decision):
    router = _tiny_router(router_type, decision)
    prompts = [[3, 7, 9, 11, 2], [5], [8, 8, 1, 40, 41, 42, 43, 44, 45], [12, 13]]   # lengths 5, 1, 9, 2
    batched = router.logits_batch(prompts)                                          # (N, L, E)
    alone = np.stack([router.logits(p) for p in prompts])
    assert batched.shape == (4, 2, 3)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    assert np.abs(alone[0] - alone[3]).max() > 1e-2           # different prompts: the rows could be mixed up
    assert router.route_batch(prompts) == [router.route(p) for p in prompts]
    with pytest.raises(ValueError, match="at least one prompt"):
        router.logits_batch([])


# ---- the front end against a stand-in upstream ------------------------------------------------------------------
class _Upstream(ThreadingHTTPServer):
    """An OpenAI-style chat server stand-in: answers "<model>|<last message>" (JSON or 3 SSE chunks), records every
    request body."""
    daemon_threads = True

    def __init__(self):
        self.bodies = []
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)


class _UpstreamHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(200, {"object": "list", "data": []})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        text = f"{body['model']}|{body['messages'][-1]['content']}"
        if body["model"] == "missing":
            return self._send(404, {"error": {"message": "no such model"}})
        if not body.get("stream"):
            return self._send(200, {"object": "chat.completion", "model": body["model"],
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in (text[:3], text[3:]):
            event = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _send(self, status, obj):
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _FakeRouter:
    """Routes by the first letter of the last message (a -> alpha, b -> beta, z -> None: abstained to the base
    model, else gamma); records each batch.
    The first batch waits for `release`, so requests sent meanwhile queue up for the next one."""
    experts = EXPERTS

    def __init__(self):
        self.batches, self.entered, self.release = [], threading.Event(), threading.Event()

    def messages(self, msgs):
        return [{"role": "system", "content": "Be brief."}] + msgs

    def route_batch(self, prompts):
        self.entered.set()
        if not self.batches:
            self.release.wait(10)
        self.batches.append(len(prompts))
        return [{"a": "alpha", "b": "beta", "z": None}.get(p[-1]["content"][:1], "gamma") for p in prompts]


@pytest.fixture
def front():
    upstream = _Upstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    router = _FakeRouter()
    batcher = route_serve.MicroBatcher(router.route_batch, max_batch=8, window_s=0.2)
    models = route_serve.model_names(EXPERTS, ["gamma=missing"], "{expert}-lora", "export", "the-base")
    server = route_serve.RouteServer(("127.0.0.1", 0), router, batcher, f"http://127.0.0.1:{upstream.server_port}",
                                     models, timeout=20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, upstream, router
    finally:
        server.shutdown()
        server.server_close()
        batcher.close()
        upstream.shutdown()
        upstream.server_close()


def _post(url, body, timeout=20):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _chat(content, **extra):
    return {"model": "moa", "messages": [{"role": "user", "content": content}], **extra}


def test_front_end_routes_forwards_and_names_the_expert(front):
    server, upstream, router = front
    router.release.set()
    status, headers, raw = _post(server.url, _chat("apple pie"))
    assert status == 200 and headers["X-MoA-Expert"] == "alpha"
    answer = json.loads(raw)
    assert answer["moa_expert"] == "alpha"
    assert answer["choices"][0]["message"]["content"] == "alpha-lora|apple pie"       # --model-format
    sent = upstream.bodies[-1]
    assert sent["model"] == "alpha-lora" and sent["messages"][0] == {"role": "system", "content": "Be brief."}
    # a request naming an expert is forced to it, without routing
    status, headers, raw = _post(server.url, {**_chat("apple"), "model": "beta"})
    assert json.loads(raw)["moa_expert"] == "beta" and upstream.bodies[-1]["model"] == "beta-lora"
    assert router.batches == [1]
    # the upstream's own error is passed on, with the expert named (gamma is mapped to a model it lacks)
    status, headers, raw = _post(server.url, _chat("cherry"))
    assert status == 404 and headers["X-MoA-Expert"] == "gamma" and "no such model" in raw.decode()
    # streaming: SSE chunks come through as they are, each naming the expert
    status, headers, raw = _post(server.url, _chat("banana", stream=True))
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and headers["X-MoA-Expert"] == "beta" and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 2 and all(c["moa_expert"] == "beta" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "beta-lora|banana"
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as resp:
        assert [m["id"] for m in json.load(resp)["data"]] == ["moa"] + EXPERTS + ["base"]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        health = json.load(resp)
    assert health["status"] == "ok" and health["routing"] == {"requests": 3, "forwards": 3}
    # a prompt the router abstains on goes to the upstream's base model (--upstream-base-model), named "base"
    status, headers, raw = _post(server.url, _chat("zebra"))
    assert status == 200 and headers["X-MoA-Expert"] == "base" and json.loads(raw)["moa_expert"] == "base"
    assert upstream.bodies[-1]["model"] == "the-base"


def test_concurrent_requests_are_routed_in_one_forward(front):
    server, upstream, router = front
    words = ["apple", "bread", "cocoa", "avocado", "bean", "corn", "almond"]
    with concurrent.futures.ThreadPoolExecutor(len(words) + 1) as pool:   # the blocker holds one worker
        first = pool.submit(_post, server.url, _chat("blocker"))   # its forward waits for `release`
        assert router.entered.wait(10)
        rest = [pool.submit(_post, server.url, _chat(w)) for w in words]
        deadline = time.monotonic() + 10
        while server.batcher.pending() < len(words) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.batcher.pending() == len(words)               # all of them queued behind the blocker
        router.release.set()
        results = [f.result(timeout=20) for f in [first] + rest]
    assert router.batches == [1, len(words)]
    for word, (status, headers, raw) in zip(["blocker"] + words, results):
        expected = {"a": "alpha", "b": "beta"}.get(word[0], "gamma")
        assert status == (404 if expected == "gamma" else 200), word
        assert headers["X-MoA-Expert"] == expected, word


def test_bad_requests_and_a_dead_upstream(front):
    server, upstream, router = front
    router.release.set()
    for body in ({"model": "moa"}, {"messages": "hi"}, {"messages": [{"role": "user", "content": 3}]}, [1]):
        status, _, raw = _post(server.url, body)
        assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error", body
    assert router.batches == []                                     # refused before routing
    upstream.shutdown()
    upstream.server_close()
    status, headers, raw = _post(server.url, _chat("apple"))
    assert status == 502 and headers["X-MoA-Expert"] == "alpha" and "upstream" in json.loads(raw)["error"]["message"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_configuration_is_one_error_line(tmp_path, capsys):
    dead = f"http://127.0.0.1:{_free_port()}"
    cases = {"no such directory": ["--export", str(tmp_path / "nope"), "--upstream", dead],
             "no router.json": ["--export", str(tmp_path), "--upstream", dead]}
    servable_false = tmp_path / "adapted"
    servable_false.mkdir()
    (servable_false / "router.json").write_text(json.dumps({"format": reference_router.FORMAT, "servable": False,
                                                            "route_on": "adapted", "experts": EXPERTS}))
    cases["route_on='adapted'"] = ["--export", str(servable_false), "--upstream", dead]
    servable = tmp_path / "probe"
    servable.mkdir()
    (servable / "router.json").write_text(json.dumps({"format": reference_router.FORMAT, "servable": True,
                                                      "route_on": "probe", "experts": EXPERTS}))
    cases["unreachable"] = ["--export", str(servable), "--upstream", dead]
    cases["no expert named 'delta'"] = ["--export", str(servable), "--upstream", dead, "--model-map", "delta=x"]
    cases["http:// or https://"] = ["--export", str(servable), "--upstream", "localhost:8000"]
    abstains = tmp_path / "abstains"
    abstains.mkdir()
    (abstains / "router.json").write_text(json.dumps({"format": reference_router.FORMAT, "servable": True,
                                                      "route_on": "probe", "experts": EXPERTS, "routing_policy": {
                                                          "abstain_below": 0.4, "fallback": "base"}}))
    cases["pass --upstream-base-model"] = ["--export", str(abstains), "--upstream", dead]
    for expected, argv in cases.items():
        assert route_serve.main(argv) == 2, expected
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err


# ---- end to end: transformers serve behind the front end --------------------------------------------------------
PROMPTS = ["Name a prime above 10.", "Reverse the word 'lamp'.", "Spell 'cat' backward.", "Sort 5, 1, 4.",
           "Count the vowels in 'banana'.", "What is 9 times 4?"]
MAX_TOKENS = 5
MIN_MARGIN = 1e-3      # moa_jax's top-2 gap of every greedy token and of every routing decision, asserted


def _wait_for(url, proc, deadline, what, log):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"{what} did not answer {url} in time")


@pytest.fixture(scope="module")
def served_export(tmp_path_factory):
    return build_served_export(tmp_path_factory.mktemp("served"), PROMPTS)


def build_served_export(root, prompts):
    """A tiny-random MoA model with random experts and probe routers, exported (PEFT + base/ + router) and merged per
    expert into `root`; -> (export dir, {expert: merged dir}, moa_jax's greedy generations for `prompts`, the top-2
    margin of each prompt's routing decision, the smallest top-2 margin of each prompt's greedy tokens, the model)."""
    import jax
    from flax import traverse_util
    import moa_jax
    from moa_jax.generate.decode import left_pad, route_from_prompt
    model = moa_jax.load_model("tiny-random", moa=moa_jax.MoAConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0,
                                                                    route_on="probe"))
    flat = traverse_util.flatten_dict(model.params)
    rng = np.random.default_rng(3)      # a seed whose routers send PROMPTS to all three experts
    for key, value in flat.items():     # experts that differ clearly, routers that spread the prompts
        if key[-1] == "lora_b" or key[1] == "router":
            flat[key] = jax.numpy.asarray(rng.normal(0, 0.5 if key[-1] == "lora_b" else 1.0, value.shape), "float32")
    model = dataclasses.replace(model, params=traverse_util.unflatten_dict(flat), domains=tuple(EXPERTS),
                                system_prompt="Answer briefly.")
    export = str(root / "export")
    model.export_peft(export)
    merged = {name: model.export_merged(name, str(root / "merged" / name)) for name in EXPERTS}
    gens = model.generate(prompts, max_new_tokens=MAX_TOKENS)
    # the margins that make the comparison meaningful: routing logits and each greedy step's logits
    seqs = [model.encode_prompt(p) for p in prompts]
    tokens, mask = left_pad(seqs, 0)
    _, route_logits = route_from_prompt(model.config, model.moa, model.params, jax.numpy.asarray(tokens),
                                        jax.numpy.asarray(mask))
    last = np.sort(np.asarray(route_logits)[-1], axis=-1)                              # (N, E), decision 'last'
    route_margin = last[:, -1] - last[:, -2]
    tokens, mask = left_pad([list(seq) + list(gen.token_ids) for seq, gen in zip(seqs, gens)], 0)   # (N, T)
    forced = {e: model.logits(tokens, attention_mask=mask, routing="forced", expert=e)               # (N, T, V)
              for e in {gen.expert for gen in gens}}
    token_margin = []
    for i, gen in enumerate(gens):           # the logits that chose each generated token
        steps = np.sort(forced[gen.expert][i, tokens.shape[1] - len(gen.token_ids) - 1:-1], axis=-1)
        token_margin.append(float((steps[:, -1] - steps[:, -2]).min()))
    return export, merged, gens, route_margin, np.asarray(token_margin), model


def test_export_names_the_trained_base_and_loads_offline(served_export, monkeypatch):
    """export_peft of a tiny-random model writes base/ (the weights moa_jax ran) and names it: router.json relative,
    adapter_config.json absolute; PEFT then loads an expert with no base given, offline, and matches moa_jax."""
    from peft import AutoPeftModelForCausalLM
    export, _, _, _, _, model = served_export
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = json.load(open(os.path.join(export, "router.json")))
    assert spec["base_dir"] == "base" and spec["base_model"] == "tiny-random"
    assert reference_router.base_of(export, spec) == os.path.realpath(os.path.join(export, "base"))
    config = json.load(open(os.path.join(export, "beta", "adapter_config.json")))
    assert config["base_model_name_or_path"] == os.path.abspath(os.path.join(export, "base"))
    assert sorted(os.listdir(export)) == sorted(EXPERTS + ["base", "reference_router.py", "route_serve.py",
                                                           "router.json", "router.safetensors", "tokenizer"])
    peft_model = AutoPeftModelForCausalLM.from_pretrained(os.path.join(export, "beta")).eval()
    ids = model.encode_prompt(PROMPTS[0])
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    ours = model.logits([ids], routing="forced", expert=EXPERTS.index("beta"))[0]
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
    assert np.abs(ours - model.logits([ids], routing="base")[0]).max() > 1e-2   # the expert changes the logits


def test_route_then_serve_end_to_end_with_transformers_serve(served_export, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    export, merged, gens, route_margin, token_margin, _ = served_export
    # the check can fail: every decision it compares has a clear winner, and the prompts use several experts
    assert route_margin.min() > MIN_MARGIN and token_margin.min() > MIN_MARGIN, (route_margin, token_margin)
    assert len({g.expert for g in gens}) > 1 and all(len(g.token_ids) == MAX_TOKENS for g in gens)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    up_port, front_port = _free_port(), _free_port()
    procs, logs = [], {name: tmp_path / f"{name}.log" for name in ("upstream", "front")}
    try:
        with open(logs["upstream"], "w") as log:   # a file, not a pipe no one reads: the server never blocks on it
            upstream = subprocess.Popen(
                [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1", "--port",
                 str(up_port), "--device", "cpu", "--dtype", "float32"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
        procs.append(upstream)
        deadline = time.monotonic() + 120
        _wait_for(f"http://127.0.0.1:{up_port}/v1/models", upstream, deadline, "transformers serve", logs["upstream"])
        with open(logs["front"], "w") as log:        # after the upstream answers: the front end checks it at start
            front = subprocess.Popen(
                [sys.executable, "-m", "moa_jax.cli.route_serve", "--export", export, "--upstream",
                 f"http://127.0.0.1:{up_port}", "--port", str(front_port), "--batch-window-ms", "50",
                 *[arg for name, path in merged.items() for arg in ("--model-map", f"{name}={path}")]],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
        procs.append(front)
        url = f"http://127.0.0.1:{front_port}"
        _wait_for(url + "/health", front, deadline, "route_serve", logs["front"])

        def ask(i):
            body = {"model": "moa", "messages": [{"role": "user", "content": PROMPTS[i]}], "temperature": 0,
                    "max_tokens": MAX_TOKENS, "stream": i == 0}
            return _post(url, body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(ask, range(len(PROMPTS))))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    for i, (status, headers, raw) in enumerate(answers):
        assert status == 200, (i, raw[-2000:], logs["upstream"].read_text()[-2000:])
        expected = EXPERTS[gens[i].expert]
        assert headers["X-MoA-Expert"] == expected, i
        if i == 0:   # streamed: the deltas concatenate to the answer, every chunk names the expert
            events = [json.loads(line[6:]) for line in raw.decode().splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            assert all(e["moa_expert"] == expected for e in events)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        else:
            answer = json.loads(raw)
            assert answer["moa_expert"] == expected, i
            text = answer["choices"][0]["message"]["content"]
        assert text == gens[i].text, (i, PROMPTS[i])


def test_base_drift_study_on_the_same_base_and_a_missing_one(served_export, tmp_path, capsys):
    """benchmarks/studies/base_drift.py: the export's own base/ named as the other base drifts by exactly nothing;
    a base that cannot be loaded is one `error:` line and exit code 2."""
    from benchmarks.studies import base_drift
    export = served_export[0]
    out = tmp_path / "drift.json"
    assert base_drift.main(["--export", export, "--base", os.path.join(export, "base"), "--exp", "smoke",
                            "--items-per-domain", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 10 and result["routing"]["agreement"] == 1.0
    assert result["routing"]["router_logits_max_abs"] == 0.0 and result["logits"]["max_abs"] == 0.0
    assert result["logits"]["top1_agreement"] == 1.0 and "accuracy" not in result["routing"]   # experts != domains
    capsys.readouterr()
    assert base_drift.main(["--export", export, "--base", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "--base" in err, err
