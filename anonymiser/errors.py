"""Typed errors of the image core. ``bot/`` turns each into a user-facing reply in one place."""

from __future__ import annotations


class AnonymiserError(Exception):
    """Base of every error this package raises on purpose."""

    #: short, stable machine-readable code (used by the CLI, the bot and the web API)
    code = "anonymiser_error"


class UnsupportedImage(AnonymiserError):
    """The bytes are not an image format we accept (SVG, PDF, video, random bytes...)."""

    code = "unsupported_image"


class CorruptImage(AnonymiserError):
    """The bytes claim to be a supported image but cannot be decoded (truncated, damaged)."""

    code = "corrupt_image"


class EmptyImage(AnonymiserError):
    """Zero bytes were given."""

    code = "empty_image"


class ImageTooLarge(AnonymiserError):
    """The file exceeds the byte budget or the image exceeds the pixel budget."""

    code = "image_too_large"


class ImageTooNarrow(AnonymiserError):
    """A strip rather than a photo: one side over ``max_aspect_ratio`` times the other."""

    code = "image_too_narrow"


class AnimatedImage(AnonymiserError):
    """An animated GIF/WebP/PNG/AVIF: we refuse rather than silently answer with one frame."""

    code = "animated_image"


class WeightsError(AnonymiserError):
    """Model weights are missing, of the wrong size or checksum, or cannot be loaded."""

    code = "weights_error"


class OutputTooLarge(AnonymiserError):
    """The anonymised image cannot be encoded within the configured output byte limit."""

    code = "output_too_large"


class BadRegions(AnonymiserError):
    """A person-reviewed region list that cannot be painted within reason (boxes stacked many
    times over the whole image)."""

    code = "bad_regions"


class DeviceFailure(Exception):
    """The accelerator failed on a photo that is itself fine (a GPU error, a lone photo out of
    memory, the batcher shut down): a fault of this worker, not of the job.

    Deliberately not an :class:`AnonymiserError`: those mean "this photo cannot be anonymised" and
    become a reply saying so, while this one means "another worker should do it".
    """

    code = "device_failure"
