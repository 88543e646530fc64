"""The fleet page: ``GET /`` and its few static files, shipped in the package (``web/``).

No build step and nothing fetched from elsewhere: one HTML file, one script, one style
sheet and an icon. The page itself holds no data and needs no token; it asks the admin
token of the operator and sends it with each API call (``Authorization: Bearer``). The
headers keep it to this origin: no inline script or style, no framing, no referrer.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

WEB = "web"
INDEX = "index.html"
STATIC: dict[str, str] = {  # the only files served under /static/, with their types
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("clusterctl.fleet").joinpath(WEB).joinpath(name).read_bytes()


def _answer(body: bytes, content_type: str) -> web.Response:
    return web.Response(body=body, headers={**HEADERS, "Content-Type": content_type})


async def index(_request: web.Request) -> web.Response:
    return _answer(_read(INDEX), "text/html; charset=utf-8")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = STATIC.get(name)
    if content_type is None:
        return web.json_response(
            {"error": f"no page file {name[:100]!r}",
             "fix": f"the page's files are {', '.join(STATIC)}; the page itself is at /"},
            status=404, headers=HEADERS)
    return _answer(_read(name), content_type)


def add_routes(app: web.Application) -> None:
    """The page at ``/``, its files at ``/static/{name}``."""
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
