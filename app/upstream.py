"""The OpenRouter client: one pooled requests.Session per worker, one method per upstream call.

Knows nothing of Flask. Failures before a stream starts are raised as UpstreamError subclasses.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import requests
from urllib3.exceptions import ReadTimeoutError

from .config import Settings
from .errors import (
    BadRequest,
    RelayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .events import ChatStream
from .metrics import UPSTREAM_RETRIES, count_upstream_error
from .pooling import PooledAdapter
from .retries import RetryPolicy
from .stalls import StallWatch

log = logging.getLogger("relay")

_ERROR_BODY_LIMIT = 64 * 1024


class OpenRouter:
    """Calls OpenRouter's API over a pool sized for every stream a worker can hold open."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.openrouter_base_url
        self.timeout = (settings.upstream_connect_timeout, settings.upstream_read_timeout)
        self.session = requests.Session()
        # Proxies are read from the environment once, here, instead of on every request.
        self.session.trust_env = False
        self.session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        self._adapter = PooledAdapter(pool_connections=1, pool_maxsize=settings.worker_connections)
        self.session.mount("http://", self._adapter)
        self.session.mount("https://", self._adapter)
        self.session.headers.update(_attribution_headers(settings))
        self.session.headers["Accept-Encoding"] = "identity"
        # Two of requests' defaults say nothing to OpenRouter (HTTP/1.1 keeps a connection alive,
        # and any type is acceptable unless said), and http.client validates every header it
        # sends with two regular expressions: about 3 us a header, before every upstream call.
        del self.session.headers["Accept"], self.session.headers["Connection"]
        self._templates: dict[tuple[str, str], requests.PreparedRequest] = {}
        self.stalls = StallWatch(settings.upstream_read_timeout)
        self.retry_policy = RetryPolicy(
            settings.upstream_retries, settings.upstream_retry_backoff, settings.retry_after_max
        )

    def open_chat_stream(
        self, payload: dict[str, Any], key: str, request_id: str | None = None
    ) -> ChatStream:
        """Start a streamed chat completion; returns once OpenRouter has sent its headers."""
        response = self._post("/chat/completions", {**payload, "stream": True}, key, request_id)
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            response.close()
            log.warning("upstream answered 200 with %r instead of an event stream", content_type)
            raise UpstreamProtocolError(
                f"OpenRouter answered with {content_type or 'no content type'} "
                "instead of an event stream"
            )
        stream = ChatStream(response)
        try:
            self.stalls.watch(stream)  # the first one starts the sweeper, and may wait for it
        except BaseException:  # interrupted meanwhile (the client left): nobody else would close it
            stream.close()
            raise
        return stream

    def complete_chat(
        self, payload: dict[str, Any], key: str, request_id: str | None = None
    ) -> tuple[bytes, dict[str, Any], int]:
        """A whole (non-streamed) chat completion: OpenRouter's JSON as it sent it, parsed, and
        the number of retries it took."""
        response = self._post("/chat/completions", payload, key, request_id)
        completion = _json_body(response)
        if not isinstance(completion, dict) or "choices" not in completion:
            if isinstance(completion, dict) and isinstance(completion.get("error"), dict):
                raise UpstreamError.from_body(completion["error"])
            raise UpstreamProtocolError("OpenRouter sent a completion without choices")
        return response.content, completion, response.relay_retries  # type: ignore[attr-defined]

    def list_models(self, key: str | None, request_id: str | None = None) -> list[dict[str, Any]]:
        """OpenRouter's model list (its `data` array)."""
        response = self._send("GET", "/models", None, key, request_id)
        listing = _json_body(response)
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            raise UpstreamProtocolError("OpenRouter sent a model list without data")
        return listing["data"]

    def close(self) -> None:
        self.session.close()

    def _post(
        self, path: str, payload: dict[str, Any], key: str, request_id: str | None
    ) -> requests.Response:
        try:
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        except RecursionError:  # parsed where the stack was shallower: in another greenlet
            raise BadRequest(
                "Request body is nested too deeply", {"body": ["Nested too deeply."]}
            ) from None
        return self._send("POST", path, body, key, request_id)

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        key: str | None,
        request_id: str | None = None,
    ) -> requests.Response:
        """One upstream call, retried while the retry policy allows; returns a 200 response."""
        attempt = 0
        while True:
            try:
                response = self._send_once(method, path, body, key, request_id)
                response.relay_retries = attempt  # type: ignore[attr-defined]
                return response
            except UpstreamError as error:
                count_upstream_error(error, "before_stream")
                delay = self.retry_policy.delay_before_retry(error, attempt)
                if delay is None:
                    error.retries = attempt
                    raise
                attempt += 1
                UPSTREAM_RETRIES.inc()
                log.warning(
                    "retry %d of %d in %.2fs after: %s",
                    attempt,
                    self.retry_policy.retries,
                    delay,
                    error.message,
                )
                time.sleep(delay)

    def _send_once(
        self, method: str, path: str, body: bytes | None, key: str | None, request_id: str | None
    ) -> requests.Response:
        request = self._prepared(method, path)
        if body is not None:
            request.body = body
            request.headers["Content-Type"] = "application/json"
            request.headers["Content-Length"] = str(len(body))
        if key:
            request.headers["Authorization"] = f"Bearer {key}"
        if request_id:
            request.headers["X-Request-ID"] = request_id
        try:
            response = self._adapter.send(
                request, stream=True, timeout=self.timeout, proxies=self.session.proxies
            )
        except requests.Timeout as error:
            log.warning("upstream timed out before answering: %s", type(error).__name__)
            raise UpstreamTimeout() from None
        except requests.RequestException as error:
            log.warning("upstream unreachable: %s", type(error).__name__)
            raise UpstreamUnreachable() from None
        except ValueError as error:
            # http.client refuses a header value (a line break in a profile key stored before
            # keys were checked), and its message quotes the value: the key.
            if not isinstance(error, UnicodeEncodeError) and "header" not in str(error):
                raise
            log.error(
                "upstream request not sent: a header value is invalid (%s)", type(error).__name__
            )
            raise RelayError(
                "The relay cannot send this request: an OpenRouter key or header it holds is not "
                "valid in a header; an operator must replace it"
            ) from None
        if response.status_code != 200:
            raise _error_from(response)
        return response

    def _prepared(self, method: str, path: str) -> requests.PreparedRequest:
        """A fresh copy of the call's request as the session would prepare it.

        The session's own pooled adapter sends it: preparing the URL, merging the session's
        settings and cookie jar, and running hooks on every call cost more CPU than the rest of
        a request's upstream work, and the relay uses none of them.
        """
        template = self._templates.get((method, path))
        if template is None:
            template = self.session.prepare_request(requests.Request(method, self.base_url + path))
            self._templates[(method, path)] = template
        return template.copy()


def _attribution_headers(settings: Settings) -> dict[str, str]:
    headers = {}
    if settings.openrouter_app_url:
        headers["HTTP-Referer"] = settings.openrouter_app_url
    if settings.openrouter_app_title:
        headers["X-Title"] = settings.openrouter_app_title
    return headers


def _error_from(response: requests.Response) -> UpstreamError:
    """The UpstreamError for a non-200 answer, keeping OpenRouter's status and message."""
    try:
        raw = response.raw.read(_ERROR_BODY_LIMIT)
    except Exception:  # the status alone is still worth reporting
        raw = b""
    finally:
        response.close()
    status = response.status_code
    relay_status = status if 400 <= status <= 599 else 502
    try:
        error = UpstreamError.from_body(json.loads(raw)["error"], relay_status)
        log.warning("upstream answered %s: %s", status, error.message)
    except (ValueError, KeyError, TypeError, RecursionError):
        log.warning("upstream answered %s without OpenRouter's error JSON", status)
        error = UpstreamError(f"OpenRouter answered with status {status}", status=relay_status)
    retry_after = response.headers.get("Retry-After")
    if retry_after:
        error.headers["Retry-After"] = retry_after
    return error


def _json_body(response: requests.Response) -> Any:
    """The whole body parsed as JSON (OpenRouter may pad it with whitespace while it works)."""
    try:
        return json.loads(response.content)
    except requests.RequestException as error:
        if isinstance(error.args[0] if error.args else None, ReadTimeoutError):
            raise UpstreamTimeout("OpenRouter went silent for too long") from None
        raise UpstreamProtocolError("OpenRouter's answer was cut off") from None
    except RecursionError:
        log.warning("upstream answered 200 with JSON nested too deeply to parse")
        raise UpstreamProtocolError("OpenRouter sent JSON nested too deeply to read") from None
    except ValueError:
        content_type = response.headers.get("Content-Type", "no content type")
        log.warning("upstream answered 200 with a body that is not JSON (%s)", content_type)
        raise UpstreamProtocolError(f"OpenRouter answered with {content_type}, not JSON") from None
