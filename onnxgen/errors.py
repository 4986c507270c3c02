"""Every error onnxgen raises on purpose. The CLI prints these as one line; anything else is a bug."""

import logging
from typing import Any


class OnnxgenError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in onnxgen."""


def shown(value: Any) -> str:
    """A bad value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def openai_error(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, as the server sends every error (under "error")."""
    return {"message": message, "type": kind, "param": param, "code": code}


def told(e: BaseException) -> dict[str, Any]:
    """An error as the server tells its client: onnxgen's own message; for a bug "internal error (ItsType)", its
    traceback going to the server's log ("onnxgen" logger, stderr), where whoever runs the server can read it."""
    if isinstance(e, OnnxgenError):
        return openai_error(str(e))
    logging.getLogger("onnxgen").error("internal error", exc_info=e)
    return openai_error(f"internal error ({type(e).__name__})", "server_error")


class ModelFolderError(OnnxgenError):
    """A model folder is missing, incomplete, or not an onnxgen export."""


class OptionsError(OnnxgenError, ValueError):
    """A generation option is out of range or contradicts another."""


class ContextLengthError(OptionsError):
    """Prompt plus max_new_tokens does not fit the model's context window."""


class ProviderError(OnnxgenError):
    """The requested execution provider (CPU or CUDA) cannot be used."""


class ExportError(OnnxgenError):
    """Export could not produce a validated model folder."""


class QuantizeError(OnnxgenError):
    """Quantization failed, did not take, or cost more accuracy than allowed."""


class IgnoredOptionWarning(UserWarning):
    """A model folder asks for something onnxgen does not do (a generation_config.json key it does not take)."""


class PerformanceWarning(UserWarning):
    """A call will run, but much slower than it could (how to set it up better is in the message)."""


class AdapterWarning(UserWarning):
    """A LoRA adapter loaded beside a model whose weights are not those of the base it was trained on."""
