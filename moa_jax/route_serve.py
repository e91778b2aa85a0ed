"""Route, then serve: an OpenAI-compatible chat front end that picks each request's expert with an export's reference
router and forwards the request to a multi-LoRA server (vLLM with --enable-lora, LoRAX, SGLang, `transformers
serve`, ...) naming that expert's adapter as the `model`.

    python -m moa_jax.cli.route_serve --export export/peft --upstream http://127.0.0.1:8000 --port 8080
    python export/peft/route_serve.py --export export/peft --upstream ...    # the copy in a servable export

Needs the Python standard library and the export's reference_router (transformers + torch + numpy); no jax and no
web framework. `moa_jax.export.export_peft` copies this file beside reference_router.py into a servable export, so
a server host needs only that directory. Routes:
  POST /v1/chat/completions   routed and forwarded; the answer is the upstream's, plus `moa_expert` (the chosen
                              expert) in the JSON body, in every streamed (stream=true, SSE) chunk, and in the
                              `X-MoA-Expert` header. `model`: an expert's name forces that expert; any other value
                              (e.g. "moa") is routed. The messages are forwarded as routing saw them: the training
                              system prompt of router.json is prepended unless they hold a system turn.
  GET  /v1/models             "moa" (routed) and the expert names
  GET  /health                status, experts, upstream, routing counters (requests, forwards)
Routing is micro-batched: the first waiting request opens a window of --batch-window-ms; the requests that arrive
meanwhile, up to --max-batch, are routed together in one padded forward (ReferenceRouter.route_batch, equal to
routing each alone). The upstream model name of an expert is the expert's name (vLLM's --lora-modules NAME=PATH),
or --model-map NAME=MODEL, or --model-format (e.g. '{export}/{expert}' for servers that load a path). A bad
configuration (no export directory, routers that are not servable, an upstream that does not answer at start, a
--model-map naming no expert) is one `error:` line and exit code 2.
A prompt the router abstains on (router.json's routing_policy: calibrated confidence below abstain_below) goes to
the policy's fall-back: a named expert, or the base model, which the upstream serves under --upstream-base-model
(required when the policy can abstain to it); its `moa_expert` is then "base".
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Sequence

if __package__:                 # moa_jax.route_serve
    from moa_jax import reference_router
else:                           # the copy in an export directory, run as a script beside reference_router.py
    import reference_router

log = logging.getLogger("route_serve")
ROUTED = "moa"                  # the `model` that asks for routing (any name that is not an expert does too)
BASE = "base"                   # moa_expert of a prompt sent to the base model (no expert may take this name)
EXPERT_HEADER = "X-MoA-Expert"
USER_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A configuration the front end cannot start with; main prints it as one `error:` line, exit code 2."""


class RequestError(ValueError):
    """A client request the front end refuses (HTTP 400, OpenAI's error format)."""


# ---- micro-batched routing ----------------------------------------------------------------------------------------
class MicroBatcher:
    """Routes prompts in batches on one thread: route_batch(prompts) -> expert names (None: the base model) is
    called with the prompts that arrived within `window_s` of the first waiting one, at most `max_batch` of them."""

    def __init__(self, route_batch: Callable[[list], list], max_batch: int = 16, window_s: float = 0.005):
        self._route_batch, self.max_batch, self.window_s = route_batch, max_batch, window_s
        self._queue: queue.Queue = queue.Queue()
        self.requests = self.forwards = 0            # prompts routed, padded forwards run
        self._thread = threading.Thread(target=self._loop, name="route-batcher", daemon=True)
        self._thread.start()

    def route(self, prompt, timeout: Optional[float] = None) -> Optional[str]:
        future: Future = Future()
        self._queue.put((prompt, future))
        return future.result(timeout)

    def pending(self) -> int:
        """Prompts waiting for a forward."""
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, deadline, stop = [first], time.monotonic() + self.window_s, False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                experts = self._route_batch([prompt for prompt, _ in batch])
            except Exception as e:   # noqa: BLE001 - handed to every waiting request, which answers 500
                for _, future in batch:
                    future.set_exception(e)
            else:
                self.requests += len(batch)
                self.forwards += 1
                for (_, future), expert in zip(batch, experts):
                    future.set_result(expert)
            if stop:
                return


# ---- configuration ------------------------------------------------------------------------------------------------
def upstream_base(url: str) -> str:
    """http://host:port or http://host:port/v1 -> http://host:port (the routes are appended)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--upstream {url!r}: give an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    return url[:-3] if url.endswith("/v1") else url


def check_upstream(base: str, timeout: float = 10.0) -> None:
    """GET /v1/models of the upstream; ConfigError unless it answers."""
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        raise ConfigError(f"--upstream {base}: GET /v1/models answered HTTP {e.code}; is it an OpenAI-compatible "
                          f"server?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"--upstream {base}: unreachable ({reason}); start the server first or fix the URL") from None


def model_names(experts: Sequence[str], pairs: Sequence[str], fmt: Optional[str], export: str,
                base_model: Optional[str] = None) -> dict[str, str]:
    """expert -> the `model` the upstream serves it under: NAME=MODEL pairs, else fmt ({expert}, {export}), else
    the expert's own name; plus BASE -> base_model (the upstream's name of the base model) when given."""
    out = {e: fmt.format(expert=e, export=os.path.abspath(export)) if fmt else e for e in experts}
    for pair in pairs:
        name, sep, model = pair.partition("=")
        if not sep or not model:
            raise ConfigError(f"--model-map {pair!r}: write NAME=MODEL (NAME an expert: {', '.join(experts)})")
        if name not in out:
            raise ConfigError(f"--model-map {pair!r}: no expert named {name!r}; experts: {', '.join(experts)}")
        out[name] = model
    if base_model:
        out[BASE] = base_model
    return out


def routing_text(messages: Any) -> list[dict]:
    """A request's messages as routing reads them (role + text); RequestError when they are not a chat."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):   # content parts: routing reads their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError("each message's 'content' must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


# ---- the HTTP front end -------------------------------------------------------------------------------------------
class RouteServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, router, batcher: MicroBatcher, upstream: str, models: dict[str, str],
                 timeout: float = 600.0):
        super().__init__(address, _Handler)
        self.router, self.batcher, self.upstream, self.models, self.timeout = router, batcher, upstream, models, timeout

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RouteServer

    def log_message(self, fmt, *args):   # one debug line per request instead of stderr noise
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self):
        s = self.server
        if self.path.rstrip("/") == "/health":
            return self._json(200, {"status": "ok", "experts": s.router.experts, "upstream": s.upstream,
                                    "routing": {"requests": s.batcher.requests, "forwards": s.batcher.forwards}})
        if self.path.rstrip("/") == "/v1/models":
            ids = [ROUTED] + list(s.router.experts) + ([BASE] if BASE in s.models else [])
            return self._json(200, {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "moa_jax"}
                                                              for i in ids]})
        self._error(404, f"no route {self.path}; routes: POST /v1/chat/completions, GET /v1/models, GET /health")

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}; POST /v1/chat/completions")
        s = self.server
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            messages = s.router.messages(routing_text(body.get("messages")))
        except (ValueError, RequestError) as e:   # json.JSONDecodeError is a ValueError
            return self._error(400, f"bad request: {e}")
        forced = body.get("model") in s.models
        try:
            expert = body["model"] if forced else (s.batcher.route(messages, timeout=s.timeout) or BASE)
        except Exception as e:   # noqa: BLE001 - a routing failure is this request's 500, the server goes on
            log.exception("routing failed")
            return self._error(500, f"routing failed: {type(e).__name__}: {e}")
        log.info("expert %s (%s) -> %s", expert, "forced" if forced else "routed", s.models[expert])
        forward = {**body, "model": s.models[expert], "messages": messages}
        request = urllib.request.Request(s.upstream + "/v1/chat/completions", data=json.dumps(forward).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            resp = urllib.request.urlopen(request, timeout=s.timeout)
        except urllib.error.HTTPError as e:   # the upstream's own answer (e.g. 404 unknown model): passed on
            return self._send(e.code, e.read(), e.headers.get("Content-Type", "application/json"), expert)
        except (urllib.error.URLError, OSError) as e:
            return self._error(502, f"upstream {s.upstream}: {getattr(e, 'reason', e)}", expert)
        with resp:
            if "text/event-stream" in resp.headers.get("Content-Type", ""):
                return self._stream(resp, expert)
            payload = resp.read()
            try:
                answer = json.loads(payload)
                answer["moa_expert"] = expert
                payload = json.dumps(answer).encode()
            except (ValueError, TypeError):
                pass   # not a JSON object: passed on as it came
            self._send(resp.status, payload, resp.headers.get("Content-Type", "application/json"), expert)

    def _stream(self, resp, expert: str) -> None:
        """Pass an SSE stream through line by line, adding moa_expert to each JSON `data:` event."""
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.headers.get("Content-Type"))
        self.send_header("Cache-Control", "no-cache")
        self.send_header(EXPERT_HEADER, expert)
        self.end_headers()
        for line in iter(resp.readline, b""):
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                try:
                    event = json.loads(line[5:])
                    event["moa_expert"] = expert
                    line = b"data: " + json.dumps(event).encode() + b"\n"
                except (ValueError, TypeError):
                    pass
            try:
                self.wfile.write(line)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):   # the client left: stop reading the upstream
                return

    def _send(self, status: int, payload: bytes, content_type: str, expert: Optional[str] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if expert is not None:
            self.send_header(EXPERT_HEADER, expert)
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, expert: Optional[str] = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, json.dumps({"error": {"message": message, "type": kind}}).encode(), "application/json",
                   expert)


# ---- command line -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    prog = "python -m moa_jax.cli.route_serve" if __package__ else "route_serve.py"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a servable export directory (router.json, moa_jax export_peft)")
    p.add_argument("--upstream", required=True, help="the OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="listen port (default 8080; 0: any free port)")
    p.add_argument("--model-map", action="append", default=[], metavar="NAME=MODEL",
                   help="the upstream's model name for expert NAME (repeat); default: the expert's name")
    p.add_argument("--model-format", default=None, metavar="FORMAT",
                   help="the upstream's model name of every expert, from {expert} and {export} (its absolute "
                        "path), e.g. '{export}/{expert}' for a server that loads adapter paths")
    p.add_argument("--upstream-base-model", default=None, metavar="MODEL",
                   help="the upstream's model name of the base model (no adapter): where prompts go that the "
                        "router abstains on (needed when router.json's policy abstains to the base)")
    p.add_argument("--base-model", default=None, help="the base checkpoint routing runs (default: the export's)")
    p.add_argument("--device", default="cpu", help="torch device of the routing forward (default cpu)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests routed in one forward (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the first waiting request waits for others to batch with (default 5)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the upstream (default 600)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def load_router(export: str, base_model: Optional[str], device: str):
    """The export's reference router (serve checked router.json first); ConfigError for a base model that cannot
    be loaded."""
    try:
        return reference_router.load(export, base_model, device=device)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--export {export}: cannot load the routing base model ({first}); pass --base-model "
                          f"DIR_OR_HUB_ID") from None


def serve(args: argparse.Namespace) -> RouteServer:
    """Check the configuration, load the router and bind; -> the server (not yet serving)."""
    if args.max_batch < 1 or args.batch_window_ms < 0 or args.timeout <= 0:
        raise ConfigError("--max-batch must be >= 1, --batch-window-ms >= 0 and --timeout > 0")
    upstream = upstream_base(args.upstream)
    if not os.path.isdir(args.export):
        raise ConfigError(f"--export {args.export}: no such directory (write one with moa_jax export_peft)")
    try:
        spec = reference_router.read_spec(args.export)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    models = model_names(spec["experts"], args.model_map, args.model_format, args.export, args.upstream_base_model)
    policy = spec.get("routing_policy", {})
    if policy.get("abstain_below", 0) > 0 and policy.get("fallback", BASE) == BASE and BASE not in models:
        raise ConfigError(f"--export {args.export}: its router abstains to the base model below confidence "
                          f"{policy['abstain_below']:.3g}; pass --upstream-base-model MODEL (the upstream's name for "
                          f"the base, e.g. the path given to vllm serve)")
    check_upstream(upstream)
    router = load_router(args.export, args.base_model, args.device)
    batcher = MicroBatcher(router.route_batch, args.max_batch, args.batch_window_ms / 1000.0)
    try:
        return RouteServer((args.host, args.port), router, batcher, upstream, models, args.timeout)
    except OSError as e:
        batcher.close()
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = serve(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    print(f"route_serve: listening on {server.url} (experts: {', '.join(server.router.experts)}; upstream "
          f"{server.upstream})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.batcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
