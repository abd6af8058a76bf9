"""The rule-audience endpoints of the HTTP API (registered by :func:`add_audience_routes`).

* ``POST /audiences/rule``: the size and share of the users a rule selects (and up to ``ids`` of
  their ids), a preview that writes nothing;
* ``POST /audiences/overlap``: sizes, pairwise intersections and Jaccard indexes of 2..20 audiences
  (rules, segments, lists of user ids);
* ``GET /audiences/columns``: the columns rules can read on the loaded bundle.

A rule that cannot be read (a syntax error, an unknown column, a text compared with a number)
answers 422 with error ``invalid_rule`` and a ``detail`` naming the position or the column (and the
columns there are); nothing in a rule is executed (:mod:`dmp_dl.audience.rule`).
"""

from collections.abc import Callable
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from dmp_dl.api.http_errors import ApiError, ErrorBody, error_responses
from dmp_dl.api.json_types import JsonInt
from dmp_dl.audience.rule import MAX_RULE_CHARS, RuleError
from dmp_dl.audience.rule_audience import MAX_AUDIENCES, overlap_job, rule_members
from dmp_dl.audience.user_columns import columns_of

RULE_ERROR = {422: {"model": ErrorBody, "description": "A rule that cannot be read: a syntax error (the position), an "
                    "unknown or unavailable column (named, with the columns there are), a text compared with a "
                    "number (error `invalid_rule`); or another field out of range (error `invalid_request`)."}}
# format: the rule language (README "Rule audiences"), which JSON Schema cannot express
RuleText = Annotated[str, Field(min_length=1, max_length=MAX_RULE_CHARS, json_schema_extra={"format": "audience-rule"},
                                description="e.g. \"interest.Horror > 0.2 and recency_days <= 90 and propensity > 0.3\"")]


class RuleAnswer(BaseModel):
    rule: str
    columns: list[str] = Field(description="the columns the rule reads")
    users: int = Field(description="users the rule selects")
    share: float = Field(description="their share of the bundle's users")
    bundle_users: int
    by_segment: dict[str, int] | None = Field(None, description="users per segment (bundles with segments)")
    user_ids: list[str] | None = Field(None, description="the first `ids` members, in the bundle's user order")


class AudienceInfo(BaseModel):
    name: str
    kind: str = Field(description="rule, segment or user_ids")
    users: int
    share: float
    rule: str | None = None
    segment: int | None = None
    given: int | None = Field(None, description="user_ids: ids given")
    unknown_ids: int | None = Field(None, description="user_ids: ids the bundle does not know (not counted)")


class OverlapPair(BaseModel):
    a: str
    b: str
    size_a: int
    size_b: int
    intersection: int
    union: int
    jaccard: float = Field(description="|a ∩ b| / |a ∪ b| (0 when both are empty)")
    share_of_a: float = Field(description="|a ∩ b| / |a|")
    share_of_b: float = Field(description="|a ∩ b| / |b|")


class OverlapAnswer(BaseModel):
    bundle_users: int
    audiences: list[AudienceInfo]
    sizes: dict[str, int]
    pairs: list[OverlapPair] = Field(description="one per pair of audiences")
    intersection: dict[str, dict[str, int]] = Field(description="the intersection of every two audiences (the "
                                                                "diagonal: each audience's size)")


def add_audience_routes(app: FastAPI, current: Callable[[Request], object], dependencies: list, max_ids: int) -> None:
    """Register the endpoints on ``app``: ``current(request)`` gives the served recommender,
    ``dependencies`` are the routes' guards (token, unknown query parameters), ``max_ids`` the most
    ids one request may send or receive."""
    strict = ConfigDict(strict=True, extra="forbid")

    class RuleRequest(BaseModel):
        model_config = strict
        rule: RuleText
        ids: JsonInt = Field(0, ge=0, le=max_ids, description="also answer up to this many member ids (0: the size only)")

    class RuleSpec(BaseModel):
        model_config = strict
        rule: RuleText

    class SegmentSpec(BaseModel):
        model_config = strict
        segment: JsonInt = Field(ge=0, description="a segment of the bundle (404 for one it does not have)")

    class IdsSpec(BaseModel):
        model_config = strict
        user_ids: list[str | JsonInt] = Field(min_length=1, max_length=max_ids,
                                              description="a list of user ids (those the bundle does not know are counted)")

    class OverlapRequest(BaseModel):
        model_config = strict
        audiences: dict[str, RuleSpec | SegmentSpec | IdsSpec] = Field(
            description="name -> {\"rule\": ...} | {\"segment\": n} | {\"user_ids\": [...]}",
            json_schema_extra={"minProperties": 2, "maxProperties": MAX_AUDIENCES})

    @app.post("/audiences/rule", dependencies=dependencies, response_model=RuleAnswer, response_model_exclude_none=True,
              responses={**error_responses(400, 401, 413), **RULE_ERROR})
    def rule_audience(request: Request, body: RuleRequest) -> dict:
        """The size and share of the users a rule selects over the bundle's columns (interest
        shares, event-type affinities, segment, propensity, activity, CRM attributes), and with
        ``ids`` > 0 up to that many of their ids. Nothing is written."""
        rec = current(request)
        try:
            rule, members = rule_members(rec, body.rule)
        except RuleError as exc:
            raise ApiError(422, str(exc), "invalid_rule") from None
        columns = columns_of(rec)
        answer = {"rule": body.rule, "columns": [columns.resolve(n) for n in rule.columns], "users": int(members.sum()),
                  "share": float(members.sum() / max(rec.n_users, 1)), "bundle_users": int(rec.n_users)}
        if rec.stored_segments is not None:
            seg = rec.stored_segments
            answer["by_segment"] = {str(s): int(n) for s, n in enumerate(np.bincount(seg.assignments[members], minlength=seg.k))}
        if body.ids:
            answer["user_ids"] = [str(u) for u in rec.user_vocab.ids[np.flatnonzero(members)[: body.ids]]]
        return answer

    @app.post("/audiences/overlap", dependencies=dependencies, response_model=OverlapAnswer,
              response_model_exclude_none=True, responses={**error_responses(400, 401, 404, 409, 413), **RULE_ERROR})
    def audience_overlap(request: Request, body: OverlapRequest) -> dict:
        """Sizes of 2..20 audiences (rules, segments, lists of user ids), and for every pair the
        intersection, union and Jaccard index. A segment the bundle does not have answers 404, a
        bundle without segments 409."""
        if not 2 <= len(body.audiences) <= MAX_AUDIENCES:
            raise ApiError(422, f"audiences: give 2 to {MAX_AUDIENCES} named audiences, got {len(body.audiences)}")
        specs = {name: spec.model_dump(exclude_none=True) for name, spec in body.audiences.items()}
        try:
            return overlap_job(current(request), specs)[1]
        except RuleError as exc:
            raise ApiError(422, str(exc), "invalid_rule") from None

    @app.get("/audiences/columns", dependencies=dependencies, response_model=dict[str, list[str]],
             responses=error_responses(401, 422))
    def audience_columns(request: Request) -> dict:
        """The columns rules can read on the loaded bundle, by family (scores, activity, interest,
        event, attr)."""
        return columns_of(current(request)).names()
