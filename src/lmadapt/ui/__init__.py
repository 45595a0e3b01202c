"""A web dashboard over a directory of runs: `lmadapt ui RUNS_ROOT` (needs the `serve` extra)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmadapt.errors import LmadaptError


def ui(runs_root: str | Path = "runs", settings: Any = None, log_level: str = "info") -> None:
    """Serve the dashboard of every run under `runs_root` until stopped (`settings`: a
    ServeSettings for the address and the playground's serving; None = the defaults). A host
    other than loopback is refused unless settings.allow_no_auth."""
    from lmadapt.serve.settings import ServeSettings, is_loopback
    from lmadapt.session import resolve_device

    settings = settings or ServeSettings()
    if not is_loopback(settings.host) and not settings.allow_no_auth:
        raise LmadaptError(
            f"--host {settings.host} is reachable from other machines and the dashboard has no "
            "authentication (it shows every run and runs the playground): pass --allow-no-auth"
        )
    resolve_device(settings.device)
    try:
        import uvicorn

        from lmadapt.ui.app import create_ui_app
    except ImportError as e:
        raise LmadaptError(
            f"ui needs the serve extra ({e.name} is missing): pip install 'lmadapt[serve]'"
        ) from None
    app = create_ui_app(runs_root, settings)
    where = f"http://{settings.host}:{settings.port}"
    print(f"lmadapt: dashboard of {app.state.root} on {where}", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)
