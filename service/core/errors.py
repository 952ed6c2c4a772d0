"""The service's declared errors, independent of any transport.

Each error carries the HTTP status it maps to (the V2 protocol uses the same codes; gRPC maps them to its
own), a stable machine-readable ``code`` and a message written for the client. A front-end turns them
into its own error format; stack traces go to the log, never to the client.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error with its HTTP status, a stable machine-readable code and a message for the client."""

    status_code = 500
    code = "internal_error"
    # Value of effnet_rejected_total{reason}; None for errors that are not rejections.
    reject_reason: str | None = None
    retry_after: int | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        if self.retry_after is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after))
        # Which image of the request this error is about (0-based), when it is about one; ``detail`` is
        # then the reason without the "image N (name): " that ``message`` starts with.
        self.image_index: int | None = None
        self.detail = message

    def about_image(self, index: int, name: str | None = None) -> ServiceError:
        """Name the image this error is about: ``image_index`` for programs, and a message that says
        "image N (name): ..." for people."""
        self.image_index = index
        self.message = f"{image_label(index, name)}: {self.detail}"
        self.args = (self.message,)
        return self

    def to_wire(self) -> dict[str, object]:
        """This error as plain data (the engine process answers a front-end worker with it)."""
        return {"code": self.code, "status": self.status_code, "message": self.detail, "headers": self.headers,
                "reject_reason": self.reject_reason, "image_index": self.image_index}

    @staticmethod
    def from_wire(data: dict[str, object]) -> ServiceError:
        """The error ``to_wire`` described, as the class of its code (the same status, code, headers and
        message, and which image it is about)."""
        cls = _BY_CODE.get(str(data["code"]), ServiceError)
        error = cls.__new__(cls)
        ServiceError.__init__(error, str(data["message"]), headers=dict(data.get("headers") or {}))  # type: ignore[arg-type]
        if cls is ServiceError:
            error.status_code, error.code = int(data["status"]), str(data["code"])  # type: ignore[arg-type]
            error.reject_reason = data.get("reject_reason")  # type: ignore[assignment]
        if data.get("image_index") is not None:
            error.about_image(int(data["image_index"]))  # type: ignore[arg-type]
        return error

    @property
    def server_fault(self) -> bool:
        """A failure of the server itself, worth an error line in the log. Overload, not ready and
        shutting down (503) are the service working as designed; client errors are the client's."""
        return self.status_code >= 500 and self.status_code != 503


def image_label(index: int, name: str | None = None) -> str:
    """How an error message names the image at ``index`` (0-based) of a request: "image 1 (cat.jpg)"."""
    return f"image {index + 1}" + (f" ({name})" if name else "")


class InvalidImage(ServiceError):
    """Content that is empty, not a supported image format, or cannot be decoded."""

    status_code = 400
    code = "invalid_image"
    reject_reason = "invalid_image"


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"
    reject_reason = "bad_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"
    reject_reason = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class BodyTooLarge(ServiceError):
    status_code = 413
    code = "body_too_large"
    reject_reason = "body_too_large"


class ImageTooLarge(ServiceError):
    status_code = 413
    code = "image_too_large"
    reject_reason = "image_too_large"


class TooManyImages(ServiceError):
    status_code = 413
    code = "too_many_images"
    reject_reason = "too_many_images"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"
    reject_reason = "unsupported_media_type"


class NoClassifier(ServiceError):
    """Classification asked of a model whose checkpoint has no classifier (it serves features only)."""

    status_code = 422
    code = "no_classifier"
    reject_reason = "bad_request"


class InvalidParameter(ServiceError):
    """A request parameter out of the range the served model allows (``top_k`` above its classes); the
    same 422 a parameter the front-end's own validation refuses gets. ``parameter``: its name."""

    status_code = 422
    code = "invalid_parameters"
    reject_reason = "invalid_parameters"

    def __init__(self, message: str, *, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class ModelNotFound(ServiceError):
    """No model of that name is served (never was, or was unloaded); the message lists the ones that are."""

    status_code = 404
    code = "model_not_found"
    reject_reason = "model_not_found"


class ModelControlDisabled(ServiceError):
    """Loading or unloading over the network while ``EFFNET_MODEL_CONTROL`` is ``none``."""

    status_code = 403
    code = "model_control_disabled"
    reject_reason = "bad_request"


class ModelLoadFailed(ServiceError):
    """A load or reload the repository API asked for failed; what served before still serves."""

    status_code = 400
    code = "model_load_failed"


class QueueFull(ServiceError):
    status_code = 503
    code = "overloaded"
    reject_reason = "queue_full"
    retry_after = 1


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"
    reject_reason = "not_ready"
    retry_after = 5


class ShuttingDown(ServiceError):
    status_code = 503
    code = "shutting_down"
    reject_reason = "shutting_down"
    retry_after = 1


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "unavailable"


class RequestTimeout(ServiceError):
    status_code = 504
    code = "timeout"
    reject_reason = "timeout"


class InferenceFailed(ServiceError):
    status_code = 500
    code = "inference_failed"


class EngineUnavailable(ServiceError):
    """The engine process is not reachable (it died and is being restarted): every front-end worker answers
    at once instead of letting requests wait for their deadline."""

    status_code = 503
    code = "engine_unavailable"
    reject_reason = "engine_unavailable"
    retry_after = 1


class ClientGone(ServiceError):
    """The client disconnected (mid-upload or while its images waited); nobody will read the answer.
    Counted as 499 (nginx's "client closed request"), as the front-ends' metrics and access log show it."""

    status_code = 499
    code = "client_gone"
    reject_reason = "client_gone"

    def __init__(self, message: str = "client disconnected") -> None:
        super().__init__(message)


class StartupError(RuntimeError):
    """A start that cannot succeed: unknown model, bad weights, missing device, bad labels file."""


class ConfigurationError(StartupError):
    """Settings that cannot work together on this machine (found when they are resolved): a usage error,
    which ``efficientnet-serve`` answers with exit status 2 like an invalid setting."""


def _subclasses(cls: type[ServiceError]) -> list[type[ServiceError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


# Each declared error by its code (the first declared wins: several may share a code).
_BY_CODE: dict[str, type[ServiceError]] = {}
for _cls in _subclasses(ServiceError)[1:]:
    _BY_CODE.setdefault(_cls.code, _cls)
