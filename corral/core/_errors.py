"""Every error corral raises, split by what the caller can do about it.

::

    CorralError
    ├── TransportError                 the bytes did not make a round trip   (retryable)
    │   ├── ConnectError               no connection could be opened
    │   │   └── WrongScheme            the server does not speak the URL's scheme   (final)
    │   ├── APITimeoutError            ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout
    │   └── NetworkError               ReadError (reset), WriteError, RemoteProtocolError
    ├── APIError                       the server answered with an error status
    │   ├── AuthenticationError        401 / 403: fix the key
    │   ├── NotFoundError              404: wrong URL or model
    │   ├── BadRequestError            400 / 422: fix the request
    │   │   └── ContextLengthExceeded  the prompt does not fit the model
    │   ├── ConflictError              409                                     (retryable)
    │   ├── RequestTimeoutError        408                                     (retryable)
    │   ├── RateLimitError             429, with retry_after                   (retryable)
    │   └── ServerError                5xx                                     (retryable)
    ├── MalformedResponse              a body or stream corral cannot decode  (retryable)
    │   └── ResponseTooLarge           a body (max_response_bytes), SSE line or event over a cap
    ├── RequestTooLarge                cost exceeds what a limiter could ever admit
    ├── DeadlineExceeded               the call's deadline passed
    ├── CircuitOpen                    the breaker is refusing calls for a while
    └── InvalidInput                   bad user input (a JSONL line, a flag)

No error ever carries a credential: provider text passes ``classify.scrub`` (with the keys the
client sent) before it becomes part of a message.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CircuitOpen",
    "ConflictError",
    "ConnectError",
    "ConnectTimeout",
    "ContextLengthExceeded",
    "CorralError",
    "DeadlineExceeded",
    "InvalidInput",
    "MalformedResponse",
    "NetworkError",
    "NotFoundError",
    "PoolTimeout",
    "RateLimitError",
    "ReadError",
    "ReadTimeout",
    "RemoteProtocolError",
    "RequestTimeoutError",
    "RequestTooLarge",
    "ResponseTooLarge",
    "ServerError",
    "TransportError",
    "WriteError",
    "WriteTimeout",
    "WrongScheme",
]


class CorralError(Exception):
    """Root of every corral error. ``kind`` is a short stable name for metrics and output files."""

    kind: ClassVar[str] = "error"
    #: May the same request succeed if sent again later?
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransportError(CorralError):
    """The request/response exchange failed below HTTP."""

    kind = "transport_error"
    retryable = True

    def __init__(self, message: str, *, request_sent: bool = False) -> None:
        super().__init__(message)
        #: Had the whole request left this process? If not, a re-send cannot duplicate work.
        self.request_sent = request_sent


class ConnectError(TransportError):
    """No connection could be opened (refused, unreachable, TLS failed); nothing was sent."""

    kind = "connect_error"


class WrongScheme(ConnectError):
    """The server does not speak the URL's scheme (``https://`` to a plain-HTTP port): every
    try would fail the same way, so it is not retried."""

    kind = "wrong_scheme"
    retryable = False


class APITimeoutError(TransportError):
    """A phase of the exchange took longer than its timeout (named as in the openai SDK)."""

    kind = "timeout"


class ConnectTimeout(APITimeoutError):
    """Opening the connection took longer than ``Timeouts.connect``; nothing was sent."""

    kind = "connect_timeout"


class ReadTimeout(APITimeoutError):
    """The server was silent longer than ``Timeouts.read``: the request may have been handled."""

    kind = "read_timeout"


class WriteTimeout(APITimeoutError):
    """Sending the request took longer than ``Timeouts.write`` (a peer not reading)."""

    kind = "write_timeout"


class PoolTimeout(APITimeoutError):
    """No pooled connection came free within ``Timeouts.pool``; nothing was sent."""

    kind = "pool_timeout"


class NetworkError(TransportError):
    """An open connection failed mid-exchange (reset, closed, or broken HTTP)."""

    kind = "network_error"


class ReadError(NetworkError):
    """Reading the response failed: the connection was reset or closed."""

    kind = "read_error"


class WriteError(NetworkError):
    """Sending the request failed: the connection was reset or closed."""

    kind = "write_error"


class RemoteProtocolError(NetworkError):
    """The peer broke HTTP: closed mid-body, sent garbage, cut a stream short."""

    kind = "remote_protocol_error"


class APIError(CorralError):
    """The server answered with an error status."""

    kind = "api_error"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        request_id: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        #: The provider's machine-readable code, e.g. ``context_length_exceeded``.
        self.code = code
        self.error_type = error_type
        #: Seconds the server asked to wait (``Retry-After``/``retry-after-ms``), if it said.
        self.retry_after = retry_after
        #: The server's explicit ``x-should-retry`` verdict, if it gave one.
        self.should_retry = should_retry

    def __str__(self) -> str:
        rid = f", request_id={self.request_id}" if self.request_id else ""
        return f"{self.status} {self.kind}: {self.message}{rid}"


class AuthenticationError(APIError):
    """401 or 403: the key is missing, wrong or not allowed; retrying will not help."""

    kind = "authentication"


class NotFoundError(APIError):
    """404: a wrong base URL, path or model name; retrying will not help."""

    kind = "not_found"


class BadRequestError(APIError):
    """400 or 422: the server refuses the request as sent; fix it rather than retry."""

    kind = "bad_request"


class ContextLengthExceeded(BadRequestError):
    """The prompt plus reserved output does not fit; numbers are set when known."""

    kind = "context_length_exceeded"

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        request_id: str | None = None,
        code: str | None = "context_length_exceeded",
        error_type: str | None = None,
        max_context: int | None = None,
        requested: int | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(
            message,
            status=status,
            request_id=request_id,
            code=code,
            error_type=error_type,
            retry_after=retry_after,
            should_retry=should_retry,
        )
        self.max_context = max_context
        self.requested = requested


class ConflictError(APIError):
    """409: a conflicting concurrent operation; the same request may succeed later."""

    kind = "conflict"
    retryable = True


class RequestTimeoutError(APIError):
    """408: the server gave up waiting for the request; sending it again may succeed."""

    kind = "request_timeout"
    retryable = True


class RateLimitError(APIError):
    """429. ``retry_after`` is the server's wait in seconds when it said one."""

    kind = "rate_limited"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status: int = 429,
        request_id: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(
            message,
            status=status,
            request_id=request_id,
            code=code,
            error_type=error_type,
            retry_after=retry_after,
            should_retry=should_retry,
        )


class ServerError(APIError):
    """5xx: the provider failed; the same request may succeed later."""

    kind = "server_error"
    retryable = True


class MalformedResponse(CorralError):
    """A 2xx (or error) body that does not decode as the API promises."""

    kind = "malformed_response"
    retryable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ResponseTooLarge(MalformedResponse):
    """The server sent more than a cap allows: a body over the transport's ``max_response_bytes``,
    an SSE line or event over the parser's ``max_event_size``.

    Not retryable: the same call would most likely bring the same oversized answer.
    """

    kind = "response_too_large"
    retryable = False

    def __init__(
        self, message: str, *, limit: int | None = None, status: int | None = None
    ) -> None:
        super().__init__(message, status=status)
        #: The cap that was passed, in the unit the message names, when the raiser states it.
        self.limit = limit


class RequestTooLarge(CorralError):
    """The call costs more than a limiter's whole capacity, so waiting would never help."""

    kind = "request_too_large"


class DeadlineExceeded(CorralError):
    """The call's deadline (``Deadline`` or ``deadline=``) passed before it finished."""

    kind = "deadline_exceeded"


class CircuitOpen(CorralError):
    """The circuit breaker refuses calls after repeated failures; ``retry_at`` says until when."""

    kind = "circuit_open"

    def __init__(self, message: str, *, retry_at: float) -> None:
        super().__init__(message)
        #: Clock time at which the breaker lets a probe through.
        self.retry_at = retry_at


class InvalidInput(CorralError):
    """User input corral refuses; the message names the file and line or the field."""

    kind = "invalid_input"
