"""How publish talks to the Hub: a wait per request, a deadline per call, one line per failure.

huggingface_hub's shared HTTP client waits forever by default. Every request gets
``ATHANOR_HUB_TIMEOUT`` seconds (connect, send, each read), and every Hub call as a whole (create the
repository, upload the folder) ``ATHANOR_HUB_DEADLINE`` seconds: a server that answers one byte a
minute never trips a per-read timeout, so the call runs in a worker thread that the caller stops
waiting for at the deadline (its connection is closed; no signal is used, so this works off the main
thread too). Only huggingface_hub's public API is used (``get_session``, ``close_session``).
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable

from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .redact import redact

HUB_TIMEOUT_S = 60.0  # seconds one Hub request may wait for the server (connect, send, each read)
HUB_DEADLINE_S = 3600.0  # seconds one whole Hub call may take (an upload of large weights included)


class HubError(RuntimeError):
    """A Hub call failed (offline, unreachable, unauthorised, ...); printed as one line, with
    credentials in URLs and secret values hidden."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class PublishInputError(HubError):
    """Bad input to publish (no such run, no saved model, bad repo id): exit code 2."""


class HubDeadline(TimeoutError):
    """A Hub call did not finish within its deadline."""


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise PublishInputError(f"{name}={os.environ[name]!r}: expected seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise PublishInputError(f"{name}={value}: expected seconds > 0")
    return value


def hub_timeout() -> float:
    return _seconds("ATHANOR_HUB_TIMEOUT", HUB_TIMEOUT_S)


def hub_deadline() -> float:
    return _seconds("ATHANOR_HUB_DEADLINE", HUB_DEADLINE_S)


def bound_requests() -> None:
    """Give huggingface_hub's shared client a timeout on every request (its default has none)."""
    from huggingface_hub import get_session

    get_session().timeout = hub_timeout()


def with_deadline(call: Callable[[], Any], what: str) -> Any:
    """``call()`` (one Hub call), or ``HubDeadline`` once ``hub_deadline()`` seconds have passed.
    The call runs in a daemon thread; at the deadline the shared client is closed, which ends its
    request, and the thread is left to finish on its own (it can no longer hold up an exit)."""
    from huggingface_hub import close_session

    seconds = hub_deadline()
    bound_requests()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name=f"athanor-hub-{what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        close_session()
        raise HubDeadline(f"{what} did not finish within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def hub_error(error: Exception, endpoint: str, repo_id: str) -> HubError:
    """One line a person can act on, for the ways an upload fails."""
    if isinstance(error, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it and run again")
    if isinstance(error, HubDeadline):
        return HubError(f"the Hub at {endpoint}: {error} (it kept answering too slowly); check the network or "
                        f"HF_ENDPOINT (ATHANOR_HUB_DEADLINE sets the limit)")
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return HubError(f"the Hub at {endpoint} rejected the token (401 Unauthorized): set HF_TOKEN to a "
                            f"token with write access")
        if status == 403:
            return HubError(f"the token may not write to {repo_id} at {endpoint} (403 Forbidden)")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return HubError(f"the Hub at {endpoint} answered {status} for {repo_id}: {first}")
    names = " ".join(cls.__name__ for cls in type(error).__mro__)
    if "Timeout" in names and "Connect" not in names:
        return HubError(f"the Hub at {endpoint} did not answer within {hub_timeout():g} s ({type(error).__name__}); "
                        f"check the network or HF_ENDPOINT (ATHANOR_HUB_TIMEOUT sets the wait)")
    if isinstance(error, (ConnectionError, TimeoutError)) or "Connect" in names or "Timeout" in names:
        return HubError(f"cannot reach the Hub at {endpoint} ({type(error).__name__}); check the network "
                        f"or HF_ENDPOINT")
    first = (str(error).strip().splitlines() or [""])[0]
    return HubError(f"upload to {repo_id} at {endpoint} failed: {type(error).__name__}: {first}")
