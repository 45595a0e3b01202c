"""The HTTP app: finished runs behind a small JSON API (FastAPI), with dynamic micro-batching.

Requests name a run by `model` (its directory's basename); names are looked up in a fixed table
built at start-up, so no request field ever reaches the filesystem. Every endpoint checks that
the run's task fits it (a classification run is not an NER model) and that inputs stay within
the configured limits, answering 4xx with a message that says which limit and by how much
(never quoting a rejected input back). Middleware refuses oversized bodies before they are
parsed and, with an API key set, callers without it.

Generation runs decode with their task's own `decode_ids` (the code behind `lmadapt generate`),
in the model group's batcher thread; a streamed chat completion hands that thread a transformers
streamer and relays its text as Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Hashable
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmadapt.data.chat import Conversation
from lmadapt.errors import LmadaptError
from lmadapt.inference import GenerationSettings
from lmadapt.serve.batching import MicroBatcher, QueueFullError
from lmadapt.serve.guards import ApiKey, BodyLimit, shorten, validation_error
from lmadapt.serve.runs import Completion, GenerationJob, ModelGroup, ServedRun, load_groups
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


class ChatRequest(Decoding):
    """OpenAI chat-completions shape; fields lmadapt does not use (n, logprobs...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False


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
    labels: list[str] | None = None
    shares_base_with: list[str] = Field(
        default_factory=list,
        description="Other runs that use the same in-memory copy of the base model's weights.",
    )


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------- the app


class Server:
    """Run table, one micro-batcher per in-memory model, and the request checks."""

    def __init__(self, groups: list[ModelGroup], settings: ServeSettings):
        self.settings = settings
        self.groups = groups
        self.runs: dict[str, ServedRun] = {}
        self.group_of: dict[str, ModelGroup] = {}
        self.batchers: dict[int, MicroBatcher] = {}
        self._solo = itertools.count()
        for i, g in enumerate(groups):
            self.batchers[id(g)] = MicroBatcher(
                g.generate if g.endpoint == "generate" else g.predict,
                settings.max_batch,
                settings.max_wait_ms,
                settings.max_queue,
                name=f"lmadapt-batcher-{i}",
            )
            for name, run in g.runs.items():
                self.runs[name], self.group_of[name] = run, g

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()

    def run_for(self, name: str | None) -> ServedRun:
        names = ", ".join(sorted(self.runs))
        if name is None:
            if len(self.runs) == 1:
                return next(iter(self.runs.values()))
            raise HTTPException(400, f"field 'model' is required; served models: {names}")
        if name not in self.runs:
            raise HTTPException(404, f"unknown model {shorten(name)!r}; served models: {names}")
        return self.runs[name]

    def check_texts(
        self, texts: list[str], field: str = "texts", allow_empty: bool = False
    ) -> None:
        """Count and length limits (413), and text a tokenizer cannot take (422)."""
        s = self.settings
        if len(texts) > s.max_texts:
            raise HTTPException(
                413, f"{len(texts)} {field} in one request; the limit is {s.max_texts}"
            )
        for i, t in enumerate(texts):
            if len(t) > s.max_chars:
                raise HTTPException(
                    413, f"{field}[{i}] has {len(t)} characters; the limit is {s.max_chars}"
                )
            if not allow_empty and not t.strip():
                raise HTTPException(422, f"{field}[{i}] is empty")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise HTTPException(
                        422, f"{field}[{i}] holds an unpaired surrogate (bad \\u escape)"
                    ) from None

    def check_new_tokens(self, n: int | None, field: str) -> None:
        if n is not None and n > self.settings.max_new_tokens:
            raise HTTPException(
                413, f"{field}={n} exceeds the server limit {self.settings.max_new_tokens}"
            )

    def run_for_endpoint(self, name: str | None, endpoint: str, path: str) -> ServedRun:
        """The named run, if its task answers at `endpoint` (the task decides, not a table)."""
        run = self.run_for(name)
        if run.task.endpoint != endpoint:
            served = " or ".join(e.name for e in TASKS if e.impl.endpoint == endpoint)
            raise HTTPException(
                400, f"model {run.name!r} is a {run.kind} model; {path} needs a {served} model"
            )
        return run

    def submit(self, run: ServedRun, key: Hashable, items: list[Any]) -> Future:
        try:
            return self.batchers[id(self.group_of[run.name])].submit(key, items)
        except QueueFullError as e:
            raise HTTPException(503, str(e)) from None

    async def results(self, future: Future) -> list[Any]:
        try:
            return await asyncio.wrap_future(future)
        except LmadaptError as e:
            raise HTTPException(400, str(e)) from None

    async def texts(self, req: TextsRequest, endpoint: str) -> TextsResponse:
        run = self.run_for_endpoint(req.model, endpoint, f"/v1/{endpoint}")
        self.check_texts(req.texts)
        results = await self.results(self.submit(run, run.name, req.texts))
        return TextsResponse(model=run.name, results=results)

    # ------------------------------------------------------------------ generation

    def decoding(
        self, run: ServedRun, req: Decoding, max_new_tokens: int | None
    ) -> GenerationSettings:
        """The run's decoding settings with the request's overrides. Temperature 0 is greedy and
        > 0 samples (OpenAI's convention); an omitted max_new_tokens is the run's, capped."""
        cap = min(run.task.cfg.max_new_tokens, self.settings.max_new_tokens)
        settings = run.task.settings(
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
        run: ServedRun,
        conversations: list[Conversation],
        fields: list[str],
        max_new_tokens: int,
    ) -> list[list[int]]:
        """Templated prompt tokens; 413 for a prompt the task would truncate (it keeps the last
        task.max_length tokens) or one the model's context cannot hold with its answer."""
        try:
            feats = run.task.encode(conversations, run.tokenizer)
        except (LmadaptError, TemplateError) as e:
            raise HTTPException(400, f"cannot render the prompt for {run.name!r}: {e}") from None
        limit, context = run.task.cfg.max_length, self.group_of[run.name].context
        ids = [run.task.prompt_ids(f, c) for f, c in zip(feats, conversations)]
        for field, prompt in zip(fields, ids):
            if len(prompt) >= limit:
                raise HTTPException(
                    413,
                    f"{field} is too long: {limit} tokens or more with the prompt template; "
                    f"model {run.name!r} takes up to {limit - 1} (its task.max_length is {limit})",
                )
            if context and len(prompt) + max_new_tokens > context:
                raise HTTPException(
                    413,
                    f"{field} has {len(prompt)} tokens; with {max_new_tokens} new tokens that "
                    f"exceeds the {context}-token context of model {run.name!r}",
                )
        return ids

    def submit_generation(self, run: ServedRun, jobs: list[GenerationJob]) -> Future:
        """Greedy jobs with equal settings from concurrent requests decode as one batch; sampled
        or streamed ones alone (a seed then gives the same text whatever else is queued)."""
        first = jobs[0]
        alone = first.settings.do_sample or first.streamer is not None
        return self.submit(
            run, (run.name, next(self._solo) if alone else repr(first.settings)), jobs
        )

    def stream_chat(
        self, run: ServedRun, ids: list[int], settings: GenerationSettings, head: dict[str, Any]
    ) -> StreamingResponse:
        """SSE chunks as tokens are generated: the role, the content pieces (which concatenate
        to the non-streamed answer), a last chunk with finish_reason, then [DONE]."""
        stream = TokenStream(run.tokenizer)
        future = self.submit_generation(run, [GenerationJob(ids, settings, stream)])
        cutter = StopCutter(run.task.stop_strings(settings))

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

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
                    yield sse({"error": {"message": str(e), "type": "invalid_request_error"}})
                    return
                yield chunk({}, done.finish_reason)
                yield sse("[DONE]")
            finally:
                stream.cancel()  # a client that went away stops decoding at the next token

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def cards(self) -> list[ModelCard]:
        cards = []
        for name, run in self.runs.items():
            base = self.group_of[name].base
            siblings = sorted(n for n, g in self.group_of.items() if g.base == base and n != name)
            cards.append(ModelCard(id=name, shares_base_with=siblings, **run.info()))
        return cards

    def health(self) -> dict[str, Any]:
        batches = sum(b.stats.batches for b in self.batchers.values())
        items = sum(b.stats.items for b in self.batchers.values())
        return {
            "status": "ok",
            "models": sorted(self.runs),
            "base_models_in_memory": len({g.base for g in self.groups}),
            "batches": batches,
            "items": items,
            "largest_batch": max((b.stats.largest for b in self.batchers.values()), default=0),
        }


def create_app(run_dirs: list[str | Path], settings: ServeSettings | None = None) -> FastAPI:
    """Load the runs (adapters over one base model share its weights) and build the app."""
    settings = settings or ServeSettings()
    if not run_dirs:
        raise LmadaptError("serve needs at least one run directory")
    device = resolve_device(settings.device)
    server = Server(load_groups(list(run_dirs), settings.max_batch, device), settings)

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
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(BodyLimit, limit=settings.body_limit)
    if settings.api_key is not None:  # added last, so it runs first: no body is read unchecked
        app.add_middleware(ApiKey, key=settings.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the served runs, and micro-batching counters."""
        return server.health()

    @app.get("/v1/models")
    async def models() -> ModelList:
        """Served runs (OpenAI list shape) with task, method, base model and labels."""
        return ModelList(data=server.cards())

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
        run = server.run_for_endpoint(req.model, "qa", "/v1/qa")
        server.check_texts([item.question for item in req.items], "questions")
        server.check_texts([item.context for item in req.items], "contexts")
        items = [item.model_dump() for item in req.items]
        results = await server.results(server.submit(run, run.name, items))
        return TextsResponse(model=run.name, results=results)

    @app.post("/v1/explain")
    async def explain(req: ExplainRequest) -> TextsResponse:
        """Per-word attributions of each text's prediction (a classification or NER run), as
        `lmadapt explain` prints them; computed outside the micro-batcher (it needs gradients)."""
        run = server.run_for(req.model)
        server.check_texts(req.texts)
        group = server.group_of[run.name]
        try:
            results = await asyncio.to_thread(
                group.explain, run.name, req.texts, req.method, req.label, req.steps
            )
        except LmadaptError as e:
            raise HTTPException(400, str(e)) from None
        return TextsResponse(model=run.name, results=results)

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> GenerateResponse:
        """Answers to prompts (a generation run), decoded as `lmadapt generate` decodes them."""
        many = req.prompts is not None
        server.check_texts(req.texts, "prompts" if many else "prompt")
        server.check_new_tokens(req.max_new_tokens, "max_new_tokens")
        run = server.run_for_endpoint(req.model, "generate", "/v1/generate")
        settings = server.decoding(run, req, req.max_new_tokens)
        convs = [
            Conversation([{"role": "user", "content": t}], file="<request>") for t in req.texts
        ]
        fields = [f"prompts[{i}]" for i in range(len(convs))] if many else ["prompt"]
        ids = server.prompt_ids(run, convs, fields, settings.max_new_tokens)
        jobs = [GenerationJob(p, settings) for p in ids]
        done = await server.results(server.submit_generation(run, jobs))
        return GenerateResponse(
            model=run.name,
            results=[GenerationOutput(**asdict(c)) for c in done],
            usage=_usage(done),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat(req: ChatRequest) -> ChatCompletion | StreamingResponse:
        """OpenAI-compatible chat completion (a generation run) in the run's chat template;
        `stream: true` answers with Server-Sent Events (chat.completion.chunk objects)."""
        server.check_texts([m.content for m in req.messages], "messages", allow_empty=True)
        n = req.max_completion_tokens or req.max_tokens
        server.check_new_tokens(
            n, "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        )
        run = server.run_for_endpoint(req.model, "generate", "/v1/chat/completions")
        messages = [m.model_dump() for m in req.messages]
        _check_turns(messages)
        settings = server.decoding(run, req, n)
        conv = Conversation(messages, file="<request>")
        (ids,) = server.prompt_ids(run, [conv], ["messages"], settings.max_new_tokens)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": run.name,
        }
        if req.stream:
            return server.stream_chat(run, ids, settings, head)
        (done,) = await server.results(
            server.submit_generation(run, [GenerationJob(ids, settings)])
        )
        reply = ChatMessage(role="assistant", content=done.text)
        return ChatCompletion(
            **head,
            choices=[ChatChoice(message=reply, finish_reason=done.finish_reason)],
            usage=_usage([done]),
        )

    return app


def _check_turns(messages: list[dict[str, str]]) -> None:
    """422 unless the conversation has the shape the task's templates render: system first if
    any, then user and assistant turns alternating, ending with the user turn to answer."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise HTTPException(
                422,
                f"messages[{i}].role: expected {expected}, got {m['role']} (system first, then "
                "user and assistant turns alternating)",
            )
    if messages[-1]["role"] != "user":
        raise HTTPException(422, "messages: the last message must be a user turn to answer")


def _usage(done: list[Completion]) -> Usage:
    prompt = sum(c.prompt_tokens for c in done)
    completion = sum(c.completion_tokens for c in done)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
