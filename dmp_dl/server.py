"""The HTTP JSON API over a :class:`~dmp_dl.recommender.Recommender` (FastAPI; docs at ``/docs``).

``create_app(recommender)`` builds the app; ``serve(cfg)`` loads a bundle and runs it with uvicorn
(``python serve.py artifacts=DIR``). The loaded recommender lives in ``app.state.recommender``;
every handler reads that attribute once per request, so assigning a new Recommender to it swaps
bundles atomically for all later requests.

Errors: unknown ids -> 404, bad parameters -> 422, a part the bundle lacks (propensity, cold
start) -> 409, a missing/invalid bearer token -> 401, a body over the size limit -> 413; always
with a JSON body whose ``detail`` says what is wrong (plus ``error``, a short kind, for the
errors this module raises).
"""

import logging
import os
import secrets
from typing import Annotated, Literal

import faiss
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from dmp_dl.bundle import MissingPartError
from dmp_dl.errors import UnknownIdError
from dmp_dl.recommender import InvalidRequestError, Ranked, Recommender

log = logging.getLogger(__name__)

Id = str | int


class ScoredItem(BaseModel):
    item_id: str
    score: float


class ScoredUser(BaseModel):
    user_id: str
    score: float


class ItemList(BaseModel):
    items: list[ScoredItem]


class UserList(BaseModel):
    users: list[ScoredUser]


class HistoryRequest(BaseModel):
    history: list[Id] = Field(description="item ids the new user interacted with, oldest first")
    k: int = 10
    exclude_seen: bool = Field(True, description="leave the history's items out")
    attributes: dict[str, str | int | float | None] | None = Field(
        None, description="optional user attributes (columns of the user table), e.g. {\"age\": 34}")


class LookalikeRequest(BaseModel):
    seed_user_ids: list[Id]
    k: int = 100
    exclude_seeds: bool = True
    method: Literal["centroid", "neighbours"] = "centroid"


class PropensityRequest(BaseModel):
    user_ids: list[Id]


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes", "error": "too_large"}, 413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # FastAPI re-raises HTTPExceptions from body reading
            return message

        return await self.app(scope, limited_receive, send)


def _items(ranked: Ranked) -> dict:
    return {"items": [{"item_id": i, "score": s} for i, s in ranked]}


def create_app(recommender: Recommender, token: str | None = None, max_ids: int = 10_000,
               max_body_bytes: int = 1 << 20, faiss_threads: int | None = None) -> FastAPI:
    """The API app over ``recommender``.

    token: if set, every endpoint but ``/health`` (and the docs) needs ``Authorization: Bearer <token>``.
    max_ids: most ids in one request's list (history, seeds, user ids); max_body_bytes: request size cap.
    faiss_threads: OpenMP threads per FAISS call in the request threads (None: FAISS default).
    ``k`` is bounded by ``recommender.max_k``.
    """
    app = FastAPI(title="dmp_dl recommender", version=recommender.manifest.get("created_at") or "bundle",
                  description="Recommendations, similar items, lookalike audiences and propensity from a dmp_dl bundle.")
    app.state.recommender = recommender
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def current(request: Request) -> Recommender:
        """The recommender, read once per request (a swap never mixes bundles within a request).

        Called in the handler's own worker thread: OpenMP's thread count is per thread, so a
        setting made in the main thread does not reach uvicorn's thread pool.
        """
        if faiss_threads:
            faiss.omp_set_num_threads(faiss_threads)
        return request.app.state.recommender

    def bounded(ids: list, name: str) -> list:
        if len(ids) > max_ids:
            raise InvalidRequestError(f"{name} has {len(ids)} ids, at most {max_ids} per request")
        return ids

    guarded = [Depends(authorised)]

    @app.exception_handler(UnknownIdError)
    async def unknown_id(request: Request, exc: UnknownIdError):
        return JSONResponse({"detail": str(exc), "error": "unknown_id", "kind": exc.kind}, 404)

    @app.exception_handler(MissingPartError)
    async def missing_part(request: Request, exc: MissingPartError):
        return JSONResponse({"detail": str(exc), "error": "unavailable"}, 409)

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, exc: InvalidRequestError):
        return JSONResponse({"detail": str(exc), "error": "invalid_request"}, 422)

    @app.get("/health")
    def health(request: Request) -> dict:
        """Liveness and what is loaded (no token needed)."""
        return {"status": "ok", **current(request).info()}

    @app.get("/recommend", dependencies=guarded, response_model=ItemList)
    def recommend(request: Request, user_id: str, k: int = 10, exclude_seen: bool = True) -> dict:
        """Top-k items for a known user, best first."""
        return _items(current(request).recommend(user_id, k, exclude_seen))

    @app.post("/recommend", dependencies=guarded, response_model=ItemList)
    def recommend_for_history(request: Request, body: HistoryRequest) -> dict:
        """Top-k items for a new user described by recent items (and optional attributes)."""
        return _items(current(request).recommend_for_history(bounded(body.history, "history"), body.k, body.exclude_seen, body.attributes))

    @app.get("/similar-items", dependencies=guarded, response_model=ItemList)
    def similar_items(request: Request, item_id: str, k: int = 10) -> dict:
        """Top-k items most like ``item_id`` (itself excluded)."""
        return _items(current(request).similar_items(item_id, k))

    @app.post("/lookalike", dependencies=guarded, response_model=UserList)
    def lookalike(request: Request, body: LookalikeRequest) -> dict:
        """The k users most like the seed users (audience expansion)."""
        ranked = current(request).lookalike(bounded(body.seed_user_ids, "seed_user_ids"), body.k, body.exclude_seeds, body.method)
        return {"users": [{"user_id": u, "score": s} for u, s in ranked]}

    @app.post("/propensity", dependencies=guarded, response_model=UserList)
    def propensity(request: Request, body: PropensityRequest) -> dict:
        """Purchase propensity of known users, in the order given."""
        ids = bounded(body.user_ids, "user_ids")
        return {"users": [{"user_id": str(u), "score": s} for u, s in zip(ids, current(request).propensity(ids))]}

    return app


def serve(cfg) -> None:
    """Load ``cfg.artifacts`` and serve it with uvicorn (``conf/serve.yaml``)."""
    import uvicorn

    token = cfg.get("token") or os.environ.get(cfg.get("token_env") or "", "") or None
    threads = int(cfg.faiss_threads) if cfg.get("faiss_threads") else None
    rec = Recommender.load(cfg.artifacts, max_k=int(cfg.max_k), search_params=cfg.get("search_params"))
    info = rec.info()
    log.info("loaded %s: %d users, %d items, item index %s", cfg.artifacts, info["users"], info["items"],
             info["indexes"].get("items", {}).get("factory"))
    if token is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who can reach the port can query it "
                    "(set token=... or $%s)", cfg.host, cfg.get("token_env"))
    app = create_app(rec, token=token, max_ids=int(cfg.max_ids), max_body_bytes=int(cfg.max_body_bytes),
                     faiss_threads=threads)
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.get("log_level", "info"))
