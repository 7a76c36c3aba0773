#!/usr/bin/env python3
"""Local Helix cluster from one JSON file: context servers, Helix generation instances and the
router on this machine (Python standard library only).

  deploy/cluster.py up --config cluster.json [--build build]   # start, wait until ready, run
  deploy/cluster.py chat --url http://127.0.0.1:8000 --model NAME --prompt TEXT [--max-tokens N]
                         [--completion]

`up` writes each server's config into a run folder, starts every process in its own session,
waits for the router's /ready, prints the endpoints, and runs until SIGINT/SIGTERM, when it
stops everything it started (by pid). If a server dies, the others are stopped too.

cluster.json:
  {
    "model": "path/to/model.gguf", "tokenizer": null, "host": "127.0.0.1",
    "router": {"port": 8000, "grpc_port": 0, "served_model_name": null, "api_key": null,
               "chat_template": ""},
    "context_servers": {"count": 1, "base_port": 50051},
    "generation_servers": {"count": 1, "base_port": 50061, "tensor_parallel_size": 1,
                           "context_parallel_size": 2},
    "server": {  # merged into every context and generation server's config (no "server" in it:
                 # cluster.py sets their host and port)
      "num_threads": 1, "max_seq_len": 2048,
      "kv_cache_config": {"tokens_per_block": 32, "max_tokens": 65536, "dtype": "float32"},
      "cache_transceiver_config": {"backend": "UCX", "kv_transfer_timeout_ms": 30000}
    }
  }
Relative paths are taken from the cluster file's folder.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def port_open(host, port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def http_json(url, body=None, key=None, timeout=5):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


class UsageError(Exception):
    """A bad cluster file or argument: one line, exit code 2."""


def load_cluster(path):
    try:
        with open(path) as f:
            c = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}")
    if not isinstance(c, dict):
        raise UsageError(f"{path}: expected a JSON object")
    if not isinstance(c.get("model"), str):
        raise UsageError(f"{path}: 'model' is required (a path)")
    for k in ("router", "context_servers", "generation_servers", "server"):
        if k in c and not isinstance(c[k], dict):
            raise UsageError(f"{path}: '{k}' must be an object")
    # Every key this file takes, with its kind: a misspelt one would be ignored, and a number
    # given as a string failed later with a Python traceback.
    def integer(lo, hi):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, \
            f"an integer in {lo}..{hi}"
    text = (lambda v: isinstance(v, str), "a string")
    text_or_null = (lambda v: v is None or isinstance(v, str), "a string or null")
    port = integer(1, 65535)
    schema = {
        "": {"model": text, "tokenizer": text_or_null, "host": text, "router": None,
             "context_servers": None, "generation_servers": None, "server": None},
        "router": {"port": port, "grpc_port": integer(0, 65535),
                   "served_model_name": text_or_null, "api_key": text_or_null,
                   "chat_template": text_or_null},
        "context_servers": {"count": integer(0, 64), "base_port": port,
                            "kv_lease_ms": integer(1, 86400000)},
        "generation_servers": {"count": integer(1, 64), "base_port": port,
                               "tensor_parallel_size": integer(1, 64),
                               "context_parallel_size": integer(1, 64)},
    }
    for section, keys in schema.items():
        obj = c if section == "" else c.get(section, {})
        for k, v in obj.items():
            name = k if section == "" else f"{section}.{k}"
            if k not in keys:
                raise UsageError(f"{path}: unknown key '{name}' (known: "
                                 f"{', '.join(sorted(keys))})")
            if keys[k] is not None and not keys[k][0](v):
                raise UsageError(f"{path}: '{name}' = {json.dumps(v)}: expected {keys[k][1]}")
    # "server" goes to the servers, which check it; the parts read here must be objects.
    for k in ("kv_cache_config", "cache_transceiver_config"):
        if k in c.get("server", {}) and not isinstance(c["server"][k], dict):
            raise UsageError(f"{path}: 'server.{k}' must be an object")
    return c


def up(args):
    try:
        return run_up(args)
    except UsageError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 2


def run_up(args):
    base = os.path.dirname(os.path.abspath(args.config))
    c = load_cluster(args.config)

    def path(p):
        return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    host = c.get("host", "127.0.0.1")
    build = os.path.abspath(args.build)
    for b in ("helix-ctx", "helix-gen", "helix-router"):
        if not os.access(os.path.join(build, "server", b), os.X_OK):
            raise UsageError(f"no {b} under {build}/server (build first, or give --build)")
    server = c.get("server", {})
    if "server" in server:
        # It would replace the host and port each server is given, and the router sends servers
        # no API key and does not use TLS towards them.
        raise UsageError("'server.server' is not taken by cluster.py: it sets each server's host "
                         "and port itself (from 'host' and the base ports), and the router talks "
                         "to the servers without an API key or TLS")
    run = tempfile.mkdtemp(prefix="helix_cluster_")
    procs = []

    def start(name, argv, cfg_path):
        log = open(os.path.join(run, name + ".log"), "w")
        env = dict(os.environ)
        if host in ("127.0.0.1", "localhost"):
            env.setdefault("UCX_NET_DEVICES", "lo")
        p = subprocess.Popen(argv + ["--config", cfg_path], stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        procs.append((name, p, log))
        return p

    def stop_all():
        # A second Ctrl-C or SIGTERM must not cut this short (a hung server would outlive us).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for name, p, log in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for name, p, log in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()

    def server_cfg(port, extra):
        cfg = {"model": path(c["model"]), "backend": "cpu",
               "server": {"host": host, "port": port}, "logging": {"level": "info"}}
        if c.get("tokenizer"):
            cfg["tokenizer"] = path(c["tokenizer"])
        cfg.update(server)
        cfg.update(extra)
        return cfg

    def write(name, cfg):
        p = os.path.join(run, name + ".json")
        with open(p, "w") as f:
            json.dump(cfg, f, indent=2)
        return p

    # SIGTERM, and SIGHUP (the terminal or ssh session closed), stop the cluster as Ctrl-C does:
    # the servers run in their own sessions and would otherwise be left running.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Started in the background by a shell without job control, SIGINT arrives ignored, and
    # Python then leaves it so: `kill -INT` must stop the cluster too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ready = False
    try:
        # Every port must be free first: a server of another cluster on one would answer in its
        # place (the router's /ready among them).
        r = c.get("router", {})
        ctx_cfg = c.get("context_servers", {"count": 0})
        gen_cfg = c.get("generation_servers", {"count": 1})
        ports = [("router", r.get("port", 8000))]
        if r.get("grpc_port"):
            ports.append(("router gRPC", r["grpc_port"]))
        ports += [(f"ctx{i}", ctx_cfg.get("base_port", 50051) + i)
                  for i in range(ctx_cfg.get("count", 0))]
        ports += [(f"gen{i}", gen_cfg.get("base_port", 50061) + i)
                  for i in range(gen_cfg.get("count", 1))]
        seen = {}
        for name, port in ports:
            if port in seen:
                raise UsageError(f"{name} and {seen[port]} would both use port {port}")
            seen[port] = name
            if port_open(host, port):
                raise UsageError(f"port {port} ({name}) is already in use on {host}")
        ctx = c.get("context_servers", {"count": 0})
        ctx_urls = []
        for i in range(ctx.get("count", 0)):
            port = ctx.get("base_port", 50051) + i
            cfg = server_cfg(port, {"kv_lease_ms": ctx.get("kv_lease_ms", 30000)})
            start(f"ctx{i}", [os.path.join(build, "server", "helix-ctx"), "serve"],
                  write(f"ctx{i}", cfg))
            ctx_urls.append(f"{host}:{port}")
        gen = c.get("generation_servers", {"count": 1})
        gen_urls = []
        for i in range(gen.get("count", 1)):
            port = gen.get("base_port", 50061) + i
            tp, cp = gen.get("tensor_parallel_size", 1), gen.get("context_parallel_size", 1)
            extra = {"tensor_parallel_size": tp, "context_parallel_size": cp}
            if ctx_urls and host not in ("0.0.0.0", "::"):
                # Handles from these context servers only (their handles name exactly these).
                ctc = dict(server.get("cache_transceiver_config", {}))
                ctc["allowed_context_servers"] = ctx_urls
                extra["cache_transceiver_config"] = ctc
            if cp > 1:
                tpb = server.get("kv_cache_config", {}).get("tokens_per_block", 32)
                extra["cp_config"] = {"cp_type": "HELIX", "tokens_per_block": tpb}
            start(f"gen{i}", [os.path.join(build, "server", "helix-gen"), "serve"],
                  write(f"gen{i}", server_cfg(port, extra)))
            gen_urls.append(f"{host}:{port}")
        r = c.get("router", {})
        rcfg = {"server": {"host": host, "port": r.get("port", 8000)},
                "grpc_port": r.get("grpc_port", 0), "model": path(c["model"]),
                "context_servers": {"urls": ctx_urls, "router": {"type": "round_robin"}},
                "generation_servers": {"urls": gen_urls, "router": {"type": "load_balancing"}},
                "logging": {"level": "info"}}
        for k in ("served_model_name", "api_key", "chat_template"):
            if r.get(k):
                rcfg[k] = r[k]
        if c.get("tokenizer"):
            rcfg["tokenizer"] = path(c["tokenizer"])
        start("router", [os.path.join(build, "server", "helix-router")], write("router", rcfg))
        url = f"http://{host}:{rcfg['server']['port']}"
        deadline = time.time() + args.timeout
        while time.time() < deadline and not ready:
            for name, p, log in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {run}/{name}.log")
            try:
                ready = http_json(url + "/ready")[0] == 200
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        if not ready:
            raise RuntimeError(f"the router was not ready within {args.timeout} s; logs in {run}")
        print(f"cluster ready: OpenAI API at {url}/v1 ({len(ctx_urls)} context, "
              f"{len(gen_urls)} generation server(s)); logs and configs in {run}", flush=True)
        if args.ready_file:
            with open(args.ready_file, "w") as f:
                f.write(url + "\n")
        while True:
            for name, p, log in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {run}/{name}.log")
            time.sleep(0.5)
    except KeyboardInterrupt:
        if not ready:
            print("cluster: interrupted before the cluster was ready", file=sys.stderr)
            return 130
        return 0
    except RuntimeError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    finally:
        stop_all()


def chat(args):
    """Streams one chat completion's (or, with --completion, one completion's) text."""
    body = {"model": args.model, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.completion:
        body["prompt"] = args.prompt
    else:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    path = "/v1/completions" if args.completion else "/v1/chat/completions"
    req = urllib.request.Request(args.url.rstrip("/") + path, data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    usage = None
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                for ch in chunk.get("choices", []):
                    text = ch.get("text") if args.completion else ch.get("delta", {}).get("content")
                    print(text or "", end="", flush=True)
                usage = chunk.get("usage") or usage
    except urllib.error.HTTPError as e:
        print(f"error {e.code}: {e.read().decode()}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ValueError, OSError) as e:
        print(f"cannot reach {args.url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    print()
    if usage:
        print(f"[usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
              f"completion tokens]", file=sys.stderr)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start a cluster and run until interrupted")
    u.add_argument("--config", required=True)
    u.add_argument("--build", default="build")
    u.add_argument("--timeout", type=float, default=300, help="seconds to wait for /ready")
    u.add_argument("--ready-file", help="write the router URL here once ready")
    c = sub.add_parser("chat", help="stream one chat completion")
    c.add_argument("--url", default="http://127.0.0.1:8000")
    c.add_argument("--model", required=True)
    c.add_argument("--prompt", required=True)
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0)
    c.add_argument("--api-key")
    c.add_argument("--completion", action="store_true", help="/v1/completions, not chat")
    args = ap.parse_args()
    return up(args) if args.cmd == "up" else chat(args)


if __name__ == "__main__":
    sys.exit(main())
