"""Running the server: uvicorn (one worker) on the event loop, the engine on its own thread, and the
drain on SIGTERM or Ctrl-C.

The drain: admission stops at once (new generation requests get 503, /health 503), requests in
flight may finish for up to shutdown_timeout seconds, then the rest are aborted (their replies end
with finish_reason "abort"), and uvicorn closes. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from corral.async_llm import AsyncLLM
from corral.llm import LLM
from corral.server.app import build_app
from corral.server.state import ServerConfig, ServerState

logger = logging.getLogger("corral.server")

# After the abort, how long the aborted replies get to send their last chunks.
_ABORT_GRACE_S = 5.0


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the signal handler: hand the drain to the event loop. uvicorn's own handler
        # would stop at once (and re-raise the signal on the way out: exit status 143).
        if self._drain is not None or self._loop is None:
            self.force_exit = self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit(signal.Signals(sig).name))

    async def _drain_then_exit(self, why: str) -> None:
        state = self.state
        state.draining = True
        logger.info("%s: draining %d requests in flight (up to %gs)", why, len(state.runs), self.shutdown_timeout)
        await _wait_until(lambda: not state.runs, self.shutdown_timeout)
        if state.runs:
            logger.info("aborting %d requests still in flight", len(state.runs))
            for run in list(state.runs):
                run.abort()
            await _wait_until(lambda: not state.runs, _ABORT_GRACE_S)
        self.should_exit = True


async def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def serve(llm: LLM, config: ServerConfig, host: str, port: int, shutdown_timeout: float,
                log_level: str = "info") -> None:
    """Serves until SIGTERM or Ctrl-C, drained as described above."""
    engine = AsyncLLM(llm)  # made on the running loop, where its results are delivered
    state = ServerState(engine, config)
    uv_config = uvicorn.Config(
        build_app(state),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=_ABORT_GRACE_S,  # requests are drained before uvicorn stops
    )
    server = _DrainingServer(uv_config, state, shutdown_timeout)
    try:
        await server.serve()
    finally:
        state.close()
        engine.close()
