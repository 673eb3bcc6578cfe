"""The web console: static HTML, CSS and JavaScript at /ui/ on the admin port.

The pages need no token (the auth middleware guards /v1/ only); the page itself calls the
public admin API with the bearer token the user enters, so the console can do nothing the
API would not let that token do. Only the files shipped in `ui/` are served, by name.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

UI_DIR = Path(__file__).resolve().parent / "ui"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
# Everything the page loads comes from this origin; the API is called with fetch().
SECURITY_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}
FILES = web.AppKey("console_files", dict)


def add_routes(app: web.Application) -> None:
    """Register the console's routes on the admin app."""
    app[FILES] = _shipped_files()
    app.router.add_get("/ui", redirect_to_console)
    app.router.add_get("/ui/", console_index)
    app.router.add_get("/ui/{name}", console_file)


def _shipped_files() -> dict[str, Path]:
    """The servable files by name: a request can only ever name one of these."""
    if not UI_DIR.is_dir():
        return {}
    return {p.name: p for p in UI_DIR.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}


async def redirect_to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def console_index(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


async def console_file(request: web.Request) -> web.Response:
    return _serve(request, request.match_info["name"])


def _serve(request: web.Request, name: str) -> web.Response:
    path = request.app[FILES].get(name)
    if path is None:
        raise web.HTTPNotFound()
    headers = {"Content-Type": CONTENT_TYPES[path.suffix], **SECURITY_HEADERS}
    return web.Response(body=path.read_bytes(), headers=headers)
