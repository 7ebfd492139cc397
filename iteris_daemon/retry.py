"""Retrying Hub calls: which failures are worth another try, and how long to wait.

The Hub client retries some calls itself (listings, downloads) and not others
(``model_info``, commits, refs); in the daemon (:func:`bound_requests`) it answers a 429,
408 or 5xx at once. Every Hub call of the daemon goes through :func:`hub_retrying`, which
retries rate limits (429, honouring ``Retry-After`` or the ``RateLimit`` reset), server
errors (5xx) and transport failures (dropped connections, timeouts) with exponential
backoff, and nothing else: a 401/404 will not get better by waiting.

Given the daemon's stop event, a retry stops with the daemon: no attempt starts
once it is set (:class:`Interrupted` is raised instead), a backoff wait ends the
moment it is set, and a failure while it is set is not retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpx2
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tenacity import (RetryCallState, Retrying, retry_if_exception, sleep_using_event, stop_after_attempt,
                      stop_when_event_set)

log = logging.getLogger(__name__)


_bound: list[float] = []  # the timeout bound_requests last set
# Within `requests_bounded` (a source's poll): each read's timeout, and whether to stop
_this_poll: ContextVar[tuple[float, Callable[[], bool]] | None] = ContextVar("hub_poll_bounds", default=None)


def bound_requests(seconds: float) -> None:
    """Give this process's Hub requests a timeout: ``seconds`` to connect, and at most that
    long without a byte read or written. huggingface_hub's client has none, and commits,
    tags and repo creation take no timeout argument, so a Hub that stopped answering held a
    publish (and with it the group's claim and the daemon's stop) for ever. A request that
    passes its own timeout (the sources' do) keeps it; one that gives up is a transport
    error, which :func:`hub_retrying` retries. Setting the same value again changes nothing
    (a new client would close the one in-flight requests use)."""
    from huggingface_hub.utils import get_session, set_client_factory

    if _bound == [seconds]:
        return
    hooks = get_session().event_hooks  # the client's own (offline mode, request ids), kept
    requests = [hook for hook in hooks.get("request", []) if hook is not _within_poll_bounds]  # a reload's
    responses = [hook for hook in hooks.get("response", []) if hook is not _answer_retryable_at_once]
    hooks = {**hooks, "request": [*requests, _within_poll_bounds], "response": [*responses, _answer_retryable_at_once]}

    def client() -> httpx2.Client:
        return httpx2.Client(event_hooks=hooks, follow_redirects=True, timeout=httpx2.Timeout(seconds))

    set_client_factory(client)
    _bound[:] = [seconds]


@contextmanager
def requests_bounded(timeout: float, stopping: Callable[[], bool]) -> Iterator[None]:
    """Within it, this thread's Hub requests (under :func:`bound_requests`) wait at most
    ``timeout`` for a connection and for each read, and none is sent once ``stopping()``
    (:class:`Interrupted`). A download's GET takes the client's ``HF_HUB_DOWNLOAD_TIMEOUT``
    whatever a source says, and the client resumes a stalled one 5 times on its own: a stop
    waited out all six (a minute at the client's 10 s), and a poll held its repo for minutes."""
    token = _this_poll.set((timeout, stopping))
    try:
        yield
    finally:
        _this_poll.reset(token)


def _within_poll_bounds(request: httpx2.Request) -> None:
    """The request hook of :func:`requests_bounded`."""
    bounds = _this_poll.get()
    if bounds is None:
        return
    timeout, stopping = bounds
    if stopping():
        raise Interrupted(f"{request.method} {request.url.path}: not sent, the daemon is stopping")
    given = request.extensions.get("timeout") or {}
    request.extensions = {**request.extensions, "timeout": {
        phase: timeout if seconds is None else min(seconds, timeout)
        for phase, seconds in {"connect": None, "read": None, "write": None, "pool": None, **given}.items()}}


def _answer_retryable_at_once(response: httpx2.Response) -> None:
    """A 429, 408 or 5xx raised as the client's typed error, not retried inside the client:
    its own retry sleeps ``Retry-After`` + 1 s (up to 5 times, an hour each if the Hub says
    so) where no stop reaches it and ``retry_cap_seconds`` does not apply; a daemon told to
    stop went on for as long. :func:`hub_retrying`, around every Hub call of the daemon,
    retries it instead."""
    from huggingface_hub.utils import hf_raise_for_status

    if _retryable_status(response.status_code):
        response.read()  # a streamed download's error: its (small) body names the problem
        hf_raise_for_status(response)


class Interrupted(Exception):
    """The daemon is stopping: the operation was given up without another attempt."""


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _retryable_status(status: int | None) -> bool:
    return status is not None and (status == 429 or status == 408 or status >= 500)


def hub_failure(exc: BaseException) -> BaseException:
    """The failure behind ``exc``: huggingface_hub reports a file's failed HEAD (5xx, 429, a
    timeout, a dropped connection) as LocalEntryNotFoundError (a FileNotFoundError, not the
    Hub's answer), and a failed LFS upload as RuntimeError, raised from it."""
    if isinstance(exc, (LocalEntryNotFoundError, RuntimeError)) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def is_transient(exc: BaseException) -> bool:
    """True for failures that another attempt may not meet."""
    exc = hub_failure(exc)
    if isinstance(exc, httpx2.TransportError):
        return True
    return isinstance(exc, HfHubHTTPError) and _retryable_status(_status(exc))


def _retry_after(exc: BaseException | None) -> float | None:
    """The wait a 429 asks for: ``Retry-After`` seconds, or the reset of the Hub's
    ``RateLimit: "api";r=0;t=N`` header."""
    from huggingface_hub.utils import parse_ratelimit_headers

    exc = hub_failure(exc) if exc is not None else None
    if exc is None or _status(exc) != 429:
        return None
    headers = exc.response.headers  # type: ignore[union-attr]
    try:
        return float(headers["Retry-After"])
    except (KeyError, TypeError, ValueError):
        pass
    limit = parse_ratelimit_headers(headers)
    return float(limit.reset_in_seconds) if limit is not None and limit.remaining == 0 else None


class _Backoff:
    """``base * 2**n`` capped at ``cap``; a 429's Retry-After wins (also capped)."""

    def __init__(self, base: float, cap: float):
        self.base, self.cap = base, cap

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = _retry_after(exc)
        delay = hinted if hinted is not None else self.base * 2 ** (state.attempt_number - 1)
        return max(0.0, min(delay, self.cap))


def _log_retry(what: str, failures: list[BaseException]):
    """Log each retry, and keep its failure in ``failures`` (see :func:`_refuse_once_set`)."""
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        failures[:] = [exc] if exc is not None else []
        status = _status(hub_failure(exc)) if exc else None
        reason = f"HTTP {status}" if status else type(exc).__name__
        # INFO: the caller says the failure that outlasts the retries (a Hub down for a week said
        # five WARNINGs per repo and poll before its ERROR)
        log.info("%s: %s, retry %d in %.1fs", what, reason, state.attempt_number, state.next_action.sleep)
    return before_sleep


def _refuse_once_set(stopping: threading.Event, what: str, failures: list[BaseException]):
    """No attempt once ``stopping`` is set: the failure whose backoff wait the stop ended is
    raised (a 429 is the error, not the stop), else :class:`Interrupted`. Whether the stop came
    before tenacity's stop check or during the wait after it was a race."""
    def before(state: RetryCallState) -> None:
        if state.attempt_number == 1:
            failures.clear()  # a new call of the same Retrying
        if stopping.is_set():
            if failures:
                raise failures[-1]
            raise Interrupted(f"{what}: not attempted, the daemon is stopping")
    return before


class _Polled:
    """A stop given as a callable (a calibration source's ``options.should_stop``) as the
    event tenacity waits on: looked at every 0.2 s of a backoff wait."""

    def __init__(self, flag: Callable[[], bool]):
        self.flag = flag

    def is_set(self) -> bool:
        return self.flag()

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.flag() and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.2, left))
        return self.flag()


def hub_retrying(what: str, attempts: int = 6, base_seconds: float = 1.0, cap_seconds: float = 60.0,
                 stopping: threading.Event | Callable[[], bool] | None = None) -> Retrying:
    """A tenacity ``Retrying`` for one Hub operation, e.g. ``hub_retrying("model_info a/b")(api.model_info, "a/b")``.

    ``stopping`` (the daemon's stop event, or a callable saying whether to stop): once set, no
    attempt starts (:class:`Interrupted`), a backoff wait ends at once, and the last failure
    is raised instead of being retried."""
    stop = stop_after_attempt(attempts)
    more = {}
    failures: list[BaseException] = []  # the last attempt's, once a wait began
    if callable(stopping):
        stopping = _Polled(stopping)
    if stopping is not None:
        stop = stop | stop_when_event_set(stopping)
        more = {"sleep": sleep_using_event(stopping), "before": _refuse_once_set(stopping, what, failures)}
    return Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop,
        wait=_Backoff(base_seconds, cap_seconds),
        before_sleep=_log_retry(what, failures),
        reraise=True,
        **more,
    )
