"""The HTTP JSON API over a :class:`~dmp_dl.serving.recommender.Recommender` (FastAPI; docs at ``/docs``).

``create_app(recommender)`` builds the app; ``serve(cfg)`` loads a bundle and runs it with uvicorn
(``python serve.py artifacts=DIR``). The loaded recommender lives in ``app.state.recommender``;
every handler reads that attribute once per request, so assigning a new Recommender to it swaps
bundles atomically for all later requests. ``POST /reload`` does that for a new bundle
published at the served path (a directory an export replaced, or a re-pointed symlink): it loads and verifies the whole bundle first, and a bad one is
refused (409) while the current one keeps serving.

Errors: unknown ids -> 404, bad parameters -> 422, a part the bundle lacks (propensity, cold
start) -> 409, a missing/invalid bearer token -> 401, a write (events, erasure, reload) on a server
without a token -> 403, a body over the size limit -> 413; always
the JSON body of :mod:`dmp_dl.api.http_errors` (``detail`` says what is wrong, ``error`` is a
machine-readable code), and each route declares the statuses it can answer in the OpenAPI
document. The request models carry their limits (``k`` in 1..max_k, at most ``max_ids`` ids, the
attribute columns the model reads with their types and ranges), so what the schema allows is what
the server accepts.
"""

import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import faiss
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, create_model

from dmp_dl.api.audience_routes import add_audience_routes
from dmp_dl.api.http_errors import ErrorBody, error_response, error_responses, install_error_handlers
from dmp_dl.api.json_types import JsonInt
from dmp_dl.core.errors import BundleError, DmpError
from dmp_dl.core.memory_watch import SERVER_ADVICE, MemoryWatch
from dmp_dl.data.schema import MAX_ABS_VALUE
from dmp_dl.serving.recommender import InvalidRequestError, Ranked, Recommender
from dmp_dl.store.bundle import MANIFEST, MissingPartError

log = logging.getLogger(__name__)

Id = str | JsonInt
QUERY_LIST_MAX = 32  # values per list parameter of a GET query string (a POST body takes max_ids)
# the request line and headers the HTTP server reads (uvicorn's default, 16 KiB, refuses a GET with
# QUERY_LIST_MAX long values in plain text, outside the documented JSON errors)
MAX_REQUEST_HEAD_BYTES = 1 << 20


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


class Interest(BaseModel):
    category: str
    weight: float = Field(description="time-decayed interest I(c, u)")
    share: float = Field(description="share of the user's total interest")


class UserSegment(BaseModel):
    segment: int
    distance: float = Field(description="squared distance to the segment's centre")
    top_categories: list[str]


class Profile(BaseModel):
    user_id: str
    interests: list[Interest]
    event_types: dict[str, float] = Field(description="recency-weighted events per event type")
    as_of: int = Field(description="epoch seconds the ages are measured from (the last event of the data)")
    half_life_days: float
    segment: UserSegment | None


class CategoryLift(BaseModel):
    category: str
    share: float = Field(description="mean share of the segment's users' interest in the category")
    lift: float | None = Field(description="share in the segment / share over all users (> 1: over-represented)")


class AttributeValue(BaseModel):
    value: str = Field(description="column=value of the user table")
    share: float = Field(description="share of the segment's users with the value")
    overall: float = Field(description="share of all users with the value")
    lift: float


class NumericMean(BaseModel):
    mean: float = Field(description="mean in the segment")
    overall: float = Field(description="mean over all users")


class SegmentAttributes(BaseModel):
    numeric: dict[str, NumericMean] = {}
    over_represented: list[AttributeValue] = []


class SegmentDescription(BaseModel):
    segment: int
    label: str = Field(description="top interest categories and the most over-represented attribute value")
    size: int = Field(description="users in the segment")
    share: float = Field(description="share of all users")
    top_categories: list[CategoryLift] = []
    mean_propensity: float | None = Field(None, description="mean propensity of its users (null without a propensity model)")
    attributes: SegmentAttributes = SegmentAttributes()
    representatives: list[str] = Field(description="the users nearest the segment's centre")


class SegmentList(BaseModel):
    k: int = Field(description="number of segments")
    segments: list[SegmentDescription]


class JournalHealth(BaseModel):
    """The event journal of a real-time server."""

    writable: bool = Field(description="whether POST /events can journal events now (false: it answers 409 "
                                       "journal_unavailable; the next batch tries again)")
    error: str | None = Field(description="what failed last (no path), or null")
    erased_rows_pending: bool = Field(description="rows of erased users that could not be removed from the journal "
                                                  "yet (never served nor replayed; the next start or reload removes them)")


class Health(BaseModel):
    """Liveness and a summary of the loaded bundle (``Recommender.info()``)."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "degraded"] = Field(description="degraded: queries are answered, but the event journal cannot "
                                                          "take events or still holds rows of erased users (see journal)")
    journal: JournalHealth | None = Field(None, description="the event journal (real-time servers only)")


class StrictBody(BaseModel):
    """A request body: JSON types are taken as they are (``"5"`` is not a k, ``true`` is not an id)
    and unknown fields are refused, so a typo (``exclude_seens``) is a 422, not a silent default."""

    model_config = ConfigDict(strict=True, extra="forbid")


def attributes_model(rec: Recommender) -> type[BaseModel]:
    """The ``attributes`` object of ``POST /recommend``: one optional property per user-table column
    the model reads (categorical: text or a number; numeric: a number within ±MAX_ABS_VALUE), nothing
    else; an empty object when the model reads no attributes."""
    features = rec.user_features
    reads = features is not None and getattr(getattr(rec.network, "user_attr", None), "active", False)
    fields: dict[str, Any] = {}
    if reads:
        for i, col in enumerate(features.categorical_columns):
            fields[f"c{i}"] = (str | int | float | None, Field(None, alias=col, description="categorical"))
        for i, col in enumerate(features.numeric_columns):
            fields[f"n{i}"] = (float | None, Field(None, alias=col, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE,
                                                         description="numeric"))
    return create_model("Attributes", __config__=ConfigDict(strict=True, extra="forbid"), **fields)


def _explain(attributes: type[BaseModel]) -> Callable[[dict], str | None]:
    """Clearer messages for validation errors of the attributes object (unknown or out-of-range columns)."""
    known = sorted(f.alias for f in attributes.model_fields.values())

    def explain(error: dict) -> str | None:
        loc = tuple(error.get("loc", ()))
        if loc[:2] != ("body", "attributes") or len(loc) < 3:
            return None
        if error.get("type") == "extra_forbidden":
            return f"unknown attribute {loc[2]!r}; this model reads {known}" if known else \
                "this model does not read user attributes; leave attributes out"
        value = error.get("input")
        too_big = error.get("type") == "float_type" and isinstance(value, int) and not isinstance(value, bool)
        if too_big or error.get("type") in ("less_than_equal", "greater_than_equal"):  # too_big: past float range
            return f"outside ±{MAX_ABS_VALUE:g}: send a realistic value or leave it out"
        return None

    return explain


def request_models(rec: Recommender, max_ids: int) -> dict[str, type[BaseModel]]:
    """The request bodies of an app over ``rec``, with its limits in their JSON schema: ``k`` in
    1..``rec.max_k``, 1..``max_ids`` ids per list, the attributes the model reads. The handlers (and
    the recommender) enforce the same limits with messages that say what to change."""
    ids = {"minItems": 1, "maxItems": max_ids}
    k_range = {"minimum": 1, "maximum": rec.max_k}
    Attributes = attributes_model(rec)
    reads_attributes = bool(Attributes.model_fields)
    history_limits = {"maxItems": max_ids} if reads_attributes else ids
    # With attribute columns, a new user may be described by attributes alone.
    either = {"anyOf": [{"properties": {"history": {"minItems": 1}}},
                        {"required": ["attributes"], "properties": {"attributes": {"type": "object", "minProperties": 1}}}]}

    class HistoryRequest(StrictBody):
        model_config = ConfigDict(json_schema_extra=either if reads_attributes else None)
        history: list[Id] = Field(description="item ids the new user interacted with, oldest first"
                                  + (" (may be empty when attributes are given)" if reads_attributes else ""),
                                  json_schema_extra=history_limits)
        k: JsonInt = Field(10, json_schema_extra=k_range)
        exclude_seen: bool = Field(True, description="leave the history's items out")
        attributes: Attributes | None = Field(  # type: ignore[valid-type]
            None, description="optional user attributes: the user-table columns the model reads, e.g. {\"age\": 34}")
        exclude_categories: list[str] | None = Field(None, description="item categories never returned, e.g. [\"Horror\"]",
                                                     json_schema_extra={"maxItems": max_ids, "items": category_schema(rec)})
        exclude_items: list[Id] | None = Field(None, description="item ids never returned", json_schema_extra={"maxItems": max_ids})
        include_items: list[Id] | None = Field(None, description="when given, only these item ids may be returned",
                                               json_schema_extra=ids)
        boost: dict[str, float] | None = Field(None, description="category -> factor >= 0, e.g. {\"New\": 1.5}: the "
                                               "category's items become that many times as likely (score + ln factor)",
                                               json_schema_extra={"propertyNames": category_schema(rec),
                                                                  "additionalProperties": {"type": "number", "minimum": 0, "maximum": MAX_ABS_VALUE}})
        boost_items: dict[str, float] | None = Field(None, description="item id -> factor >= 0, as boost",
                                                     json_schema_extra={"additionalProperties": {"type": "number", "minimum": 0, "maximum": MAX_ABS_VALUE}})

    class LookalikeRequest(StrictBody):
        seed_user_ids: list[Id] = Field(json_schema_extra=ids)
        k: JsonInt = Field(100, json_schema_extra=k_range)
        exclude_seeds: bool = True
        method: Literal["centroid", "neighbours", "contrast"] = "contrast"

    class PropensityRequest(StrictBody):
        user_ids: list[Id] = Field(json_schema_extra=ids)

    class UpliftRequest(StrictBody):
        user_ids: list[Id] = Field(description="known user ids", json_schema_extra=ids)

    class ErasureRequest(StrictBody):
        # a blank id is refused by the erasure itself (422 invalid_user_id): the schema says so
        user_ids: list[Id] = Field(description="raw user ids to forget (right to be forgotten)", json_schema_extra={
            **ids, "items": {"anyOf": [{"type": "string", "pattern": "\\S"}, {"type": "integer"}]}})

    class EventsRequest(StrictBody):
        events: list[Any] = Field(description="events like the rows of a training log: {\"user_id\", \"item_id\", "
                                              "\"timestamp\"?, \"event_type\"?, \"value\"?, \"event_id\"?}; an event "
                                              "that is not such an object is counted as malformed_row",
                                  json_schema_extra={"maxItems": max_ids})

    return {"history": HistoryRequest, "lookalike": LookalikeRequest, "propensity": PropensityRequest,
            "uplift": UpliftRequest, "erasure": ErasureRequest, "events": EventsRequest, "attributes": Attributes}


class UpliftScore(BaseModel):
    user_id: str
    uplift: float = Field(description="how much a contact raises the chance to convert: p_treated - p_control")
    p_control: float = Field(description="calibrated probability of converting without a contact")
    p_treated: float = Field(description="calibrated probability of converting when contacted")


class UpliftList(BaseModel):
    users: list[UpliftScore]


class IngestAnswer(BaseModel):
    accepted: int = Field(description="events journaled (on disk) and applied")
    rejected: dict[str, int] = Field(description="events refused, per reason (the training log's cleaning reasons, "
                                                 "unknown_item, duplicate)")
    ignored_fields: list[str] | None = Field(None, description="event fields this API does not know (ignored)")


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
            response = error_response(413, f"request body over {self.max_bytes} bytes", "too_large")
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


class TokenGuard:
    """ASGI middleware: with a token, every HTTP request but ``GET /health`` needs
    ``Authorization: Bearer <token>`` (routes added later, the docs and unknown paths included)."""

    def __init__(self, app, token: str, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.token, self.open_paths = app, token.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in self.open_paths:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.token):
                response = error_response(401, "missing or invalid bearer token", "unauthorized",
                                          headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _manifest_on_disk(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def bundle_loader(path: str | os.PathLike, attempts: int = 3, **load_kwargs) -> Callable[..., Recommender]:
    """A function that loads and verifies the bundle at ``path`` (``Recommender.load(path, **load_kwargs)``),
    or, called with a path, the bundle there with the same settings (erasure checks its new bundle so).

    A new bundle may be published at ``path`` (an export, an erasure, a re-pointed symlink) while it
    is being read; then the files read could come from two bundles. The load is accepted only if the
    manifest at ``path`` afterwards is the one it loaded, and is retried otherwise.
    """
    served = Path(path)

    def load(at: str | os.PathLike | None = None) -> Recommender:
        where = served if at is None else Path(at)
        for _ in range(attempts):
            rec = Recommender.load(where, **load_kwargs)
            if _manifest_on_disk(where) == rec.manifest:
                return rec
        raise BundleError(f"{where}: a new bundle was published there during each of {attempts} loads; reload again")

    return load


def _query_names(dependant) -> set[str]:
    """The query parameters a route (FastAPI ``Dependant``) and its dependencies read."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _items(ranked: Ranked) -> dict:
    return {"items": [{"item_id": i, "score": s} for i, s in ranked]}


RULES_DOC = ("Business rules, applied to every item's score before the top k are taken (k items still come back "
             "while enough are left): items of `exclude_categories` (the bundle's item categories) and "
             "`exclude_items` are never returned; with `include_items` only those may be; a `boost` factor f makes "
             "the items of a category (`boost_items`: an item) f times as likely under the model (the score raised "
             "by ln f; f < 1 lowers it, 0 leaves them out). An unknown category is a 422 naming it; category rules "
             "on a bundle without item categories a 409.")
# a factor of boost / boost_items in a query parameter NAME:FACTOR: a finite number >= 0
FACTOR = r"[0-9]{1,12}(\.[0-9]{0,12})?([eE][+-]?[0-9]{1,2})?"


def category_schema(rec: Recommender) -> dict[str, Any]:
    """JSON schema of one category name of ``rec``'s bundle: its categories as an enum (any text when
    the bundle has none: category rules then answer 409)."""
    names = getattr(getattr(rec, "item_categories", None), "names", None)
    return {"type": "string", "enum": list(names)} if names else {"type": "string"}


def boost_schema(rec: Recommender) -> dict[str, Any]:
    """JSON schema of one ``boost`` query parameter, ``CATEGORY:FACTOR`` with a category of ``rec``'s bundle."""
    names = getattr(getattr(rec, "item_categories", None), "names", None)
    name = "(" + "|".join(re.escape(n) for n in names) + ")" if names else ".+"
    return {"type": "string", "pattern": f"^{name}:{FACTOR}$"}


def _factors(pairs: list[str] | None, key: str) -> dict[str, float] | None:
    """``["New:1.5", ...]`` (query parameters ``NAME:FACTOR``) -> ``{"New": 1.5}``; a malformed pair is
    :class:`InvalidRequestError` naming it."""
    if not pairs:
        return None
    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, factor = pair.rpartition(":")
        try:
            out[name] = float(factor)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise InvalidRequestError(f"{key}={pair!r}: write NAME:FACTOR, e.g. {key}=New:1.5")
    return out


def create_app(recommender: Recommender, token: str | None = None, max_ids: int = 10_000,
               max_body_bytes: int = 1 << 20, faiss_threads: int | None = None, eraser=None,
               reload: Callable[[], Recommender] | None = None, reload_without_token: bool = False,
               events_without_token: bool = False) -> FastAPI:
    """The API app over ``recommender``.

    token: if set, every endpoint but ``/health`` (docs included) needs ``Authorization: Bearer <token>``
    (an int, as Hydra reads ``token=12345``, is taken as its digits).
    max_ids: most ids in one request's list (history, seeds, user ids); max_body_bytes: request size cap.
    faiss_threads: OpenMP threads per FAISS call in the request threads (None: FAISS default).
    ``k`` is bounded by ``recommender.max_k``.
    eraser: a :class:`dmp_dl.privacy.erasure.ErasureService` for ``POST /erase`` (refused with 403
    when no token is set: erasure rewrites the bundle, so it is never open to anonymous callers).
    reload: loads the bundle to switch to, for ``POST /reload`` (e.g. :func:`bundle_loader`);
    refused with 403 when no token is set, unless ``reload_without_token``.
    events_without_token: ``POST /events`` writes what the next training run learns from, so without a
    token it is refused with 403 (error ``token_required``) unless this is true.
    """
    if token is not None:
        from dmp_dl.pipeline.checks import token_from

        token = token_from(token)
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from assets the server itself serves
    # (shipped in the fastapi-offline wheel), so the docs render without internet access.
    app = FastAPIOffline(title="dmp_dl recommender", version=recommender.manifest.get("created_at") or "bundle",
                         description="Recommendations, similar items, lookalike audiences, propensity and segments "
                                     "from a dmp_dl bundle. Every error is a JSON object with `detail` (what is "
                                     "wrong) and `error` (a code).")
    app.state.recommender = recommender
    models = request_models(recommender, max_ids)
    install_error_handlers(app, explain=_explain(models["attributes"]))
    HistoryRequest, LookalikeRequest = models["history"], models["lookalike"]
    PropensityRequest, UpliftRequest, ErasureRequest = models["propensity"], models["uplift"], models["erasure"]
    EventsRequest = models["events"]
    k_query = {"json_schema_extra": {"minimum": 1, "maximum": recommender.max_k}}
    app.state.swap_lock = threading.Lock()  # one bundle swap (reload) at a time
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if token is not None:
        app.add_middleware(TokenGuard, token=token)  # outermost: checked before the body is read
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

    def bounded(ids: list, name: str, empty_ok: bool = False, limit: int | None = None) -> list:
        """``ids`` within the request schema's 1..limit (``empty_ok``: 0..limit; default limit max_ids)."""
        limit = max_ids if limit is None else limit
        if len(ids) > limit:
            raise InvalidRequestError(f"{name} has {len(ids)} ids, at most {limit} per request"
                                      + (" in a query string (POST the body for more)" if limit < max_ids else ""))
        if not ids and not empty_ok:
            raise InvalidRequestError(f"{name} is empty: give at least one id")
        return ids

    def known_query(request: Request) -> None:
        """Refuse query parameters the route does not read (a typo such as ``exlude_seen`` is a 422, not
        a silent default), as the request bodies refuse unknown fields."""
        route = request.scope.get("route")
        if route is None or not request.query_params:
            return
        declared = _query_names(route.dependant)
        unknown = sorted(set(request.query_params) - declared)
        if unknown:
            raise InvalidRequestError(f"unknown query parameter(s) {unknown}; {request.url.path} reads "
                                      f"{sorted(declared) if declared else 'none'}")

    # the bearer dependency declares the security scheme in OpenAPI (TokenGuard enforces it first)
    guarded = [Depends(known_query), *([Depends(authorised)] if token is not None else [])]
    get_errors = error_responses(401, 404, 422)
    post_errors = error_responses(400, 401, 404, 413, 422)
    add_audience_routes(app, current, guarded, max_ids)  # POST /audiences/rule, /audiences/overlap; GET /audiences/columns

    @app.get("/health", response_model=Health)
    def health(request: Request) -> dict:
        """Liveness and what is loaded (no token needed); ``status`` is ``degraded`` while the event
        journal cannot take events or still holds rows of erased users."""
        rec = current(request)
        service = getattr(rec, "_service", None)
        journal = service.journal_health() if service is not None else None
        ok = journal is None or (journal["writable"] and not journal["erased_rows_pending"])
        return {"status": "ok" if ok else "degraded", **rec.info(), "journal": journal}

    # a query string stays short enough for the HTTP server's request-line limit (serve(): 1 MiB):
    # at most query_max values per list parameter of a GET; POST /recommend takes max_ids
    query_max = min(max_ids, QUERY_LIST_MAX)
    id_list = {"json_schema_extra": {"maxItems": query_max}}
    categories = {"json_schema_extra": {"maxItems": query_max, "items": category_schema(recommender)}}
    boosts = {"json_schema_extra": {"maxItems": query_max, "items": boost_schema(recommender)}}
    item_boosts = {"json_schema_extra": {"maxItems": query_max, "items": {"type": "string", "pattern": f"^.+:{FACTOR}$"}}}

    @app.get("/recommend", dependencies=guarded, response_model=ItemList, responses={**get_errors, **error_responses(409)},
             description="Top-k items for a known user, best first.\n\n" + RULES_DOC)
    def recommend(request: Request, user_id: str, k: Annotated[int, Query(**k_query)] = 10, exclude_seen: bool = True,
                  exclude_categories: Annotated[list[str] | None, Query(description="a category never returned (repeat "
                                                                        "the parameter for several)", **categories)] = None,
                  exclude_items: Annotated[list[str] | None, Query(description="an item id never returned", **id_list)] = None,
                  include_items: Annotated[list[str] | None, Query(description="when given, only these item ids may be "
                                                                   "returned", **id_list)] = None,
                  boost: Annotated[list[str] | None, Query(description="CATEGORY:FACTOR, e.g. New:1.5 (factor >= 0)",
                                                           **boosts)] = None,
                  boost_items: Annotated[list[str] | None, Query(description="ITEM_ID:FACTOR, as boost", **item_boosts)] = None,
                  ) -> dict:
        rules = {"exclude_categories": bounded(exclude_categories or [], "exclude_categories", True, query_max),
                 "exclude_items": bounded(exclude_items or [], "exclude_items", True, query_max),
                 "include_items": None if include_items is None else bounded(include_items, "include_items",
                                                                             limit=query_max),
                 "boost": _factors(bounded(boost or [], "boost", True, query_max), "boost"),
                 "boost_items": _factors(bounded(boost_items or [], "boost_items", True, query_max), "boost_items")}
        return _items(current(request).recommend(user_id, k, exclude_seen, **rules))

    @app.post("/recommend", dependencies=guarded, response_model=ItemList, responses={**post_errors, **error_responses(409)},
              description="Top-k items for a new user described by recent items (and optional attributes).\n\n" + RULES_DOC)
    def recommend_for_history(request: Request, body: HistoryRequest) -> dict:
        attributes = None if body.attributes is None else body.attributes.model_dump(by_alias=True, exclude_unset=True)
        rules = {"exclude_categories": bounded(body.exclude_categories or [], "exclude_categories", True),
                 "exclude_items": bounded(body.exclude_items or [], "exclude_items", True),
                 "include_items": None if body.include_items is None else bounded(body.include_items, "include_items"),
                 "boost": body.boost, "boost_items": body.boost_items}
        return _items(current(request).recommend_for_history(bounded(body.history, "history", empty_ok=True), body.k,
                                                             body.exclude_seen, attributes, **rules))

    @app.get("/similar-items", dependencies=guarded, response_model=ItemList, responses=get_errors)
    def similar_items(request: Request, item_id: str, k: Annotated[int, Query(**k_query)] = 10) -> dict:
        """Top-k items most like ``item_id`` (itself excluded)."""
        return _items(current(request).similar_items(item_id, k))

    @app.post("/lookalike", dependencies=guarded, response_model=UserList, responses=post_errors)
    def lookalike(request: Request, body: LookalikeRequest) -> dict:
        """The k users most like the seed users (audience expansion)."""
        ranked = current(request).lookalike(bounded(body.seed_user_ids, "seed_user_ids"), body.k, body.exclude_seeds, body.method)
        return {"users": [{"user_id": u, "score": s} for u, s in ranked]}

    @app.post("/propensity", dependencies=guarded, response_model=UserList, responses={
        **post_errors, 409: {"model": ErrorBody, "description": "The bundle has no propensity model (error `unavailable`); "
                             "`detail` says why: trained with propensity.enabled=false, or enabled and skipped (or "
                             "failed) in the training run, with the reason the run recorded (e.g. too few positives)."}})
    def propensity(request: Request, body: PropensityRequest) -> dict:
        """Purchase propensity of known users, in the order given."""
        ids = bounded(body.user_ids, "user_ids")
        return {"users": [{"user_id": str(u), "score": s} for u, s in zip(ids, current(request).propensity(ids))]}

    @app.post("/uplift", dependencies=guarded, response_model=UpliftList, responses={**post_errors, **error_responses(409)})
    def uplift(request: Request, body: UpliftRequest) -> dict:
        """Uplift of known users, in the order given: how much a contact raises each one's chance to
        convert, with both calibrated probabilities (a bundle with an uplift model; 409 otherwise,
        and 409 for a user who is new since the bundle was trained, known from real-time events only)."""
        ids = bounded(body.user_ids, "user_ids")
        scores = current(request).uplift(ids)
        return {"users": [{"user_id": str(u), **s} for u, s in zip(ids, scores)]}

    @app.get("/profile", dependencies=guarded, response_model=Profile, responses={**get_errors, **error_responses(409)})
    def profile(request: Request, user_id: str, top: Annotated[int | None, Query(**k_query)] = None) -> dict:
        """A known user's interest profile (top categories with time-decayed weights, event-type
        affinities) and segment."""
        return current(request).profile(user_id, top)

    @app.get("/segments", dependencies=guarded, response_model=SegmentList,
             responses=error_responses(401, 409, 422))
    def segments(request: Request, representatives: Annotated[int, Query(ge=0, le=100)] = 5) -> dict:
        """Every segment's description: label, size, top interest categories with their lift, mean
        propensity, over-represented attribute values and the users nearest its centre."""
        from dmp_dl.audience.segments import segment_label

        described = current(request).segments(representatives)
        return {"k": len(described), "segments": [{**d, "label": segment_label(d)} for d in described]}

    @app.post("/events", dependencies=guarded, response_model=IngestAnswer, response_model_exclude_none=True,
              responses={**error_responses(400, 401, 413, 422),
                         403: {"model": ErrorBody, "description": "The server has no token (error `token_required`): "
                               "events feed the next training run, so they need `Authorization: Bearer <token>` of a "
                               "server started with token=... (or $DMP_SERVE_TOKEN); a server nobody else can reach "
                               "may take them without one with events_without_token=true."},
                         409: {"model": ErrorBody, "description": "Real-time events are off on this server (error "
                               "`unavailable`), or the event journal cannot be written (error `journal_unavailable`: "
                               "nothing of the batch was accepted; send it again later)."}})
    def events(request: Request, body: EventsRequest) -> dict:
        """Real-time events: cleaned like a training log, journaled to disk, then applied at once to
        the users' history, vector, profile, segment and propensity. Answers how many were accepted
        and how many were refused, per reason. Needs the bearer token: a server without one answers
        403 (``token_required``) unless started with ``events_without_token=true``."""
        from dmp_dl.realtime.service import JournalError

        if token is None and not events_without_token:
            return error_response(403, "POST /events needs an authenticated server (its events enter the next "
                                       "training run): start serve.py with token=... (or $DMP_SERVE_TOKEN) and send "
                                       "Authorization: Bearer <token>, or accept events without a token with "
                                       "events_without_token=true", "token_required")
        rec = current(request)
        if not hasattr(rec, "ingest"):
            raise MissingPartError("real-time events are off on this server (start serve.py with realtime.enabled=true)")
        try:
            return rec.ingest(bounded(body.events, "events", empty_ok=True))
        except JournalError as exc:
            return error_response(409, str(exc), "journal_unavailable", headers={"Retry-After": "1"})

    @app.post("/reload", dependencies=guarded, responses=error_responses(401, 403, 409, 413))
    def reload_bundle(request: Request) -> dict:
        """Switch to the bundle now published at the served path: load and verify all of it, then
        swap. Requests in flight finish on the bundle they started with; a bad bundle is refused
        (409, naming the file) and the current one keeps serving."""
        if token is None and not reload_without_token:
            raise HTTPException(403, "reload needs an authenticated server: start serve.py with token=... "
                                     "(or allow it with reload_without_token=true)")
        if reload is None:
            raise HTTPException(409, "reload is not available on this server (no bundle path to load from)")
        with request.app.state.swap_lock:
            previous = request.app.state.recommender
            try:
                fresh = reload()
            except (DmpError, OSError) as exc:  # OSError: the bundle changed or vanished while read
                log.warning("reload refused, still serving the bundle created at %s: %s",
                            previous.manifest.get("created_at"), exc)
                return error_response(409, str(exc), "bad_bundle")
            request.app.state.recommender = fresh
        log.info("reloaded: now serving the bundle created at %s", fresh.manifest.get("created_at"))
        return {"status": "reloaded", "previous_created_at": previous.manifest.get("created_at"), **fresh.info()}

    @app.post("/erase", dependencies=guarded, responses={
        **post_errors, **error_responses(403),
        409: {"model": ErrorBody, "description": "Nothing was changed: the bundle, erasure list, audit log or a folder "
              "cannot be used (error `bad_bundle`, `bad_erasure_list`, `not_writable`, `no_secret`, `erasure_failed`); "
              "or the erasure was recorded but something after it failed, and the users are not served all the same "
              "(error `journal_not_rewritten`: their event-journal rows are removed by the next start or reload; "
              "`reload_failed`: the new bundle could not be switched to; `erasure_failed` saying to run forget again)."}})
    def erase(request: Request, body: ErasureRequest) -> dict:
        """Forget users: remove them from the bundle, add them to the erasure list, audit it, and serve
        the new bundle. Needs the bearer token; answers counts and paths, never the ids.

        All or nothing: a malformed id is a 422, a bundle, erasure list, audit log or folder that
        cannot be used a 409 (``error`` says which), and then nothing was changed and the bundle
        served is the one on disk. Once the erasure is recorded, the users are never served again:
        a real-time server stops serving them before it rewrites any file."""
        if token is None:
            raise HTTPException(403, "erasure needs an authenticated server: start serve.py with token=... "
                                     "(or $DMP_SERVE_TOKEN)")
        if eraser is None:
            raise HTTPException(409, "erasure is not available on this server (no bundle directory to rewrite)")
        from dmp_dl.privacy.erasure import ErasureError

        ids = bounded(body.user_ids, "user_ids")
        with request.app.state.swap_lock:  # not interleaved with a reload
            try:
                summary, fresh = eraser.forget(ids)
            except ErasureError as exc:
                if exc.fresh is not None:  # recorded, but the bundle was not replaced: serve it without them anyway
                    request.app.state.recommender = exc.fresh
                log.warning("erasure refused (%s): %s", exc.code, exc)
                return error_response(exc.status, str(exc), exc.code)
            except (DmpError, OSError) as exc:
                log.warning("erasure failed: %s", exc)
                return error_response(409, str(exc) if isinstance(exc, DmpError) else f"erasure failed: {exc}",
                                      "erasure_failed")
            if fresh is not None:
                request.app.state.recommender = fresh
        return summary

    return app


def serve(cfg) -> None:
    """Load ``cfg.artifacts`` and serve it with uvicorn (``conf/serve.yaml``)."""
    import uvicorn

    from dmp_dl.pipeline.checks import check_serve_config, token_from
    from dmp_dl.store.bundle import remove_stale_temporaries

    token = check_serve_config(cfg)  # every setting (port, limits, token), before the bundle is read
    if token is None and cfg.get("token_env"):
        token = token_from(os.environ.get(str(cfg.token_env), ""), f"${cfg.token_env}")
    threads = int(cfg.faiss_threads) if cfg.get("faiss_threads") else None
    remove_stale_temporaries(cfg.artifacts)  # what a killed export or erasure left beside the bundle
    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    load = bundle_loader(cfg.artifacts, max_k=int(cfg.max_k), search_params=cfg.get("search_params"))
    realtime = None
    # the real-time and erasure services (and what they import) load only when they are used
    from dmp_dl.realtime.service import RealtimeOptions

    options = RealtimeOptions.from_config(cfg.get("realtime"))
    if options.enabled:  # POST /events; every load (start, reload, erasure) replays the journal
        from dmp_dl.realtime.service import RealtimeService, check_journal_place, default_journal_dir

        realtime = RealtimeService(cfg.get("journal") or default_journal_dir(cfg.artifacts), options)
        check_journal_place(realtime.journal_dir, cfg.artifacts)
        load_bundle = load

        def load(at=None) -> Recommender:  # at: a bundle erasure checks before publishing it (no replay)
            rec = load_bundle(at)
            return rec if at is not None else realtime.attach(rec, cfg.artifacts)
    rec = load()
    info = rec.info()
    log.info("loaded %s: %d users, %d items, item index %s", cfg.artifacts, info["users"], info["items"],
             info["indexes"].get("items", {}).get("factory"))
    if token is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who can reach the port can query it "
                    "(set token=... or $%s)", cfg.host, cfg.get("token_env"))
    from dmp_dl.privacy.erasure import ErasureService

    eraser = ErasureService(cfg.artifacts, load)
    if realtime is not None:
        from dmp_dl.realtime.service import RealtimeEraser

        eraser = RealtimeEraser(eraser, realtime, cfg.artifacts)
        realtime.start()
        log.info("real-time events: journal %s", realtime.journal_dir)
    app = create_app(rec, token=token, max_ids=int(cfg.max_ids), max_body_bytes=int(cfg.max_body_bytes),
                     faiss_threads=threads, eraser=eraser, reload=load,
                     reload_without_token=bool(cfg.get("reload_without_token", False)),
                     events_without_token=bool(cfg.get("events_without_token", False)))
    if rec.pseudonymizer is not None:  # raw user ids travel in query strings: keep them out of the access log
        from dmp_dl.privacy.redact import redact_access_log_queries

        redact_access_log_queries()
    with MemoryWatch(subject="server", advice=SERVER_ADVICE):  # a line in its log before the system may kill it
        uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.get("log_level", "info"),
                    timeout_keep_alive=int(cfg.get("timeout_keep_alive", 5)),
                    h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
