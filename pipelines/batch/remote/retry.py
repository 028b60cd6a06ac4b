"""Retries of what a server's failure a later attempt may not meet: a PACS restarted at 2 a.m., a
busy archive, a link that drops a connection. One policy for DICOMweb (``requests``) and DIMSE
(pynetdicom): the batch job's study discovery, fetches and pushes go through
:meth:`RetryPolicy.call`; what counts as transient is :func:`is_transient` (the list is in
docs/how-to/pacs.md).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import requests

__all__ = ["TRANSIENT_HTTP_STATUSES", "RetriesExhaustedError", "RetryPolicy", "TransientError", "is_transient",
           "parse_retry_after", "retry_after"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 502, 503, 504})


class TransientError(ValueError):
    """A peer's failure that a later attempt may not meet: an association aborted, rejected as
    transient or not answered; an out-of-resources status; a series that arrived incomplete. The
    message names the peer and what happened.

    Attributes:
        reason: what happened, without a patient, study or path in it (for the log).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RetriesExhaustedError(ValueError):
    """A transient failure that outlasted every retry: its message with how many were made; chained
    to the last failure."""


def _chain(exc: BaseException | None):
    """``exc`` and the errors it was raised from (``raise ... from``), outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def is_transient(exc: BaseException) -> bool:
    """Whether a later attempt may succeed where ``exc`` failed: the first of ``exc`` and the errors it
    was raised from that tells decides. Transient: :class:`TransientError`; an HTTP status of
    :data:`TRANSIENT_HTTP_STATUSES`; a connection refused, reset or broken, a timeout (``requests``'
    and the built-in ones). Anything else is permanent: another HTTP status (404, 400, 401, 403, 500),
    a TLS failure, an association rejected as permanent, a disk error, a bug."""
    for link in _chain(exc):
        if isinstance(link, RetriesExhaustedError):
            return False
        if isinstance(link, TransientError):
            return True
        if isinstance(link, requests.HTTPError):
            return link.response is not None and link.response.status_code in TRANSIENT_HTTP_STATUSES
        if isinstance(link, requests.exceptions.SSLError):
            return False
        if isinstance(link, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError):
            return True
        if isinstance(link, ConnectionError | TimeoutError):  # refused, reset, aborted, broken pipe
            return True
    return False


def _reason(exc: BaseException) -> str:
    """What failed, for the log: the kind of error, never its text (which names studies and paths)."""
    for link in _chain(exc):
        if isinstance(link, TransientError):
            return link.reason
        if isinstance(link, requests.HTTPError) and link.response is not None:
            return f"HTTP {link.response.status_code}"
        if isinstance(link, requests.RequestException | ConnectionError | TimeoutError):
            return type(link).__name__
    return type(exc).__name__


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value: delay seconds (``"120"``) or an HTTP date
    (``"Wed, 21 Oct 2026 07:28:00 GMT"``, 0 once past); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_after(exc: BaseException) -> float | None:
    """The wait an HTTP error's ``Retry-After`` asks for (:func:`parse_retry_after`), else None."""
    for link in _chain(exc):
        if isinstance(link, requests.HTTPError) and link.response is not None:
            return parse_retry_after(link.response.headers.get("Retry-After"))
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and after how long, a transient failure (:func:`is_transient`) is tried again:
    exponential backoff with full jitter. Before retry ``n`` (1 for the first) it waits a random time
    between 0 and ``min(max_wait, wait * 2 ** (n - 1))``; an HTTP ``Retry-After`` replaces that
    draw, up to ``max_wait``. Jitter keeps the batch job's loader processes, and other clients of a
    PACS that comes back, from knocking all at once.

    The defaults ride out a PACS restart of 30 to 60 s: the 7 waits are drawn below 2, 4, ..., 64
    capped at 60 s (182 s at most), 91 s in all on average, so all 7 retries end within 30 s once in
    a hundred runs, within 60 s about one in seven (200,000 simulated runs of the 7 draws). Four
    retries would wait 15 s on average and never 30 s. The price is paid by a peer gone for good: each case it fails waits about 1.5 min before
    failing (every wait between its attempts, not counting the attempts: a refused connection fails
    at once, a peer that does not answer after its timeout).

    Args:
        retries: retries after the first attempt (0: none).
        wait: the longest wait before the first retry, in seconds; doubled for each retry after it.
        max_wait: the longest wait before any retry, in seconds.
        rng: the random source of the jitter (a seeded ``random.Random`` reproduces the waits);
            None: the ``random`` module's, seeded per process (torch seeds it in each loader worker).
    """

    retries: int = 7
    wait: float = 2.0
    max_wait: float = 60.0
    rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"`retries` must be an integer >= 0, got {self.retries!r}")
        for name in ("wait", "max_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"`{name}` must be a number of seconds >= 0, got {value!r}")

    def backoff(self, retry: int) -> float:
        """The jittered wait before retry ``retry`` (1 for the first), in seconds."""
        if retry < 1:
            raise ValueError(f"`retry` must be >= 1, got {retry}")
        ceiling = min(self.max_wait, self.wait * 2.0 ** min(retry - 1, 64))
        return (self.rng or random).uniform(0.0, ceiling)

    def delay(self, retry: int, exc: BaseException) -> float:
        """The wait before retry ``retry`` after ``exc``: its ``Retry-After`` up to ``max_wait``, else
        :meth:`backoff`."""
        asked = retry_after(exc)
        return min(self.max_wait, asked) if asked is not None else self.backoff(retry)

    def call(self, attempt: Callable[[], T], step: str, case_id: str | None = None,
             counts: MutableMapping[str, int] | None = None) -> T:
        """``attempt()``, tried again after a wait while it raises a transient error, ``retries`` times
        at most. Each retry is counted in ``counts[step]`` and logged at INFO with the case id and the
        kind of failure only (``case-1a2b3c4d5e6f: fetch failed (HTTP 503); retry 1 of 7 in 1.3 s``):
        the error's text can name a study or a path.

        Raises:
            RetriesExhaustedError: the last attempt failed transiently too (retries > 0).
            Exception: what ``attempt`` raised, at once when permanent (or transient with no retries).
        """
        where = f"{case_id}: {step}" if case_id else step
        retry = 0
        while True:
            try:
                return attempt()
            except Exception as exc:
                if not is_transient(exc) or self.retries == 0:
                    raise
                if retry == self.retries:
                    logger.info("%s failed (%s); gave up after %s", where, _reason(exc), _retries(retry))
                    raise RetriesExhaustedError(f"{exc} (gave up after {_retries(retry)})") from exc
                retry += 1
                wait = self.delay(retry, exc)
                logger.info("%s failed (%s); retry %d of %d in %.1f s", where, _reason(exc), retry, self.retries, wait)
                if counts is not None:
                    counts[step] = counts.get(step, 0) + 1
                time.sleep(wait)


def _retries(count: int) -> str:
    return f"{count} retry" if count == 1 else f"{count} retries"
