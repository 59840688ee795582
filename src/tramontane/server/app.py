"""The OpenAI-compatible HTTP edge: FastAPI routes over one `Engine`.

Requests pass the `middleware` layers (host, key, docs, body size), are parsed by pydantic, checked
against `limits`, tokenized on a worker thread, and handed to the engine as `Request`s; the engine's
events come back through `bridge.Submission` and are shaped by `protocol`. The event loop only awaits:
the model runs on the engine's thread.

Example:
    >>> engine = Engine(model, tokenizer, max_batch=16)
    >>> app = create_app(engine, tokenizer, "smollm2")  # starts the engine with the app, stops it after
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request as HTTPRequest

from ..engine import Engine, QueueFullError
from ..engine.grammar import response_format_grammar, tool_call_grammar
from ..errors import TokenizerError
from ..tokenizer import Tokenizer
from . import protocol as p
from .anthropic_routes import anthropic_router
from .bridge import Job, Submission, submit
from .chat_page import PAGE_PATHS, page_router
from .cors import Cors, cors_origins
from .embeddings import embeddings_router, served_pooling
from .errors import APIError, bad_request, field_of, install_error_handlers
from .limits import ServerLimits, check_prompt_chars, scan_text
from .middleware import LOCAL_HOSTS, BodyLimit, CatchAll, HostCheck, KeyAuth, LoopbackDocs
from .mistral import capabilities, with_safety_prompt
from .responses_routes import responses_router
from .schemas import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FIMCompletionRequest,
    GenerationFields,
    TokenizeRequest,
)
from .streaming import EventStream

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "logit_bias", "random_seed")
OPEN_PATHS = ("/health", "/metrics")  # reachable without the API key (probes and scrapers)


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    *,
    request_timeout: float | None = 600.0,
    limits: ServerLimits | None = None,
    allowed_hosts: Iterable[str] = LOCAL_HOSTS,
    adapters: Sequence[str] = (),
    cors: Iterable[str] = (),
    embeddings: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `engine` under `model_name`.

    /v1/embeddings (`server.embeddings`) pools the final hidden states of an embedding model (at the last
    token), or of a language model when `embeddings` is "last" or "mean" (None: off for a language model).

    The app starts the engine's thread when it starts and stops it when it shuts down. With `api_key`,
    every path but /health, /metrics and the chat page's files (`chat_page`) needs `Authorization: Bearer <api_key>`
    or `x-api-key`; without one, only `Host` headers among `allowed_hosts` ('*': any) are answered and /docs only
    to loopback clients.
    Each request ends with an error after `request_timeout` seconds (None: never) and is bounded by
    `limits` (None: `ServerLimits()`'s defaults). `app.state.drain()` ends every running request with
    an error (for shutdown). `adapters` names the LoRA adapters served on the engine's model (engine
    adapter i + 1 for `adapters[i]`): a request's "model" picks one, or the base model by `model_name`.
    Web pages on the `cors` origins ('*': any) may call the API (`cors.Cors`). Anthropic's Messages API
    is served beside OpenAI's (`anthropic_routes`), as is OpenAI's Responses API (`responses_routes`), through
    the same checks, limits and engine.
    """
    limits = limits or ServerLimits()
    pooling = served_pooling(engine, embeddings)
    served = getattr(engine, "adapters", None)
    if len(adapters) != (served.count if served is not None else 0):
        raise ValueError(f"adapters: {len(adapters)} names for the {served.count if served else 0} adapters the "
                         "engine serves")
    if len(set(adapters)) != len(adapters) or model_name in adapters:
        raise ValueError(f"adapters: names must differ from each other and from the model's ({model_name!r})")
    origins = cors_origins(cors)
    server = OpenAIServer(engine, tokenizer, model_name, request_timeout, limits, tuple(adapters))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="tramontane", summary="OpenAI-compatible API", lifespan=lifespan)
    app.state.drain = server.drain
    install_error_handlers(app)
    # the last added runs first: Cors, CatchAll, HostCheck or KeyAuth, LoopbackDocs, BodyLimit
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes, timeout=limits.body_timeout)
    if api_key:
        app.add_middleware(KeyAuth, api_key=api_key, open_paths=(*OPEN_PATHS, *PAGE_PATHS))  # the page asks for it
    else:
        app.add_middleware(LoopbackDocs)
        hosts = frozenset(h.lower().strip("[]") for h in allowed_hosts)
        app.add_middleware(HostCheck, hosts=hosts, open_paths=OPEN_PATHS)
    app.add_middleware(CatchAll)
    if origins:
        app.add_middleware(Cors, origins=origins)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_api_route("/v1/models", server.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", server.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/fim/completions", server.fim_completions, methods=["POST"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.include_router(anthropic_router(server))
    app.include_router(embeddings_router(server, pooling))
    app.include_router(responses_router(server))
    app.include_router(page_router())  # the chat page at /
    return app


class OpenAIServer:
    """The route handlers, over one engine, its tokenizer and the served model's name."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, request_timeout: float | None,
                 limits: ServerLimits, adapters: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.adapters = {name: i for i, name in enumerate(adapters, start=1)}  # "model" -> engine adapter
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.request_timeout = request_timeout
        self.max_prompt_chars = limits.prompt_chars(engine.max_seq_len)
        self.created = p.now()
        self.live: set[Submission] = set()  # every submission not yet finished, for `drain`
        self.shutting_down = False

    def drain(self) -> None:
        """Refuse new requests and cancel the running ones: each ends with a 503 `server_shutdown`
        error (streams: an error event, then `[DONE]`) within one engine step."""
        self.shutting_down = True
        for sub in list(self.live):
            sub.cancel()

    # ------------------------------------------------------------------------------------------ small routes
    async def health(self) -> Response:
        return JSONResponse({"status": "ok", "active": self.engine.active, "waiting": self.engine.waiting})

    async def metrics(self) -> Response:
        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self, name: str) -> dict[str, Any]:
        """OpenAI's model object with vLLM's `max_model_len` and the fields Mistral's client requires."""
        card: dict[str, Any] = {
            "id": name, "object": "model", "created": self.created, "owned_by": "tramontane",
            "max_model_len": self.engine.max_seq_len, "max_context_length": self.engine.max_seq_len,
            "type": "base", "capabilities": capabilities(self.tokenizer, self.engine.generates)}
        if name in self.adapters:  # a LoRA adapter on the base model: vLLM's `parent`, Mistral's fine-tuned card
            card.update(parent=self.model_name, root=self.model_name, type="fine-tuned", job="", archived=False)
        return card

    async def list_models(self) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in [self.model_name, *self.adapters]]})

    async def get_model(self, model: str) -> Response:
        self._check_model(model)
        return JSONResponse(self._model_card(model))

    async def tokenize(self, body: TokenizeRequest) -> Response:
        self._check_body(body, ("prompt", "messages", "tools"), "prompt" if body.messages is None else "messages")
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give either 'prompt' (a text) or 'messages' (a conversation)", "prompt")
        if body.prompt is not None:
            ids = await asyncio.to_thread(self.tokenizer.encode, body.prompt, body.add_special_tokens)
        else:
            ids = await self._encode_chat(body.messages or [], _tool_specs(body.tools))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_seq_len})

    async def detokenize(self, body: DetokenizeRequest) -> Response:
        self._check_body(body, (), "tokens")
        self._check_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": await asyncio.to_thread(self.tokenizer.decode, body.tokens)})

    # ------------------------------------------------------------------------------------------ completions
    async def completions(self, body: CompletionRequest, request: HTTPRequest) -> Response:
        self._check_body(body, ("prompt", "suffix"), "prompt")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of: only best_of == n is supported", "best_of")
        self._check_fits(_prompt_count(body.prompt), body.n, "prompt")
        prompts, echoes = await asyncio.to_thread(self._completion_prompts, body)
        grammar = await self._format_grammar(body.response_format)
        job = self._job(body, body.max_tokens or DEFAULT_COMPLETION_TOKENS, body.logprobs is not None,
                        body.logprobs or 0, grammar, continuation=True)
        sub = self._submit(prompts, job, "prompt")
        cid, created = p.new_id("cmpl"), p.now()
        if body.stream:
            events = self._completion_stream(sub, cid, created, body, prompts, echoes)
            return EventStream(events, on_close=lambda: self.release(sub))
        choices = await self.collect(sub, request)
        out = []
        for index, choice in enumerate(choices):
            prompt = prompts[index // body.n]
            logprobs = None
            if body.logprobs is not None:
                tokens, lps, tops = choice.tokens, choice.logprobs, list[p.Alternatives | None](choice.tops)
                if body.echo:  # prompt tokens have no logprob: only generated ones are computed
                    tokens, lps = prompt + tokens, [*([None] * len(prompt)), *lps]
                    tops = [*([None] * len(prompt)), *tops]
                logprobs = p.completion_logprobs(p.TokenPieces(self.tokenizer), tokens, lps, tops)
            prefix = echoes[index // body.n] if body.echo else ""
            out.append(p.completion_choice(index, prefix + choice.text, choice.finish_reason, logprobs))
        used = p.usage(sum(map(len, prompts)), choices, body.n)
        return JSONResponse(p.completion_body(cid, created, self._answering(body), out, used))

    def _completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids of every prompt, and the text each one echoes."""
        prompt = body.prompt
        if isinstance(prompt, list) and not prompt:
            raise bad_request('prompt: must not be empty: a list holds no prompt (to continue from BOS alone, send "")',
                              "prompt")
        texts: list[str] | None = None
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt[0], str):
            texts = [str(t) for t in prompt]
        if body.suffix is not None:
            if texts is None:
                raise bad_request("suffix: fill-in-the-middle needs a text prompt, not token ids", "suffix")
            if not self.tokenizer.has_fim:
                raise bad_request(f"suffix: the tokenizer ({self.tokenizer.name}) has no fill-in-the-middle tokens",
                                  "suffix")
            return [self.tokenizer.encode_fim(t, body.suffix) for t in texts], texts
        if texts is not None:
            return [self._encode_text(t) for t in texts], texts
        rows = cast(list[list[int]], prompt if isinstance(prompt[0], list) else [prompt])
        ids = [[int(t) for t in row] for row in rows]
        for i in ids:
            self._check_ids(i, "prompt")
        return ids, [self.tokenizer.decode(i) for i in ids]

    def _encode_text(self, text: str) -> list[int]:
        """A text prompt's ids; an empty text is BOS alone, even where the model puts no BOS before a text
        (OpenAI's models continue an empty prompt from the start of a document)."""
        if not text and self.tokenizer.bos_id is not None:
            return [self.tokenizer.bos_id]
        return self.tokenizer.encode(text, bos=True)

    async def _completion_stream(
        self, sub: Submission, cid: str, created: int, body: CompletionRequest, prompts: list[list[int]],
        echoes: list[str],
    ) -> AsyncIterator[str]:
        n, want_lp, with_usage = body.n, body.logprobs is not None, body.include_usage

        def chunk(index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None) -> str:
            body_ = p.completion_body(cid, created, self._answering(body), [p.completion_choice(index, text, reason, logprobs)],
                                      None)
            if with_usage:
                body_["usage"] = None
            return p.sse(body_)

        offsets = [0] * len(sub.requests)
        pieces = [p.TokenPieces(self.tokenizer) for _ in sub.requests]
        if body.echo:
            for index in range(len(sub.requests)):
                prompt = prompts[index // n]
                lp = p.completion_logprobs(pieces[index], prompt, [None] * len(prompt), [None] * len(prompt)) \
                    if want_lp else None
                if lp:
                    offsets[index] = sum(map(len, lp["tokens"]))
                yield chunk(index, echoes[index // n], None, lp)
        choices = [p.Choice() for _ in sub.requests]
        async for index, event in sub.events():
            choices[index].add(event)
            failure = choices[index].failure(self.request_timeout, self.shutting_down)
            if failure is not None:
                yield p.sse(failure.body())
                yield p.DONE
                return
            lp = None
            if want_lp and event.token is not None:
                lp = p.completion_logprobs(pieces[index], [event.token], [event.logprob], [event.top_logprobs],
                                           offsets[index])
                offsets[index] += len(lp["tokens"][0])
            if event.text or lp or event.finish_reason:
                yield chunk(index, event.text, event.finish_reason, lp)
        if with_usage:
            used = p.usage(sum(map(len, prompts)), choices, n)
            yield p.sse(p.usage_chunk(cid, created, self._answering(body), "text_completion", used))
        yield p.DONE

    # ------------------------------------------------------------------------------------------ chat
    async def chat_completions(self, body: ChatCompletionRequest, request: HTTPRequest) -> Response:
        prompt, tools = await self.chat_prompt(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        sub = await self.submit_chat(body, prompt, tools)
        return await self._chat_answer(sub, request, body, len(prompt), tools is not None, body.logprobs)

    async def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], list[dict[str, Any]] | None]:
        """The checked request's prompt ids and the tools shown to the model (None: none), for every
        dialect of chat (OpenAI's, Mistral's, Anthropic's through `anthropic.to_chat`)."""
        self._check_body(body, ("messages", "tools"), "messages")
        if (unserved := body.unserved()) is not None:
            raise bad_request(unserved[1], unserved[0])
        self._check_fits(1, body.n, "messages")
        tools = self._tools(body)
        messages = with_safety_prompt(body.messages) if body.safe_prompt else body.messages
        return await self._encode_chat(messages, tools), tools

    async def submit_chat(self, body: ChatCompletionRequest, prompt: list[int], tools: list[dict[str, Any]] | None
                          ) -> Submission:
        """Queue the answer to `prompt` (from `chat_prompt`), under the grammar its tool_choice or
        response_format asks for; `release` it once answered."""
        if len(prompt) >= self.engine.max_seq_len:
            raise bad_request(f"messages: the conversation is {len(prompt)} tokens; the context holds "
                              f"{self.engine.max_seq_len}", "messages", "context_length_exceeded")
        grammar = await self._chat_grammar(body, tools)
        job = self._job(body, self._chat_budget(body), body.logprobs, body.top_logprobs or 0, grammar)
        return self._submit([prompt], job, "messages")

    async def fim_completions(self, body: FIMCompletionRequest, request: HTTPRequest) -> Response:
        """Mistral's `POST /v1/fim/completions`: the text between `prompt` and `suffix`, answered as a chat
        completion (Mistral's shape), for tokenizers with fill-in-the-middle tokens."""
        self._check_body(body, ("prompt", "suffix"), "prompt")
        if not self.tokenizer.has_fim:
            raise bad_request(f"model: this model's tokenizer ({self.tokenizer.name}) has no fill-in-the-middle "
                              "tokens ([PREFIX], [SUFFIX]), so it cannot complete between a prompt and a suffix",
                              "model", "fim_not_supported")
        self._check_fits(1, body.n, "prompt")
        prompt = await asyncio.to_thread(self.tokenizer.encode_fim, body.prompt, body.suffix or "")
        job = self._job(body, body.max_tokens, False, continuation=True)  # the middle continues the prompt's text
        sub = self._submit([prompt], job, "prompt")
        return await self._chat_answer(sub, request, body, len(prompt), False, False)

    async def _chat_answer(self, sub: Submission, request: HTTPRequest, body: GenerationFields, prompt_tokens: int,
                           tools: bool, logprobs: bool) -> Response:
        """The chat completion of `sub`, streamed or whole; `tools`: its output is parsed for tool calls."""
        cid, created = p.new_id("chatcmpl"), p.now()
        if body.stream:
            return EventStream(self._chat_stream(sub, cid, created, body, prompt_tokens, tools, logprobs),
                               on_close=lambda: self.release(sub))
        choices = await self.collect(sub, request)
        out = []
        for index, choice in enumerate(choices):
            message, reason = p.assistant_message(self.tokenizer, choice, tools)
            lps = (p.chat_logprobs(p.TokenPieces(self.tokenizer), choice.tokens, choice.logprobs, choice.tops)
                   if logprobs else None)
            out.append({"index": index, "message": message, "logprobs": lps, "finish_reason": reason})
        used = p.usage(prompt_tokens, choices, body.n)
        return JSONResponse(p.chat_body(cid, created, self._answering(body), out, used))

    async def _chat_stream(
        self, sub: Submission, cid: str, created: int, body: GenerationFields, prompt_tokens: int, tools: bool,
        want_logprobs: bool,
    ) -> AsyncIterator[str]:
        with_usage = body.include_usage

        def chunk(index: int, delta: dict[str, Any], reason: str | None = None,
                  logprobs: dict[str, Any] | None = None) -> str:
            return p.sse(p.chat_chunk(cid, created, self._answering(body), index, delta, finish_reason=reason,
                                      logprobs=logprobs, with_usage=with_usage))

        for index in range(len(sub.requests)):
            yield chunk(index, {"role": "assistant", "content": ""})
        choices = [p.Choice() for _ in sub.requests]
        pieces = [p.TokenPieces(self.tokenizer) for _ in sub.requests]
        held: list[list[str] | None] = [None] * len(choices)  # text after [TOOL_CALLS], until the call parses
        async for index, event in sub.events():
            choice = choices[index]
            choice.add(event)
            failure = choice.failure(self.request_timeout, self.shutting_down)
            if failure is not None:
                yield p.sse(failure.body())
                yield p.DONE
                return
            if tools and held[index] is None and p.is_tool_call_start(self.tokenizer, event.token):
                held[index] = []
            logprobs = None
            if want_logprobs and event.token is not None:
                logprobs = p.chat_logprobs(pieces[index], [event.token], [event.logprob], [event.top_logprobs])
            pending = held[index]
            if pending is not None:
                pending.append(event.text)
            elif event.text or logprobs:
                yield chunk(index, {"content": event.text}, logprobs=logprobs)
            if event.finish_reason is None:
                continue
            reason = event.finish_reason
            if pending is not None:
                message, reason = p.assistant_message(self.tokenizer, choice, tools)
                if message.get("tool_calls"):
                    yield chunk(index, {"tool_calls": p.tool_call_deltas(message["tool_calls"])})
                elif "".join(pending):  # not a valid call after all: hand over the text held back
                    yield chunk(index, {"content": "".join(pending)})
            yield chunk(index, {}, reason)
        if with_usage:
            used = p.usage(prompt_tokens, choices, body.n)
            yield p.sse(p.usage_chunk(cid, created, self._answering(body), "chat.completion.chunk", used))
        yield p.DONE

    @staticmethod
    def _chat_budget(body: ChatCompletionRequest) -> int | None:
        """`max_completion_tokens`, OpenAI's newer name for `max_tokens`: either, or both when they agree."""
        new, old = body.max_completion_tokens, body.max_tokens
        if new is not None and old is not None and new != old:
            raise bad_request(f"max_completion_tokens: {new} disagrees with max_tokens: {old}; give one of them",
                              "max_completion_tokens")
        return new if new is not None else old

    async def _chat_grammar(self, body: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> str | None:
        """The grammar of a chat answer: a forced tool call (tool_choice 'required' or a named function;
        a single one with parallel_tool_calls false), or `response_format`; both at once are refused."""
        choice = body.tool_choice
        forced = tools is not None and (choice == "required" or isinstance(choice, dict))
        if tools is not None and not forced and body.parallel_tool_calls is False:
            raise bad_request("parallel_tool_calls: false is enforced only on a forced tool call (tool_choice 'any', "
                              "'required' or a named function); with 'auto' the model may call several",
                              "parallel_tool_calls")
        if not forced:
            return await self._format_grammar(body.response_format)
        if body.response_format is not None and body.response_format.get("type", "text") != "text":
            raise bad_request("tool_choice: a forced tool call cannot be combined with a response_format",
                              "tool_choice")
        assert tools is not None
        name = _tool_name(choice, "tool_choice") if isinstance(choice, dict) else None
        single = body.parallel_tool_calls is False
        return await self._grammar(lambda: tool_call_grammar(self.tokenizer, tools, name, single), "tool_choice")

    async def _format_grammar(self, fmt: dict[str, Any] | None) -> str | None:
        """The grammar of a `response_format`; what its schema cannot enforce names the schema."""
        if fmt is None:  # plain text: no grammar, and no trip to a worker thread for it
            return None
        field = "response_format.json_schema.schema" if fmt is not None and fmt.get("type") == "json_schema" \
            else "response_format"
        return await self._grammar(lambda: response_format_grammar(fmt), "response_format", field)

    async def _grammar(self, build: Callable[[], str | None], param: str, check_field: str | None = None
                       ) -> str | None:
        """Build a grammar and check that the engine can enforce it (off the event loop: the first check
        builds llguidance's view of the vocabulary); a 400 naming the field it came from if not."""
        def checked() -> str | None:
            grammar = build()
            if grammar is not None:
                self.engine.vocabulary.check(grammar, check_field or param)
            return grammar

        try:
            return await asyncio.to_thread(checked)
        except ValueError as e:
            message = str(e)
            raise bad_request(message, message.split(":", 1)[0] if message.startswith(param) else param) from e

    def _tools(self, body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
        """The tools to show the model: none with tool_choice 'none'. A forced choice is enforced by a grammar
        (`_chat_grammar`)."""
        tools, choice = _tool_specs(body.tools), body.tool_choice
        if choice is not None and choice != "none" and tools is None:
            raise bad_request("tool_choice: needs tools", "tool_choice")
        if choice == "none":
            return None
        if isinstance(choice, dict):
            name = _tool_name(choice, "tool_choice")
            if name not in {_tool_name(t, "tools") for t in tools or []}:
                raise bad_request(f"tool_choice: no tool named {name!r} among the tools", "tool_choice")
        return tools

    async def _encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        messages = _text_only(messages)
        try:
            return await asyncio.to_thread(self.tokenizer.encode_chat, messages, tools)
        except TokenizerError as e:
            raise bad_request(f"messages: this model has no chat format ({e}); use /v1/completions",
                              "messages") from e
        except ValueError as e:
            raise bad_request(str(e), field_of(str(e), ("messages", "tools")) or "messages") from e

    # ------------------------------------------------------------------------------------------ shared
    def _check_body(self, body: TokenizeRequest | DetokenizeRequest | GenerationFields, prompt_fields: tuple[str, ...],
                    prompt_param: str) -> None:
        """Before any work: every text valid, the prompt within --max-prompt-chars, the model ours."""
        chars = scan_text(body, prompt_fields)
        check_prompt_chars(chars, self.max_prompt_chars, prompt_param)
        self._check_model(body.model)

    def _check_fits(self, prompts: int, n: int, prompt_param: str) -> None:
        """A request of more sequences than the queue holds could never be queued: a 400, not a 503."""
        if prompts * n > self.engine.max_queue:
            param = "n" if n > 1 else prompt_param
            raise bad_request(f"{param}: {prompts} prompt(s) x n={n} make {prompts * n} sequences; this server queues "
                              f"at most {self.engine.max_queue} (--max-queue)", param)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and name not in self.adapters:
            served = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
            raise APIError(404, f"the model '{name}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")

    def _answering(self, body: GenerationFields) -> str:
        """The model name an answer reports: the one asked for (checked), else the base model's."""
        return body.model or self.model_name

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise bad_request(f"{param}: token ids must lie in [0, {vocab})", param)

    def _job(self, body: GenerationFields, max_tokens: int | None, logprobs: bool, top_logprobs: int = 0,
             grammar: str | None = None, continuation: bool = False) -> Job:
        if body.min_tokens:  # the engine has no way to hold back the end of an answer yet
            raise bad_request("min_tokens: is not supported; leave it out or 0", "min_tokens")
        try:
            params, seed = body.sampling_params(), body.sampling_seed()
        except ValueError as e:
            raise bad_request(str(e), field_of(str(e), SAMPLING_FIELDS)) from e
        return Job(max_tokens=max_tokens, params=params, n=body.n, stop_strings=body.stop_strings(), seed=seed,
                   logprobs=logprobs, top_logprobs=top_logprobs, grammar=grammar, timeout=self.request_timeout,
                   continuation=continuation, adapter=self.adapters.get(body.model or "", 0),
                   speculative=body.speculative is not False)

    def _submit(self, prompts: list[list[int]], job: Job, prompt_param: str) -> Submission:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", kind="server_error", code="server_shutdown")
        try:
            sub = submit(self.engine, prompts, job)
            self.live.add(sub)
            return sub
        except QueueFullError as e:
            raise APIError(503, f"the server is busy ({e}); retry later", kind="server_error",
                           code="queue_full") from e
        except ValueError as e:
            message = str(e)
            param = field_of(message, ("prompt", "max_tokens", "logit_bias"))
            code = "context_length_exceeded" if "context" in message else None
            raise bad_request(message, prompt_param if param == "prompt" else param, code) from e

    def release(self, sub: Submission) -> None:
        """The HTTP call of `sub` is over (answered, failed or abandoned): drop what still runs."""
        sub.cancel()
        self.live.discard(sub)

    async def collect(self, sub: Submission, request: HTTPRequest) -> list[p.Choice]:
        """Wait for every choice of a non-streamed answer; a client that hangs up cancels them."""
        choices = [p.Choice() for _ in sub.requests]
        watcher = asyncio.create_task(_cancel_on_disconnect(request, sub))
        try:
            async for index, event in sub.events():
                choices[index].add(event)
        finally:
            watcher.cancel()
            self.release(sub)
        failure = p.first_failure(choices, self.request_timeout, self.shutting_down)
        if failure is not None:
            raise failure
        return choices


def _prompt_count(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts a completion's `prompt` holds: one text, one row of ids, or a list of either."""
    return 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else len(prompt)


def _tool_name(spec: object, param: str) -> str:
    """The function's name in a tool or a named tool_choice: {'type': 'function', 'function': {'name': ...}}."""
    function = spec.get("function") if isinstance(spec, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise bad_request(f"{param}: must be {{'type': 'function', 'function': {{'name': <a string>, ...}}}}", param)
    return name


def _tool_specs(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """`tools` once each one names its function (None for no tools); the tokenizer checks the rest."""
    for i, tool in enumerate(tools or []):
        _tool_name(tool, f"tools[{i}]")
    return tools or None


async def _cancel_on_disconnect(request: HTTPRequest, sub: Submission) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            sub.cancel()
            return


def _text_only(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose content is a list of text parts get it joined into one string (images are refused)."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                texts.append(part["text"])
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out
