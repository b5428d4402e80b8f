"""kvlab.serve: the engine behind an OpenAI-compatible HTTP server (`kvlab serve`).

    protocol.py      request bodies checked field by field; responses, stream chunks, errors
    engine_core.py   the one engine loop, in a process of its own (vLLM v1's EngineCore)
    async_engine.py  AsyncEngine: the server's handle on it, shared by every connection
    metrics.py       GET /metrics: live engine state and latency histograms, Prometheus text
    app.py           the Starlette app: routes, streaming, disconnect -> abort, API key
    cli.py           `kvlab serve` / `kvlab bench serve` arguments; uvicorn, graceful SIGTERM
    launcher.py      ServerProcess: a server in a child process on a free 127.0.0.1 port

    from kvlab.serve import ServerProcess
    with ServerProcess(["--model", "smollm2-135m"]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=16)

The HTTP side knows nothing of the model; the engine knows nothing of HTTP.
"""

from kvlab.serve.launcher import ServerProcess

__all__ = ["ServerProcess", "build_app"]


def __getattr__(name: str):
    if name == "build_app":                  # imports starlette: only when asked
        from kvlab.serve.app import build_app

        return build_app
    raise AttributeError(f"module 'kvlab.serve' has no attribute {name!r}")
