"""Every error onnxgen raises on purpose. The CLI prints these as one line; anything else is a bug."""


class OnnxgenError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in onnxgen."""


def told(e: BaseException) -> str:
    """What a client or user is told of an error: onnxgen's own message, never a bug's."""
    return str(e) if isinstance(e, OnnxgenError) else "internal error"


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
