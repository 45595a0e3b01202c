"""The dashboard app: HTML pages over a JSON API on the runs under one root, and a playground
that serves one finished run through `lmadapt serve`'s own app.

Pages are Jinja2 templates filled in by static/ui.js from the JSON endpoints; plots are drawn
by Plotly in the browser (its plotly.min.js comes from the installed plotly package, so nothing
is fetched from a CDN). Every run named by a request goes through `lmadapt.paths.inside`, and
every file the dashboard reads through `lmadapt.paths.open_inside` (see `runs`), so no request
reaches a file outside the runs root, a FIFO or a device. The playground builds
`serve.app.create_app` for the chosen run and mounts it at /serve: predictions, explanations and
streamed chat are the serving code's, not a second inference path.

The serving guards apply here too: a Host header naming another site is refused (DNS
rebinding), and so is a body over UI_BODY_BYTES before it is read (the playground's own app,
mounted at /serve, keeps the serving limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import urlencode
from xml.etree.ElementTree import Element

import markdown
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmadapt.errors import LmadaptError
from lmadapt.paths import RefusedPath, inside
from lmadapt.rundir import CONFIG, CONTINUAL, EVALUATIONS, LOG, METRICS, REPORT
from lmadapt.serve.guards import BodyLimit, HostCheck, validation_error
from lmadapt.serve.settings import ServeSettings
from lmadapt.ui import runs

HERE = Path(__file__).parent
STATIC = {"ui.js": "text/javascript", "ui.css": "text/css"}
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
"""Scripts only from this server (ui.js, plotly.min.js): markdown in a report that slipped an
element through could still not run code. Plotly sets inline styles, hence style-src."""

Ids = Annotated[list[str] | None, Query()]
"""Runs named by repeated `id` query parameters."""
UI_BODY_BYTES = 64 * 1024
"""Largest request body of the dashboard's own endpoints (a run's id is all they take)."""


def plotly_js() -> Path:
    """plotly.min.js as the installed plotly package ships it."""
    return Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))


# ---------------------------------------------------------------------- reports


class _RunLinks(markdown.treeprocessors.Treeprocessor):
    """Images in a report point at the run's files through /api/file; links leave only for
    http(s) pages or anchors (a report quotes dataset text, which may hold anything)."""

    def __init__(self, md: markdown.Markdown, entry: str):
        super().__init__(md)
        self.entry = entry

    def run(self, root: Element) -> None:
        for img in root.iter("img"):
            src = img.get("src", "")
            if "://" in src or src.startswith(("/", "data:")):
                img.set("src", "")
            else:
                img.set("src", "/api/file?" + urlencode({"id": self.entry, "name": src}))
        for a in root.iter("a"):
            if not a.get("href", "").startswith(("http://", "https://", "#")):
                a.attrib.pop("href", None)


def report_html(text: str, entry: str) -> str:
    """A report.md as HTML, with raw HTML in it shown as text rather than rendered."""
    md = markdown.Markdown(extensions=["tables", "fenced_code"])
    # Python-Markdown's documented way to drop raw HTML: without these it passes through.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(_RunLinks(md, entry), "run_links", 0)
    return md.convert(text)


# ---------------------------------------------------------------------- the playground


class Playground:
    """The serving app of the one run loaded for trying out, as a mountable ASGI app (404 until
    a run is loaded). Loading another run closes the previous one's batchers."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.app: Any = None
        self.entry: str | None = None
        self.lock = threading.Lock()

    def load(self, entry: str, run_dir: Path) -> dict[str, Any]:
        from lmadapt.serve.app import create_app

        with self.lock:
            if self.entry != entry:
                app = create_app([run_dir], self.settings)
                self.close()
                self.app, self.entry = app, entry
            card = self.card()
            assert card is not None  # a run is loaded
            return card

    def card(self) -> dict[str, Any] | None:
        if self.app is None:
            return None
        server = self.app.state.server
        ((name, run),) = server.runs.items()
        return {"id": self.entry, "name": name, "endpoint": run.task.endpoint, **run.info()}

    def close(self) -> None:
        if self.app is not None:
            self.app.state.server.close()
            self.app = self.entry = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app: ASGIApp | None = self.app
        if app is None:
            response = JSONResponse({"detail": "no run loaded in the playground"}, 404)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)


class SecurityHeaders:
    """CSP and nosniff on every response, as plain ASGI middleware: streamed chat answers pass
    through untouched (no buffering, and a client leaving still cancels the decoding)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, send_with_headers)


class LoadRequest(BaseModel):
    id: str


# ---------------------------------------------------------------------- the app


def create_ui_app(runs_root: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The dashboard over `runs_root` (which must exist); `settings` apply to the playground's
    serving app (device, limits)."""
    root = Path(runs_root)
    if not root.is_dir():
        raise LmadaptError(f"{root}: no such directory of runs")
    root = root.resolve()
    settings = settings or ServeSettings()
    playground = Playground(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        playground.close()

    app = FastAPI(title="lmadapt ui", version="1", lifespan=lifespan)
    app.state.root, app.state.playground = root, playground
    app.exception_handler(RequestValidationError)(validation_error)  # typed, unlike add_...
    # the last added runs first: headers on every answer, then the host, then the body
    app.add_middleware(BodyLimit, limit=UI_BODY_BYTES, skip="/serve", setting=None)
    app.add_middleware(HostCheck, hosts=settings.host_names)
    app.add_middleware(SecurityHeaders)
    _page_routes(app, root)
    _run_routes(app, root)
    _playground_routes(app, root, playground)
    app.mount("/serve", playground)
    return app


def _run_dir(root: Path, entry: str) -> Path:
    """The run directory `entry` names under `root`; 404 for anything else."""
    try:
        return inside(root, entry, kind="dir")
    except RefusedPath:
        raise HTTPException(404, "no such run under the runs root") from None


def _page_routes(app: FastAPI, root: Path) -> None:
    """The HTML pages (filled in by ui.js from the JSON routes) and their static files."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"root": str(root), "page": name.removesuffix(".html"), **context}
        )

    @app.get("/", response_class=HTMLResponse)
    async def runs_page(request: Request) -> HTMLResponse:
        return page(request, "runs.html")

    @app.get("/run", response_class=HTMLResponse)
    async def run_page(request: Request, id: str) -> HTMLResponse:
        _run_dir(root, id)
        return page(request, "run.html", entry=id)

    @app.get("/compare", response_class=HTMLResponse)
    async def compare_page(request: Request, id: Ids = None) -> HTMLResponse:
        for entry in id or []:
            _run_dir(root, entry)
        return page(request, "compare.html", entries=id or [])

    @app.get("/playground", response_class=HTMLResponse)
    async def playground_page(request: Request, id: str | None = None) -> HTMLResponse:
        return page(request, "playground.html", entry=id or "")

    @app.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        if name == "plotly.min.js":
            return FileResponse(plotly_js(), media_type="text/javascript")
        if name not in STATIC:
            raise HTTPException(404, "no such file")
        return FileResponse(HERE / "static" / name, media_type=STATIC[name])


def _run_routes(app: FastAPI, root: Path) -> None:
    """The JSON the runs, run and compare pages read."""

    @app.get("/api/runs")
    async def list_runs() -> JSONResponse:
        """Every run under the root, one table row each (bad directories included)."""
        # Plain JSON values already: a JSONResponse skips FastAPI's jsonable_encoder, which
        # took most of the request's time with 200 runs.
        return JSONResponse(await asyncio.to_thread(runs.scan, root))

    @app.get("/api/progress")
    async def progress(id: Ids = None) -> list[dict[str, Any]]:
        """Fresh rows for the given runs (the runs page polls the ones still training)."""
        rows = []
        for entry in id or []:
            path = _run_dir(root, entry)
            kind = runs.kind_of(path, {p.name for p in path.iterdir()}) or "run"
            rows.append(runs.summary(root, path, kind))
        return rows

    @app.get("/api/run")
    async def run_detail(id: str) -> dict[str, Any]:
        """A run's row, report, config, curves, and what else it wrote (confusion matrices, a
        preference run's rewards, the continual accuracy matrix, hpo trials); each part that
        cannot be read names its problem instead."""
        path = _run_dir(root, id)
        return await asyncio.to_thread(detail, root, path)

    @app.get("/api/file")
    async def run_file(id: str, name: str) -> StreamingResponse:
        """An image a run wrote (plots); nothing outside the run, nothing but images."""
        try:
            f = await asyncio.to_thread(runs.open_image, _run_dir(root, id), name)
        except RefusedPath:
            raise HTTPException(404, "no such image in this run") from None
        media_type = runs.IMAGE_TYPES[Path(f.name).suffix.lower()]
        return StreamingResponse(_chunks(f), media_type=media_type)


def _playground_routes(app: FastAPI, root: Path, playground: Playground) -> None:
    """Which run the playground serves at /serve, and loading another."""

    @app.get("/api/playground")
    async def playground_state() -> dict[str, Any] | None:
        return playground.card()

    @app.post("/api/playground")
    async def playground_load(req: LoadRequest) -> dict[str, Any]:
        """Load a finished run for the playground (replacing the one loaded before)."""
        path = _run_dir(root, req.id)
        try:
            await asyncio.to_thread(runs.check_loadable, root, path)
        except RefusedPath as e:
            raise HTTPException(
                400, f"the playground loads only runs whose files lie inside the runs root: {e}"
            ) from None
        try:
            return await asyncio.to_thread(playground.load, req.id, path)
        except LmadaptError as e:
            raise HTTPException(400, str(e)) from None


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while block := f.read(64 * 1024):
            yield block


def detail(root: Path, path: Path) -> dict[str, Any]:
    """Everything the run page shows, each part read on its own so one bad file spoils only
    its part."""
    files = {p.name for p in path.iterdir()}
    kind = runs.kind_of(path, files) or "run"
    out: dict[str, Any] = {"summary": runs.summary(root, path, kind)}
    problems = out["summary"]["problems"]
    entry = out["summary"]["id"]

    def part(name: str, read: Any) -> None:
        try:
            out[name] = read()
        except Exception as e:  # a foreign or half-written file: shown, never fatal
            problems.append(f"{name}: {type(e).__name__}: {e}")

    report = next((n for n in (REPORT, "compare.md") if n in files), None)
    if report:
        part("report", lambda: runs.read_text(path, report))
        text = out.pop("report", "")
        part("report_html", lambda: report_html(text, entry))
    if EVALUATIONS in files:
        part("confusion", lambda: runs.confusion_matrices(path))
    if CONFIG in files:
        part("config", lambda: runs.read_text(path, CONFIG))
        part("config_data", lambda: runs.read_yaml(path, CONFIG))
    if LOG in files:
        part("curves", lambda: runs.curves(path))
    if CONTINUAL in files:
        part("continual", lambda: runs.read_json(path, CONTINUAL))
    if "study.db" in files:
        part("trials", lambda: runs.hpo_trials(path))
    if METRICS in files:
        part("metrics", lambda: runs.read_json(path, METRICS))
    if isinstance(out.get("metrics"), dict):
        part("rewards", lambda: runs.rewards(out["metrics"]))
    return out
