"""The dashboard: ``GET /`` and its static assets, served from inside the package.

The dashboard is a single page (``service/static/index.html``, ``style.css`` and ES modules:
``app.js``, the entry, imports ``api.js``, ``chart.js``, ``dom.js``, ``entropy.js`` and one
module per page) that draws every chart as SVG in the browser from the public ``/v1`` JSON API,
so it needs no internet, no third-party chart library and no build step: the modules are served
as they are.  Routing is by URL fragment (``/#/runs/{run_id}``,
``/#/runs/{run_id}/steps/{step}``); the server also answers ``/runs/...`` with the same page so
that a path-style link works.  The page itself is not behind the token: it holds no data, and
it sends ``Authorization: Bearer <token>`` on its ``/v1`` calls when the user gives a token.
"""

from __future__ import annotations

import mimetypes
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

STATIC_PACKAGE = "service"
STATIC_DIR = "static"
ASSETS = frozenset(
    entry.name
    for entry in resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR).iterdir()
    if entry.is_file() and entry.name.endswith((".html", ".js", ".css"))
)
"""The only files served: the package's static files, listed once at import, so no request
path ever reaches the file system and a new module needs no registration."""

_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page's Content-Security-Policy: its own modules, stylesheet and ``/v1`` calls only (the
empty ``data:`` icon aside), no inline script or style, no framing; a script injected through
a run id or a prompt name would not run."""


def read_asset(name: str) -> bytes:
    """The bytes of the packaged asset ``name`` (one of :data:`ASSETS`)."""
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no dashboard asset {name!r}")
    return resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR, name).read_bytes()


def _asset_response(name: str) -> Response:
    suffix = name[name.rfind(".") :]
    media = _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media == "text/html":
        media = "text/html; charset=utf-8"
    # no-cache: the browser revalidates every file, so an upgraded service never runs a stale
    # module next to fresh ones (the modules import each other by plain, unversioned names)
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if media.startswith("text/html"):
        headers["Content-Security-Policy"] = PAGE_POLICY
    return Response(read_asset(name), media_type=media, headers=headers)


@router.get("/")
def index() -> Response:
    """The dashboard page."""
    return _asset_response("index.html")


@router.get("/runs/{path:path}")
def index_for_path(path: str) -> Response:
    """The same page for path-style links (``/runs/{run_id}``); the script reads the path."""
    return _asset_response("index.html")


@router.get("/static/{name}")
def static_asset(name: str) -> Response:
    """The page's modules (``.js``, served as JavaScript, which module scripts require) and
    ``style.css``."""
    return _asset_response(name)
