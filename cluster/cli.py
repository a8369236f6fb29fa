"""The ``pdserve`` command: ``serve`` a cluster behind gRPC + HTTP, ``chat`` and ``generate``
against it over gRPC, ``bench`` it, and operate it through Ray (``workers``, ``drain``).
Environment variables are read here and only here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import uuid
from dataclasses import replace
from typing import Any

DEFAULT_KEY_ENV = "PDSERVE_API_KEY"
logger = logging.getLogger("pdserve")


# -- serve ---------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace) -> Any:
    """The root config: the YAML file (if any), then the flags that were given, then the
    API keys of ``server.api_key_env`` (read once, here)."""
    from pdserve.cluster.config import ClusterConfig

    cfg = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    top = {k: v for k, v in (("model", args.model), ("device", args.device),
                             ("dtype", args.dtype), ("transport", args.transport)) if v is not None}
    if args.address is not None:
        top["ray_address"] = None if args.address == "local" else args.address
    roles = {}
    for role, n in (("prefill", args.prefill), ("decode", args.decode)):
        rc = getattr(cfg, role)
        if n is not None:
            rc = replace(rc, replicas=n)
        if args.num_blocks is not None:
            rc = replace(rc, num_blocks=args.num_blocks)
        roles[role] = rc
    server = {k: v for k, v in (
        ("host", args.host), ("grpc_port", args.grpc_port), ("http_port", args.http_port),
        ("api_key_env", args.api_key_env), ("tls_cert", args.tls_cert), ("tls_key", args.tls_key),
        ("tls_client_ca", args.tls_client_ca), ("rate_limit_rps", args.rate_limit_rps),
        ("rate_limit_tps", args.rate_limit_tps), ("max_queued_requests", args.max_queued_requests),
    ) if v is not None}
    srv = replace(cfg.server, **server)
    if srv.api_key_env:
        raw = os.environ.get(srv.api_key_env, "")
        keys = tuple(k.strip() for k in raw.split(",") if k.strip())
        if not keys:  # fail closed: auth was asked for
            raise SystemExit(f"pdserve serve: ${srv.api_key_env} (server.api_key_env) is empty")
        srv = replace(srv, api_keys=srv.api_keys + keys)
    cfg = replace(cfg, **top, **roles, server=srv)
    cfg.validate()
    return cfg


async def serve_until_signal(router: Any, cfg: Any) -> None:
    from pdserve.cluster.app import Serving

    serving = await Serving.start(router, cfg.server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"pdserve: gRPC on {cfg.server.host}:{serving.grpc_port}, HTTP on "
          f"{cfg.server.host}:{serving.http_port}", file=sys.stderr, flush=True)
    await stop.wait()
    print("pdserve: shutting down", file=sys.stderr, flush=True)
    await serving.stop(grace=5.0)


def cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.cluster.launcher import PDCluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = build_config(args)
    s = cfg.server
    if s.host not in ("127.0.0.1", "localhost", "::1") and not (s.api_keys and s.tls_cert):
        logger.warning("serving on %s without %s", s.host,
                       " and ".join(x for x, on in (("API keys", s.api_keys), ("TLS", s.tls_cert))
                                    if not on))
    cluster = PDCluster.start(cfg)
    try:
        asyncio.run(serve_until_signal(cluster.router, cfg))
    finally:
        cluster.shutdown()
    return 0


# -- clients -------------------------------------------------------------------------------------
def target(args: argparse.Namespace) -> Any:
    from pdserve.cluster.grpc_client import Target

    key = args.api_key or os.environ.get(args.api_key_env or DEFAULT_KEY_ENV) or None
    return Target(args.address, key, tls=args.tls, ca_cert=args.ca_cert,
                  client_cert=args.client_cert, client_key=args.client_key)


def _stream(client: Any, request: Any, timeout: float | None) -> tuple[str, Any]:
    import grpc

    text, last = [], None
    try:
        for r in client.generate(request, timeout=timeout):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            text.append(r.text)
            if r.truncated_prompt_tokens:
                print(f"[{r.truncated_prompt_tokens} prompt tokens truncated]", file=sys.stderr)
            last = r
    except grpc.RpcError as e:
        print(f"\npdserve: {e.code().name}: {e.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text), last


def _params(args: argparse.Namespace) -> Any:
    from pdserve.cluster.grpc_client import sampling

    return sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)


def cmd_chat(args: argparse.Namespace) -> int:
    from pdserve.cluster.grpc_client import Client, chat_request

    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    session = uuid.uuid4().hex if args.session else None
    interactive = sys.stdin.isatty() and not args.message
    lines = iter(args.message) if args.message else None
    with Client(target(args)) as client:
        while True:
            if lines is not None:
                line = next(lines, None)
            else:
                try:
                    line = input("> " if interactive else "")
                except EOFError:
                    line = None
            if line is None:
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            req = chat_request(history, _params(args), truncation=args.truncation,
                               session_id=session)
            answer, last = _stream(client, req, args.timeout)
            history.append({"role": "assistant", "content": answer})
            if args.usage and last is not None:
                u = last.usage
                print(f"[prompt {u.prompt_tokens} (cached {u.cached_prompt_tokens}), "
                      f"completion {u.completion_tokens}]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from pdserve.cluster.grpc_client import Client, text_request

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    with Client(target(args)) as client:
        _, last = _stream(client, text_request(prompt, _params(args), truncation=args.truncation),
                          args.timeout)
    if args.usage and last is not None:
        u = last.usage
        print(f"[prompt {u.prompt_tokens} (cached {u.cached_prompt_tokens}), "
              f"completion {u.completion_tokens}]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench import run_cli

    key = args.api_key or os.environ.get(args.api_key_env or DEFAULT_KEY_ENV) or None
    return run_cli(args, key)


# -- parser --------------------------------------------------------------------------------------
# -- operate a running cluster (through Ray: the trusted cluster's own access) ---------------
def _router(args: argparse.Namespace) -> Any:
    """The running cluster's router actor, by name: the only ``pdserve-router-*`` in the Ray
    cluster (in ``--namespace`` if given), or ``--router``."""
    import ray

    if not ray.is_initialized():
        ray.init(address=args.ray_address, namespace=args.namespace, log_to_driver=False,
                 logging_level=logging.WARNING)
    found = [(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
             if (a["name"] == args.router if args.router else a["name"].startswith("pdserve-router-"))
             and args.namespace in (None, a["namespace"])]
    if len(found) != 1:
        where = f" in Ray namespace {args.namespace!r}" if args.namespace else ""
        listed = ", ".join(f"{n} (namespace {ns})" for ns, n in sorted(found))
        raise SystemExit(f"pdserve: {len(found)} routers{where}"
                         + (f": {listed}; pick one with --router/--namespace" if found else ""))
    namespace, name = found[0]
    return ray.get_actor(name, namespace=namespace)


def cmd_workers(args: argparse.Namespace) -> int:
    import ray

    rows = ray.get(_router(args).worker_table.remote(), timeout=60)
    print(f"{'WORKER':<30} {'ROLE':<8} {'STATE':<9} {'RUNNING':>7} {'WAITING':>7} {'FREE BLOCKS':>13}")
    for r in rows:
        blocks = f"{r['free_blocks']}/{r['total_blocks']}"
        print(f"{r['worker_id']:<30} {r['role']:<8} {r['state']:<9} {r['running']:>7} "
              f"{r['waiting']:>7} {blocks:>13}")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Take a worker out of service (see Router.drain_worker); exit 2 on a refused drain."""
    import ray

    from pdserve.workers.errors import InvalidRequestError, UnavailableError

    try:
        new = ray.get(_router(args).drain_worker.remote(args.worker_id, args.replace, args.timeout))
    except InvalidRequestError as e:
        print(f"pdserve drain: {e.field}: {e.message}", file=sys.stderr)
        return 2
    except UnavailableError as e:
        print(f"pdserve drain: {e}", file=sys.stderr)
        return 1
    print(f"{args.worker_id} drained and stopped" + (f"; {new} took its place" if new else ""))
    return 0


def _ray_flags(p: argparse.ArgumentParser) -> None:
    # (no pdserve.cluster.config import here: the client commands must stay light)
    p.add_argument("--ray-address", default="auto", help="the Ray cluster pdserve runs on")
    p.add_argument("--namespace", default=None,
                   help="the config's ray_namespace (default 'pdserve'), where the Ray "
                        "cluster holds several routers")
    p.add_argument("--router", default=None,
                   help="the router actor's name (pdserve-router-...), where there are several")


def _client_flags(p: argparse.ArgumentParser, default_address: str = "127.0.0.1:50051") -> None:
    p.add_argument("--address", default=default_address, help="host:port of the gRPC server")
    p.add_argument("--api-key", default=None, help=f"API key (default: ${DEFAULT_KEY_ENV})")
    p.add_argument("--api-key-env", default=None, help="env var holding the API key")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    p.add_argument("--ca-cert", default=None)
    p.add_argument("--client-cert", default=None, help="mutual TLS")
    p.add_argument("--client-key", default=None)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--truncation", choices=("disabled", "auto"), default="disabled")
    p.add_argument("--timeout", type=float, default=None, help="deadline per request (s)")
    p.add_argument("--usage", action="store_true", help="print token usage to stderr")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start (or join) a cluster and serve gRPC + HTTP")
    s.add_argument("--config", default=None, help="YAML file of a ClusterConfig")
    s.add_argument("--address", default=None,
                   help="Ray address: 'auto' joins the running cluster; 'local' starts one")
    s.add_argument("--model", default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default=None)
    s.add_argument("--transport", default=None, choices=("auto", "object_store", "grpc", "collective"),
                   help="how KV blocks move between workers (auto: NCCL collective when every worker has a GPU)")
    s.add_argument("--prefill", type=int, default=None, help="prefill workers")
    s.add_argument("--decode", type=int, default=None, help="decode workers")
    s.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker")
    s.add_argument("--host", default=None)
    s.add_argument("--grpc-port", type=int, default=None)
    s.add_argument("--http-port", type=int, default=None)
    s.add_argument("--api-key-env", default=None, help="env var of comma-separated API keys")
    s.add_argument("--tls-cert", default=None)
    s.add_argument("--tls-key", default=None)
    s.add_argument("--tls-client-ca", default=None, help="require client certificates (mTLS)")
    s.add_argument("--rate-limit-rps", type=float, default=None, help="requests/s per key")
    s.add_argument("--rate-limit-tps", type=float, default=None, help="tokens/s per key")
    s.add_argument("--max-queued-requests", type=int, default=None)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="chat over gRPC (reads turns from stdin)")
    _client_flags(c)
    _sampling_flags(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--session", action="store_true",
                   help="keep each turn's KV blocks on the decode worker for the next turn")
    c.add_argument("--message", "-m", action="append", default=None,
                   help="a user turn (repeatable); without it, turns come from stdin")
    c.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="complete a text prompt over gRPC")
    _client_flags(g)
    _sampling_flags(g)
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (default: stdin)")
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("workers", help="list a running cluster's workers: role, state, load")
    _ray_flags(w)
    w.set_defaults(func=cmd_workers)

    d = sub.add_parser("drain", help="take a worker out of service: it finishes what it holds "
                                     "(or hands it on at the timeout) and stops")
    d.add_argument("worker_id")
    d.add_argument("--replace", action="store_true",
                   help="start a worker of its role first, in service before the drain begins")
    d.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for its requests (default: the config's drain_timeout_s)")
    _ray_flags(d)
    d.set_defaults(func=cmd_drain)

    b = sub.add_parser("bench", help="benchmark a running server (HTTP or gRPC)")
    from pdserve.cluster.bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
