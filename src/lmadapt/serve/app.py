"""The HTTP app: finished runs behind a small JSON API (FastAPI), with dynamic micro-batching.

Requests name a run by `model` (its directory's basename); names are looked up in a fixed table
built at start-up, so no request field ever reaches the filesystem. Every endpoint checks that
the run's task fits it (a classification run is not an NER model) and that inputs stay within
the configured limits, answering 4xx with a message that says which limit and by how much
(never quoting a rejected input back). Middleware refuses oversized bodies before they are
parsed and, with an API key set, callers without it.

Generation runs decode with their task's own `decode_ids` (the code behind `lmadapt generate`),
in the model group's batcher thread; a streamed chat completion hands that thread a transformers
streamer and relays its text as Server-Sent Events. A client that goes away, streamed or not,
ends its decoding at the next token.

The OpenAI routes (`/v1/chat/completions`, `/v1/models[/{id}]`) answer errors in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, and refuse by name (400) the OpenAI request
fields lmadapt does not implement (tools, logprobs, JSON mode...) rather than ignore them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmadapt.data.chat import Conversation
from lmadapt.decoding import GenerationSettings
from lmadapt.errors import LmadaptError
from lmadapt.serve.batching import QueueFullError
from lmadapt.serve.catalog import Catalog, Entry, MemoryBudgetFull, UnknownRun
from lmadapt.serve.guards import (
    MAX_ERRORS,
    MAX_FIELD,
    ApiKey,
    BodyLimit,
    HostCheck,
    shorten,
    validation_error,
)
from lmadapt.serve.runs import Completion, GenerationJob, ModelGroup, ServedRun
from lmadapt.serve.settings import ServeSettings
from lmadapt.serve.streaming import StopCutter, TokenStream, sse
from lmadapt.session import resolve_device
from lmadapt.tasks import TASKS

# ---------------------------------------------------------------------- request/response schemas


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextsRequest(_Strict):
    model: str | None = Field(None, description="Run name; optional when one run is served.")
    texts: list[str] = Field(min_length=1, description="Raw input texts.")


class TextsResponse(BaseModel):
    model: str
    results: list[dict[str, Any]] = Field(
        description="One row per text, as `lmadapt predict` prints it (label, probabilities...)."
    )


class QAItem(_Strict):
    question: str
    context: str = Field(description="The text the answer is a span of.")


class QARequest(_Strict):
    model: str | None = Field(None, description="Run name; optional when one run is served.")
    items: list[QAItem] = Field(min_length=1, description="Question/context pairs.")


MAX_EXPLAIN_STEPS = 256
"""Most integrated-gradients steps a request may ask for (each is a forward and backward pass
per text and target)."""


class ExplainRequest(TextsRequest):
    method: Literal["ig", "occlusion"] = Field(
        "ig", description="Integrated gradients or leave-one-word-out."
    )
    label: str | None = Field(
        None,
        max_length=100,
        description="Explain this label (NER: entity type) instead of the predicted one.",
    )
    steps: int = Field(32, ge=1, le=MAX_EXPLAIN_STEPS, description="Integrated-gradients steps.")


Stop = Annotated[str, Field(min_length=1, max_length=64)]
Stops = Annotated[list[Stop], Field(max_length=4)]


class Decoding(BaseModel):
    """Decoding fields of both generation endpoints; an omitted field keeps the run's setting."""

    temperature: float | None = Field(
        None, ge=0, le=2, description="0 = greedy, > 0 samples; omitted: the run's task setting."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (when sampling).")
    stop: Stops | Stop | None = Field(
        None,
        description="Up to 4 stop strings, replacing the run's task.stop: the answer ends "
        "before the first one (the template's end of turn always stops).",
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Sampling seed; omitted: a fresh one per request."
    )


class GenerateRequest(Decoding):
    """Prompts answered as single user turns in the run's prompt template (as `lmadapt
    generate` does)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="Run name; optional when one run is served.")
    prompt: str | None = None
    prompts: list[str] | None = Field(None, min_length=1)
    max_new_tokens: int | None = Field(
        None, ge=1, description="Omitted: the run's task.max_new_tokens, capped at the limit."
    )

    @model_validator(mode="after")
    def _one_of_prompt_and_prompts(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' and 'prompts'")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class GenerationOutput(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    model: str
    results: list[GenerationOutput] = Field(description="One per prompt, in order.")
    usage: Usage


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ContentPart(BaseModel):
    """One part of a message's content in OpenAI's list form; only text parts are supported
    (`RequestMessage.text` refuses the others)."""

    type: str
    text: str | None = None


def _as_parts(content: Any) -> Any:
    """A string content as one text part, so that errors name `content[j]`, never a member of
    a union (`content.str`, `content.list[ContentPart]`)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise PydanticCustomError(
            "content_type", "Input should be a string or a list of content parts"
        )
    return content


class RequestMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[
        list[ContentPart],
        BeforeValidator(_as_parts, json_schema_input_type=str | list[ContentPart]),
    ] = Field(description="A string, or a list of text parts (joined with newlines, as vLLM does).")

    def text(self, i: int) -> str:
        """The content as one string; 400 naming the first part that is not text."""
        texts = []
        for j, part in enumerate(self.content):
            field = f"messages[{i}].content[{j}]"
            if part.type != "text":
                raise ApiError(
                    400,
                    f"{field}.type: only text parts are supported, got {shorten(part.type)!r}",
                    f"{field}.type",
                    "unsupported_value",
                )
            if part.text is None:
                raise ApiError(400, f"{field}.text: a text part needs its text", f"{field}.text")
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(
        False, description="Send a last chunk with `usage` (and no choices) before [DONE]."
    )


NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}
"""OpenAI chat fields lmadapt does not implement, with the values (besides null) that ask for
nothing, so a client sending its defaults is served; any other value is refused by name."""
IGNORED_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "parallel_tool_calls",
    }
)
"""OpenAI chat fields that change nothing in the answer (bookkeeping, or tools, which are
refused anyway): accepted and ignored."""


class ChatRequest(Decoding):
    """OpenAI chat-completions shape. Any other field is refused by name (400), except those in
    IGNORED_FIELDS and those of NO_OP_VALUES given a value that asks for nothing."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[RequestMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, description="Choices to generate (sampled ones differ).")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        """400 for the first field lmadapt would otherwise ignore, or a streaming option
        without a stream (as OpenAI answers)."""
        for name, value in (self.model_extra or {}).items():
            allowed = NO_OP_VALUES.get(name)
            if name in IGNORED_FIELDS or (allowed is not None and value in (None, *allowed)):
                continue
            field = str(shorten(name))
            if allowed is None:
                message = f"{field}: not supported by lmadapt serve; leave it out"
            else:
                values = " or ".join(json.dumps(v) for v in allowed)
                message = f"{field}: lmadapt serve supports only {values} (or leaving it out)"
            raise ApiError(400, message, field, "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed with stream: true", "stream_options")


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "lmadapt"
    task: str
    method: str
    base_model: str
    engine: Literal["pytorch", "onnxruntime"] = Field(
        description="What runs the model: the run's PyTorch weights or its ONNX export."
    )
    labels: list[str] | None = None
    loaded: bool = Field(description="Whether the run is in memory now (see --runs-dir).")
    shares_base_with: list[str] = Field(
        default_factory=list,
        description="Other runs that use the same in-memory copy of the base model's weights.",
    )


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------- errors in OpenAI's shape

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


def is_openai_route(scope: Scope) -> bool:
    """The routes OpenAI clients call, whose errors they read as `{"error": {...}}`."""
    path = scope["path"].removeprefix(scope.get("root_path", ""))
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


class ApiError(HTTPException):
    """A refusal that also names the request field at fault (`param`) and an OpenAI error
    `code`; the other routes answer its `detail` alone, as for any HTTPException."""

    def __init__(
        self, status_code: int, detail: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(status_code, detail)
        self.param, self.code = param, code


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body, which its clients turn into an exception with these fields."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """HTTPExceptions (ours, and routing's 404/405) in OpenAI's shape on its routes."""
    if not is_openai_route(request.scope):
        return await http_exception_handler(request, exc)
    param, code = (exc.param, exc.code) if isinstance(exc, ApiError) else (None, None)
    body = openai_error(exc.status_code, str(exc.detail), param, code)
    return JSONResponse(body, exc.status_code, headers=exc.headers)


async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 in OpenAI's shape on its routes: where and why for the first errors, `param` the
    first field at fault; as elsewhere, never the rejected input."""
    if not is_openai_route(request.scope):
        return await validation_error(request, exc)
    errors = exc.errors()
    fields = [_field(e["loc"]) if e["type"] != "json_invalid" else "body" for e in errors]
    message = "; ".join(
        f"{field}: {shorten(str(e['msg']), 4 * MAX_FIELD)}"
        for field, e in zip(fields[:MAX_ERRORS], errors)
    )
    if len(errors) > MAX_ERRORS:
        message += f" (and {len(errors) - MAX_ERRORS} more errors)"
    return JSONResponse(openai_error(422, message, fields[0] if fields else None), 422)


def _field(loc: tuple[str | int, ...]) -> str:
    """A validation error's location as a field path: ("body", "messages", 0, "role") ->
    "messages[0].role"."""
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{shorten(part)}" if path else str(shorten(part))
    return path or str(loc[0])


class OpenAIErrorShape:
    """Middleware's own refusals on the OpenAI routes (API key 401, body size 413, host name
    400: a body `{"detail": message}`) put in OpenAI's shape. Errors raised inside the app
    reach `http_error` and `request_invalid` instead, so this sees only the guards' answers."""

    CODES = {401: "invalid_api_key"}

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_openai_route(scope):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = b""

        async def reshape(message: Message) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body says whether it is a guard's refusal
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            with contextlib.suppress(ValueError):  # not JSON: passed on as it is
                parsed = json.loads(body)
                detail = parsed.get("detail") if isinstance(parsed, dict) else None
                if isinstance(detail, str):
                    status = start["status"]
                    shaped = openai_error(status, detail, code=self.CODES.get(status))
                    body = json.dumps(shaped).encode()
                    headers = MutableHeaders(raw=list(start["headers"]))
                    headers["content-length"] = str(len(body))
                    start = {**start, "headers": headers.raw}
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


# ---------------------------------------------------------------------- the app


class Server:
    """The request checks, over the catalog of served runs (which loads and batches them)."""

    def __init__(self, catalog: Catalog, settings: ServeSettings):
        self.settings = settings
        self.catalog = catalog
        self._solo = itertools.count()

    @property
    def runs(self) -> dict[str, ServedRun]:
        """The runs in memory, by name."""
        return {name: e.run for name, e in self.catalog.entries.items()}

    @property
    def groups(self) -> list[ModelGroup]:
        """The models in memory."""
        return self.catalog.groups

    def close(self) -> None:
        self.catalog.close()

    def name_of(self, name: str | None) -> str:
        """The served run a request's `model` names (the only one, when it names none); 404
        for a name not served."""
        try:
            return self.catalog.resolve(name)
        except UnknownRun:
            names = ", ".join(self.catalog.names())
            if name is None:
                raise ApiError(
                    400, f"field 'model' is required; served models: {names}", "model"
                ) from None
            raise ApiError(
                404,
                f"unknown model {shorten(name)!r}; served models: {names}",
                "model",
                "model_not_found",
            ) from None

    async def entry(self, name: str | None) -> Entry:
        """The named run in memory (loaded now, off the event loop, if it was not): 404 for a
        name not served, 503 when the memory budget has no room for it now."""
        name = self.name_of(name)
        if self.catalog.loaded(name):
            return self.catalog.get(name)
        try:
            return await asyncio.to_thread(self.catalog.get, name)
        except MemoryBudgetFull as e:
            raise ApiError(503, str(e), "model") from None
        except LmadaptError as e:
            raise ApiError(500, f"model {name!r} could not be loaded: {e}", "model") from None

    def check_texts(
        self, texts: list[str], field: str = "texts", allow_empty: bool = False
    ) -> None:
        """Count and length limits (413), and text a tokenizer cannot take (422)."""
        s = self.settings
        if len(texts) > s.max_texts:
            raise ApiError(
                413, f"{len(texts)} {field} in one request; the limit is {s.max_texts}", field
            )
        for i, t in enumerate(texts):
            if len(t) > s.max_chars:
                raise ApiError(
                    413,
                    f"{field}[{i}] has {len(t)} characters; the limit is {s.max_chars}",
                    f"{field}[{i}]",
                )
            if not allow_empty and not t.strip():
                raise ApiError(422, f"{field}[{i}] is empty", f"{field}[{i}]")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(
                        422,
                        f"{field}[{i}] holds an unpaired surrogate (bad \\u escape)",
                        f"{field}[{i}]",
                    ) from None

    def check_choices(self, n: int, stream: bool) -> None:
        """`n` choices decode as one batch of at most max_texts and max_batch rows, and not
        streamed (the stream carries one)."""
        limit = min(self.settings.max_texts, self.settings.max_batch)
        if n > 1 and stream:
            raise ApiError(400, "n: a stream carries one choice; use n: 1", "n")
        if n > limit:
            raise ApiError(
                413,
                f"n={n} exceeds the server limit {limit} (the smaller of --max-texts and "
                "--max-batch)",
                "n",
            )

    def check_new_tokens(self, n: int | None, field: str) -> None:
        if n is not None and n > self.settings.max_new_tokens:
            raise ApiError(
                413, f"{field}={n} exceeds the server limit {self.settings.max_new_tokens}", field
            )

    async def entry_for_endpoint(self, name: str | None, endpoint: str, path: str) -> Entry:
        """The named run, if its task answers at `endpoint` (the task decides, not a table)."""
        entry = await self.entry(name)
        run = entry.run
        if run.task.endpoint != endpoint:
            served = " or ".join(e.name for e in TASKS if e.impl.endpoint == endpoint)
            raise ApiError(
                400,
                f"model {run.name!r} is a {run.kind} model; {path} needs a {served} model",
                "model",
            )
        return entry

    def submit(self, entry: Entry, key: Hashable, items: list[Any]) -> Future:
        try:
            return self.catalog.submit(entry, key, items)
        except QueueFullError as e:
            raise HTTPException(503, str(e)) from None

    def submit_inputs(self, entry: Entry, inputs: list[Any]) -> Future:
        """Texts (or QA items) to predict on, batched with those of runs sharing the model
        where it can mix adapters (`ModelGroup.batch_key`)."""
        key = entry.group.batch_key(entry.run)
        return self.submit(entry, key, [(entry.run.name, x) for x in inputs])

    async def results(self, future: Future | asyncio.Future) -> list[Any]:
        try:
            return await asyncio.wrap_future(future)
        except LmadaptError as e:
            raise HTTPException(400, str(e)) from None

    async def texts(self, req: TextsRequest, endpoint: str) -> TextsResponse:
        entry = await self.entry_for_endpoint(req.model, endpoint, f"/v1/{endpoint}")
        self.check_texts(req.texts)
        results = await self.results(self.submit_inputs(entry, req.texts))
        return TextsResponse(model=entry.run.name, results=results)

    # ------------------------------------------------------------------ generation

    def decoding(
        self, run: ServedRun, req: Decoding, max_new_tokens: int | None
    ) -> GenerationSettings:
        """The run's decoding settings with the request's overrides. Temperature 0 is greedy and
        > 0 samples (OpenAI's convention); an omitted max_new_tokens is the run's, capped."""
        task = run.generation
        cap = min(task.cfg.max_new_tokens, self.settings.max_new_tokens)
        settings = task.settings(
            max_new_tokens=max_new_tokens or cap,
            do_sample=None if req.temperature is None else req.temperature > 0,
            temperature=req.temperature or None,
            top_p=req.top_p,
            stop=[req.stop] if isinstance(req.stop, str) else req.stop,
            seed=req.seed,
        )
        if settings.do_sample and req.seed is None:
            settings.seed = secrets.randbelow(2**31)  # not the run's fixed seed: a new sample
        return settings

    def prompt_ids(
        self,
        entry: Entry,
        conversations: list[Conversation],
        fields: list[str],
        max_new_tokens: int,
    ) -> list[list[int]]:
        """Templated prompt tokens; 413 for a prompt the task would truncate (it keeps the last
        task.max_length tokens) or one the model's context cannot hold with its answer."""
        run, task = entry.run, entry.run.generation
        try:
            feats = task.encode(conversations, run.tokenizer)
        except (LmadaptError, TemplateError) as e:
            raise HTTPException(400, f"cannot render the prompt for {run.name!r}: {e}") from None
        limit, context = task.cfg.max_length, entry.group.context
        ids = [task.prompt_ids(f, c) for f, c in zip(feats, conversations)]
        for field, prompt in zip(fields, ids):
            if len(prompt) >= limit:
                raise ApiError(
                    413,
                    f"{field} is too long: {limit} tokens or more with the prompt template; "
                    f"model {run.name!r} takes up to {limit - 1} (its task.max_length is {limit})",
                    field,
                )
            if context and len(prompt) + max_new_tokens > context:
                raise ApiError(
                    413,
                    f"{field} has {len(prompt)} tokens; with {max_new_tokens} new tokens that "
                    f"exceeds the {context}-token context of model {run.name!r}",
                    field,
                )
        return ids

    def submit_generation(self, entry: Entry, jobs: list[GenerationJob]) -> Future:
        """Greedy jobs with equal settings from concurrent requests decode as one batch; sampled
        or streamed ones alone (a seed then gives the same text whatever else is queued)."""
        first = jobs[0]
        alone = first.settings.do_sample or first.streamer is not None
        name = entry.run.name
        return self.submit(entry, (name, next(self._solo) if alone else repr(first.settings)), jobs)

    async def generation(
        self, entry: Entry, jobs: list[GenerationJob], request: Request
    ) -> list[Completion]:
        """The jobs' completions, unless the client leaves first: then a queued request is
        dropped and a running decode ends at its next token (once every request in its batch
        has gone), and the answer is a 499 nobody reads."""
        done = asyncio.wrap_future(self.submit_generation(entry, jobs))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not done.done():
            for job in jobs:
                job.cancelled.set()
            done.cancel()  # cancels the queued request too, if no batch has taken it yet
            raise HTTPException(499, "the client closed the request")
        return await self.results(done)

    def stream_chat(
        self,
        entry: Entry,
        ids: list[int],
        settings: GenerationSettings,
        head: dict[str, Any],
        include_usage: bool,
    ) -> StreamingResponse:
        """SSE chunks as tokens are generated: the role, the content pieces (which concatenate
        to the non-streamed answer), a last chunk with finish_reason, with `include_usage` one
        more with the usage and no choices (each chunk then has a `usage` key, null before),
        then [DONE]."""
        run = entry.run
        stream = TokenStream(run.tokenizer)
        job = GenerationJob(ids, settings, stream)
        future = self.submit_generation(entry, [job])
        cutter = StopCutter(run.generation.stop_strings(settings))
        head = {**head, "object": "chat.completion.chunk"}
        if include_usage:
            head["usage"] = None

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return sse({**head, "choices": [choice]})

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in stream:
                    if text := cutter.feed(piece):
                        yield chunk({"content": text})
                if text := cutter.feed("", final=True):
                    yield chunk({"content": text})
                try:
                    (done,) = await asyncio.wrap_future(future)
                except LmadaptError as e:  # the 200 is already sent: report it in the stream
                    yield sse(openai_error(400, str(e)))
                    return
                yield chunk({}, done.finish_reason)
                if include_usage:
                    usage = _usage(done.prompt_tokens, [done]).model_dump()
                    yield sse({**head, "choices": [], "usage": usage})
                yield sse("[DONE]")
            finally:
                job.cancelled.set()  # a client that went away stops decoding at the next token

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def card(self, name: str) -> ModelCard:
        """A served run as /v1/models lists it (read from its directory when not loaded)."""
        entry = self.catalog.entries.get(name)
        if entry is None:
            return ModelCard(id=name, loaded=False, **self.catalog.describe(name))
        base = entry.group.base
        siblings = sorted(
            n for n, e in self.catalog.entries.items() if e.group.base == base and n != name
        )
        return ModelCard(id=name, loaded=True, shares_base_with=siblings, **entry.run.info())

    def cards(self) -> list[ModelCard]:
        """Every served run's card; a run under --runs-dir that cannot be read is left out."""
        cards = []
        for name in self.catalog.names():
            with contextlib.suppress(LmadaptError):
                cards.append(self.card(name))
        return cards

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": self.catalog.names(), **self.catalog.stats()}


def create_app(
    run_dirs: list[str | Path] | None,
    settings: ServeSettings | None = None,
    hosts: frozenset[str] | None = None,
    runs_dir: str | Path | None = None,
) -> FastAPI:
    """Load the runs (adapters over one base model share its weights), or serve every run
    under `runs_dir` as requests name them (see serve.catalog), and build the app.
    `hosts`: the Host names requests must give (`serve` passes settings.host_names when there
    is no API key); None: any."""
    settings = settings or ServeSettings()
    device = resolve_device(settings.device)
    server = Server(Catalog(settings, device, run_dirs, runs_dir), settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()

    app = FastAPI(
        title="lmadapt",
        summary="Predictions from finished lmadapt runs.",
        version="1",
        lifespan=lifespan,
    )
    app.state.server = server
    _guards(app, settings, hosts)
    _model_routes(app, server)
    _prediction_routes(app, server)
    _generate_route(app, server)
    _chat_route(app, server)
    return app


def _guards(app: FastAPI, settings: ServeSettings, hosts: frozenset[str] | None) -> None:
    """Error handlers and the guards; the middleware added last runs first."""
    # FastAPI's decorator, called: Starlette types add_exception_handler's handlers as taking
    # any Exception, which handlers of one exception class are not
    app.exception_handler(RequestValidationError)(request_invalid)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.add_middleware(BodyLimit, limit=settings.body_limit)
    if settings.api_key is not None:  # added last, so it runs first: no body is read unchecked
        app.add_middleware(ApiKey, key=settings.api_key)
    if hosts is not None:
        app.add_middleware(HostCheck, hosts=hosts)
    app.add_middleware(OpenAIErrorShape)  # outermost: it sees every guard's refusal


def _model_routes(app: FastAPI, server: Server) -> None:
    """Liveness and the served runs (OpenAI's models list and retrieve)."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the served runs, and micro-batching counters."""
        return server.health()

    @app.get("/v1/models")
    async def models() -> ModelList:
        """Served runs (OpenAI list shape) with task, method, base model and labels."""
        return ModelList(data=server.cards())

    @app.get("/v1/models/{model}")
    async def model(model: str) -> ModelCard:
        """One served run, as listed by /v1/models (OpenAI's models.retrieve)."""
        return server.card(server.name_of(model))


def _prediction_routes(app: FastAPI, server: Server) -> None:
    """The routes of the runs that label or explain text (classification, NER, QA)."""

    @app.post("/v1/classify")
    async def classify(req: TextsRequest) -> TextsResponse:
        """Label and class probabilities for each text (a classification run)."""
        return await server.texts(req, "classify")

    @app.post("/v1/ner")
    async def ner(req: TextsRequest) -> TextsResponse:
        """Entities for each text (a token-classification run), as the task decodes them."""
        return await server.texts(req, "ner")

    @app.post("/v1/qa")
    async def qa(req: QARequest) -> TextsResponse:
        """The answer to each question as a span of its context, with its character offsets and
        score (an extractive question-answering run), as `lmadapt predict` gives it."""
        entry = await server.entry_for_endpoint(req.model, "qa", "/v1/qa")
        server.check_texts([item.question for item in req.items], "questions")
        server.check_texts([item.context for item in req.items], "contexts")
        items = [item.model_dump() for item in req.items]
        results = await server.results(server.submit_inputs(entry, items))
        return TextsResponse(model=entry.run.name, results=results)

    @app.post("/v1/explain")
    async def explain(req: ExplainRequest) -> TextsResponse:
        """Per-word attributions of each text's prediction (a classification or NER run), as
        `lmadapt explain` prints them; computed outside the micro-batcher (it needs gradients)."""
        entry = await server.entry(req.model)
        server.check_texts(req.texts)
        name = entry.run.name
        try:
            with server.catalog.busy(entry):
                results = await asyncio.to_thread(
                    entry.group.explain, name, req.texts, req.method, req.label, req.steps
                )
        except LmadaptError as e:
            raise HTTPException(400, str(e)) from None
        return TextsResponse(model=name, results=results)


def _generate_route(app: FastAPI, server: Server) -> None:
    """lmadapt's own generation route: prompts answered as single user turns."""

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:
        """Answers to prompts (a generation run), decoded as `lmadapt generate` decodes them."""
        many = req.prompts is not None
        server.check_texts(req.texts, "prompts" if many else "prompt")
        server.check_new_tokens(req.max_new_tokens, "max_new_tokens")
        entry = await server.entry_for_endpoint(req.model, "generate", "/v1/generate")
        run = entry.run
        settings = server.decoding(run, req, req.max_new_tokens)
        convs = [
            Conversation([{"role": "user", "content": t}], file="<request>") for t in req.texts
        ]
        fields = [f"prompts[{i}]" for i in range(len(convs))] if many else ["prompt"]
        ids = server.prompt_ids(entry, convs, fields, settings.max_new_tokens)
        jobs = [GenerationJob(p, settings) for p in ids]
        done = await server.generation(entry, jobs, request)
        return GenerateResponse(
            model=run.name,
            results=[GenerationOutput(**asdict(c)) for c in done],
            usage=_usage(sum(c.prompt_tokens for c in done), done),
        )


def _chat_route(app: FastAPI, server: Server) -> None:
    """OpenAI's chat completions, streamed or not."""

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat(req: ChatRequest, request: Request) -> ChatCompletion | StreamingResponse:
        """OpenAI-compatible chat completion (a generation run) in the run's chat template;
        `stream: true` answers with Server-Sent Events (chat.completion.chunk objects). `n`
        choices decode as one batch (greedy ones are equal)."""
        req.check_supported()
        texts = [m.text(i) for i, m in enumerate(req.messages)]
        server.check_texts(texts, "messages", allow_empty=True)
        max_new = req.max_completion_tokens or req.max_tokens
        server.check_new_tokens(
            max_new, "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        )
        server.check_choices(req.n, req.stream)
        entry = await server.entry_for_endpoint(req.model, "generate", "/v1/chat/completions")
        run = entry.run
        messages = [{"role": m.role, "content": t} for m, t in zip(req.messages, texts)]
        _check_turns(messages)
        settings = server.decoding(run, req, max_new)
        conv = Conversation(messages, file="<request>")
        (ids,) = server.prompt_ids(entry, [conv], ["messages"], settings.max_new_tokens)
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": chat_id, "created": created, "model": run.name}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return server.stream_chat(entry, ids, settings, head, include_usage)
        jobs = [GenerationJob(ids, settings) for _ in range(req.n)]
        done = await server.generation(entry, jobs, request)
        return ChatCompletion(
            id=chat_id,
            created=created,
            model=run.name,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatMessage(role="assistant", content=c.text),
                    finish_reason=c.finish_reason,
                )
                for i, c in enumerate(done)
            ],
            usage=_usage(len(ids), done),
        )


def _check_turns(messages: list[dict[str, str]]) -> None:
    """422 unless the conversation has the shape the task's templates render: system first if
    any, then user and assistant turns alternating, ending with the user turn to answer."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ApiError(
                422,
                f"messages[{i}].role: expected {expected}, got {m['role']} (system first, then "
                "user and assistant turns alternating)",
                f"messages[{i}].role",
            )
    if messages[-1]["role"] != "user":
        raise ApiError(422, "messages: the last message must be a user turn to answer", "messages")


def _usage(prompt: int, done: list[Completion]) -> Usage:
    """Token counts: `prompt` tokens read, once per prompt (n choices of one prompt read it
    once), and every completion's tokens."""
    completion = sum(c.completion_tokens for c in done)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _client_gone(request: Request) -> None:
    """Returns once the client disconnects. The body has been read, so a disconnect is all
    that is left to receive (the server answers it once the response is sent, too)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
