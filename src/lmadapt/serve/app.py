"""The HTTP app: finished runs behind a small JSON API (FastAPI), with dynamic micro-batching.

Requests name a run by `model` (its directory's basename); names are looked up in a fixed table
built at start-up, so no request field ever reaches the filesystem. Every endpoint checks that
the run's task fits it (a classification run is not an NER model) and that inputs stay within
the configured limits, answering 4xx with a message that says which limit and by how much.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, NoReturn

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from lmadapt.errors import LmadaptError
from lmadapt.serve.batching import MicroBatcher, QueueFullError
from lmadapt.serve.runs import ModelGroup, ServedRun, load_groups
from lmadapt.serve.settings import ServeSettings

NER_KINDS = ("token_classification", "ner")
GENERATION_KINDS = ("generation",)


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


class GenerateRequest(_Strict):
    model: str | None = None
    prompt: str
    max_new_tokens: int = Field(64, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """OpenAI chat-completions shape; fields lmadapt does not use (temperature...) are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "lmadapt"
    task: str
    method: str
    base_model: str
    labels: list[str] | None = None
    shares_base_with: list[str] = Field(
        default_factory=list, description="Other runs served from the same in-memory base model."
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
        for i, g in enumerate(groups):
            self.batchers[id(g)] = MicroBatcher(
                g.predict,
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
            raise HTTPException(404, f"unknown model {name!r}; served models: {names}")
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

    def check_new_tokens(self, n: int | None) -> None:
        if n is not None and n > self.settings.max_new_tokens:
            raise HTTPException(
                413, f"max_new_tokens={n} exceeds the server limit {self.settings.max_new_tokens}"
            )

    async def texts(self, req: TextsRequest, kinds: tuple[str, ...], what: str) -> TextsResponse:
        run = self.run_for(req.model)
        if run.kind not in kinds:
            raise HTTPException(
                400, f"model {run.name!r} is a {run.kind} model; {what} needs a {kinds[0]} model"
            )
        self.check_texts(req.texts)
        group = self.group_of[run.name]
        try:
            future = self.batchers[id(group)].submit(run.name, req.texts)
        except QueueFullError as e:
            raise HTTPException(503, str(e)) from None
        try:
            results = await asyncio.wrap_future(future)
        except LmadaptError as e:
            raise HTTPException(400, str(e)) from None
        return TextsResponse(model=run.name, results=results)

    def refuse_generation(self, name: str | None, endpoint: str) -> NoReturn:
        """400 for a non-generation run; 501 for a generation run until a generation task
        exists to say how it decodes (its `generate` then plugs in here)."""
        run = self.run_for(name)
        if run.kind not in GENERATION_KINDS:
            raise HTTPException(
                400,
                f"model {run.name!r} is a {run.kind} model; {endpoint} needs a generation model",
            )
        raise HTTPException(501, f"{endpoint}: serving generation models is not implemented yet")

    def cards(self) -> list[ModelCard]:
        cards = []
        for name, run in self.runs.items():
            siblings = [n for n in self.group_of[name].runs if n != name]
            cards.append(ModelCard(id=name, shares_base_with=siblings, **run.info()))
        return cards

    def health(self) -> dict[str, Any]:
        batches = sum(b.stats.batches for b in self.batchers.values())
        items = sum(b.stats.items for b in self.batchers.values())
        return {
            "status": "ok",
            "models": sorted(self.runs),
            "base_models_in_memory": len(self.groups),
            "batches": batches,
            "items": items,
            "largest_batch": max((b.stats.largest for b in self.batchers.values()), default=0),
        }


def create_app(run_dirs: list[str | Path], settings: ServeSettings | None = None) -> FastAPI:
    """Load the runs (sharing base models between sibling adapters) and build the app."""
    settings = settings or ServeSettings()
    if not run_dirs:
        raise LmadaptError("serve needs at least one run directory")
    server = Server(load_groups(list(run_dirs), settings.max_batch), settings)

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
        return await server.texts(req, ("classification",), "/v1/classify")

    @app.post("/v1/ner")
    async def ner(req: TextsRequest) -> TextsResponse:
        """Entities for each text (a token-classification run), as the task decodes them."""
        return await server.texts(req, NER_KINDS, "/v1/ner")

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """Text continuation (a generation run). Requests are checked; decoding awaits a task."""
        server.check_texts([req.prompt], "prompt")
        server.check_new_tokens(req.max_new_tokens)
        server.refuse_generation(req.model, "/v1/generate")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> dict[str, Any]:
        """OpenAI-compatible chat completions (a generation run); `stream` selects SSE.

        Requests are checked; decoding awaits a generation task.
        """
        server.check_texts([m.content for m in req.messages], "messages", allow_empty=True)
        server.check_new_tokens(req.max_completion_tokens or req.max_tokens)
        server.refuse_generation(req.model, "/v1/chat/completions")

    return app
