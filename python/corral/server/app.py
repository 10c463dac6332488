"""The FastAPI application: routes over a ServerState (the engine and the server's settings)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from corral.server.chat import chat_prompt, create_chat_completion
from corral.server.completions import create_completion
from corral.server.errors import bad_request, install_error_handlers
from corral.server.metrics import CONTENT_TYPE
from corral.server.middleware import HTTPMetrics, RequestGate
from corral.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from corral.server.state import ServerState


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Corral", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        # 503 once draining, so that load balancers stop sending requests here.
        return Response(status_code=503 if state.draining else 200)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "corral",
                "root": state.llm.model_path,
                "parent": None,
                "max_model_len": state.llm.max_model_len,
            }
            for name in state.config.served_model_names
        ]
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Response:
        return await create_chat_completion(state, request, http)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request) -> Response:
        return await create_completion(state, request, http)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        state.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("send either prompt or messages")
        if request.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
            tokens, _ = await chat_prompt(
                state,
                request.messages,
                tools=tools,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                chat_template_kwargs=request.chat_template_kwargs,
            )
        else:
            tokens = await state.prepare(
                len(request.prompt), state.tokenizer.encode, request.prompt, request.add_special_tokens
            )
        body = {"count": len(tokens), "max_model_len": state.llm.max_model_len, "tokens": tokens}
        if request.return_token_strs:
            body["token_strs"] = state.tokenizer.convert_ids_to_tokens(tokens)
        return JSONResponse(body)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        state.model_name(request.model)
        vocab = state.llm.config["vocab_size"]
        if not all(0 <= t < vocab for t in request.tokens):
            raise bad_request(f"tokens must be ids in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(request.tokens)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(await state.engine.stats()), media_type=CONTENT_TYPE)

    # Outermost last: CORS answers preflights before the gate asks for a key (as vLLM's does).
    paths = frozenset(route.path for route in app.routes)
    app.add_middleware(RequestGate, api_keys=state.config.api_keys, max_body_bytes=state.config.max_body_bytes)
    app.add_middleware(HTTPMetrics, metrics=state.metrics, paths=paths)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                       allow_credentials=False)
    return app
