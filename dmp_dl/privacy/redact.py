"""Keeping raw user ids out of the HTTP access log of a server over a pseudonymised bundle."""

from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"


class QueryStringRedactor(logging.Filter):
    """Drops the query string (``?user_id=...``) from uvicorn access-log records.

    uvicorn logs ``(client, method, path with query, http version, status)``; the path keeps its
    route, the query becomes ``?<redacted>``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True


def redact_access_log_queries() -> None:
    """Install :class:`QueryStringRedactor` on uvicorn's access logger (once)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, QueryStringRedactor) for f in logger.filters):
        logger.addFilter(QueryStringRedactor())
