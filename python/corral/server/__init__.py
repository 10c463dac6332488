"""`corral serve`: an OpenAI-compatible HTTP server (a drop-in for `vllm serve`).

    app.py          the FastAPI routes          protocol.py   request models, reply builders
    chat.py         /v1/chat/completions        completions.py /v1/completions
    generation.py   a request's engine work     sampling.py   request fields -> SamplingParams
    tools.py        tools and tool calls        errors.py     OpenAI error bodies
    middleware.py   API keys, body cap          metrics.py    Prometheus /metrics
    state.py        what the routes share       serve.py      uvicorn, SIGTERM drain
"""

from corral.server.app import build_app
from corral.server.state import ServerConfig, ServerState

__all__ = ["build_app", "ServerConfig", "ServerState"]
