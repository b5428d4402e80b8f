"""`kvlab serve`: its arguments and what it runs (`kvlab bench serve` is kvlab.bench.serve.main).

    kvlab serve --model smollm2-135m [--host 127.0.0.1] [--port 8000] [--api-key KEY] [engine flags]
    python -m kvlab.serve ...                     # the same, without the `kvlab` entry point

The engine flags are vLLM's names for EngineConfig's fields (--max-num-seqs,
--max-num-batched-tokens, --block-size, --gpu-memory-utilization, ...). `--port 0` takes a
free port; the first line the server prints says which (kvlab.serve.launcher reads it).
SIGTERM (or Ctrl-C) shuts down gracefully: no new connections, running requests finish
(at most --shutdown-timeout seconds; then they are aborted), the engine loop stops, exit 0.
If the engine core dies, the requests in flight end (finish_reason "abort"), /health turns
503 and the server exits with status 1, for a supervisor to restart it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time

PARENT_PID_ENV = "KVLAB_SERVE_PARENT_PID"     # set by the launcher: exit when that process is gone
API_KEY_ENV = "KVLAB_API_KEY"                  # --api-key's default: keeps the key out of `ps`

def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's flags (one per kvlab.EngineArgs field, vLLM's names), and --torch-threads."""
    from kvlab.engine import EngineArgs

    EngineArgs.add_cli_args(p)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for torch's operators in the engine's process (default: torch's choice). On a "
                        "small or shared CPU, 1 can be much faster: threads that wait for each other stall every step")


def engine_kwargs(args: argparse.Namespace, model=None) -> dict:
    """kvlab.EngineArgs (and kvlab.LLM) keyword arguments from the engine flags that were given; the
    others keep their defaults. model: a LoadedModel to use instead of loading --model."""
    from kvlab.engine import EngineArgs

    kwargs = EngineArgs.cli_kwargs(args)
    if model is not None:
        kwargs["model"] = model
    return kwargs


def engine_args(args: argparse.Namespace):
    from kvlab.engine import EngineArgs

    return EngineArgs(**engine_kwargs(args))


def check_engine_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A usage error (exit 2) for a bad engine flag, named as the flag ("--max-num-seqs must be ...")."""
    from kvlab.engine import EngineArgs

    if getattr(args, "torch_threads", None) is not None and args.torch_threads < 1:
        parser.error(f"--torch-threads {args.torch_threads}: must be >= 1")
    try:
        engine_args(args)
    except (ValueError, TypeError) as err:
        parser.error(EngineArgs.flag_message(str(err)))


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags that were given, as a command line again (for a server in a child process)."""
    from kvlab.engine import EngineArgs

    argv = EngineArgs.to_argv(args)
    if getattr(args, "torch_threads", None) is not None:
        argv += ["--torch-threads", str(args.torch_threads)]
    return argv


def apply_torch_threads(args: argparse.Namespace) -> None:
    if getattr(args, "torch_threads", None) is not None:
        import torch

        torch.set_num_threads(args.torch_threads)


def load_engine_model(args: argparse.Namespace):
    """kvlab.load_model for --model on --device in --dtype."""
    from kvlab.model.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


# ---- kvlab serve ----------------------------------------------------------------------------------

def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server around kvlab's engine",
        description="Serve a model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics). One engine loop serves every connection.")
    add_serve_arguments(p)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    g.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--max-waiting-requests", type=int, default=1000,
                   help="answer 503 with Retry-After once this many requests wait (default 1000)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish before they are aborted (30)")
    g.add_argument("--request-read-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request's headers, and again its body; then 408 and "
                        "the connection closes (slow or stalled clients, slowloris) (default 30)")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open between requests (default 5, as uvicorn)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--access-log", action="store_true", help="log every HTTP request (default off)")


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import uvicorn

    from kvlab.serve.app import TimedHttpProtocol, build_app
    from kvlab.serve.async_engine import AsyncEngine
    from kvlab.serve.engine_core import CoreConfig

    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: a port is 0..65535 (0: any free port)")
    if args.max_waiting_requests < 1:
        parser.error(f"--max-waiting-requests {args.max_waiting_requests}: must be >= 1")
    if not args.shutdown_timeout >= 0:
        parser.error(f"--shutdown-timeout {args.shutdown_timeout}: must be >= 0 seconds")
    for flag in ("request_read_timeout", "timeout_keep_alive"):
        if not 0 < getattr(args, flag) < float("inf"):
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive number of seconds")
    check_engine_flags(args, parser)         # every flag checked before anything loads
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    raise_open_file_limit()

    try:                                    # bind first: a busy port fails before a long model load
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family, backlog=2048)
    except OSError as err:
        print(f"kvlab serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"kvlab serve: {url} (loading {args.model})", flush=True)
    try:                                     # the engine core loads the model in its own process
        engine = AsyncEngine.launch(CoreConfig(engine_args(args), args.max_waiting_requests, args.torch_threads))
    except RuntimeError as err:
        print(f"kvlab serve: {err}", file=sys.stderr)
        sock.close()
        return 1
    if engine.tokenizer is None:
        print("kvlab serve: no tokenizer: prompts are token ids, answers are token ids "
              "(ask for them with 'return_token_ids': true)", flush=True)
    app = build_app(engine, args.served_model_name or args.model, api_key=args.api_key,
                    request_read_timeout=args.request_read_timeout)
    # Every timeout set on purpose: headers and body each within --request-read-timeout (uvicorn has
    # neither; TimedHttpProtocol and read_json add them), idle keep-alive connections closed after
    # --timeout-keep-alive, running requests given --shutdown-timeout on SIGTERM.
    server = uvicorn.Server(uvicorn.Config(app, http=TimedHttpProtocol.with_limits(args.request_read_timeout),
                                           log_level=args.log_level, access_log=args.access_log,
                                           timeout_keep_alive=args.timeout_keep_alive,
                                           timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on"))
    _exit_with_parent(server)
    engine.on_dead = lambda: setattr(server, "should_exit", True)   # a dead engine: exit, to be restarted
    # uvicorn catches SIGTERM/SIGINT while it serves, shuts down gracefully, then re-raises the signal
    # to the handler that was there before; a Python no-op handler there makes that exit status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    print(f"kvlab serve: serving '{args.served_model_name or args.model}' on {url} "
          f"(max_model_len {engine.max_model_len}, {engine.stats.num_blocks} KV blocks)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:                # Ctrl-C: uvicorn re-raises SIGINT after its clean shutdown
        pass
    if engine.error is not None:
        print(f"kvlab serve: stopped because the engine failed: {engine.error}", file=sys.stderr, flush=True)
        return 1
    print(f"kvlab serve: stopped (requests aborted since start: {engine.stats.num_aborted})", flush=True)
    return 0


def raise_open_file_limit() -> None:
    """One connection is one file descriptor: lift the soft limit (often 1024) to the hard one, as
    vLLM's server and benchmark do, so that a thousand concurrent clients fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _exit_with_parent(server) -> None:
    """If a launcher started us (KVLAB_SERVE_PARENT_PID) and then died, shut down instead of lingering."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(1.0)
        server.should_exit = True

    threading.Thread(target=watch, name="kvlab-parent-watch", daemon=True).start()
