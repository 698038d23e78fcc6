"""Every sentence the bot says to people, and the one place errors become replies."""

from __future__ import annotations

from anonymiser.errors import (
    AnimatedImage,
    AnonymiserError,
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    ImageTooNarrow,
    OutputTooLarge,
    UnsupportedImage,
)

from .fetch import FetchError, MediaTooLarge

CAVEAT = "Clothes, signs, tattoos, surroundings and the original post may still identify people."


def alt_text(heads: int) -> str:
    """Alt text of an anonymised image."""
    noun = "head" if heads == 1 else "heads"
    return (
        f"Anonymised copy of a photo: {heads} {noun} covered with opaque raised-fist emoji. "
        f"{CAVEAT} Automatic detection can miss people; check before sharing."
    )


#: Mastodon's default post length; the reply must fit whatever the failures were
MAX_TEXT = 500
#: room kept for the "@requester " prefix (Mastodon counts a remote mention as its local part)
MENTION_ROOM = 32


def _fit(text: str, extra: list[str], limit: int) -> str:
    """``text`` plus as many of ``extra`` as fit in ``limit`` characters, then a count."""
    for index, item in enumerate(extra):
        more = f" {item}"
        rest = len(extra) - index - 1
        tail = f" (+{rest} more)" if rest else ""
        if len(text) + len(more) + len(tail) > limit:
            return text + f" (+{len(extra) - index} more not processed)"
        text += more
    return text


def reply_text(heads: int, images: int, failures: list[str], limit: int = MAX_TEXT - MENTION_ROOM) -> str:
    """The text of a reply with anonymised images, never longer than ``limit``."""
    noun = "image" if images == 1 else "images"
    text = (
        f"Here is an anonymised copy ({images} {noun}, {heads} head{'s' if heads != 1 else ''} covered). "
        f"{CAVEAT} Share this copy instead of the original. "
        "To have my copy deleted, send me a direct message with its link."
    )
    if failures:
        text = _fit(text + " Not processed:", [f + ";" for f in failures], limit).rstrip(";")
    return text


NO_IMAGE = (
    "I could not find a photo in this post or in the post it replies to. Mention me in a reply "
    "to a post with photos and I will answer with a copy in which every head is covered."
)
GONE = (
    "The post you replied to was deleted or is not visible to me, so there is nothing for me to "
    "anonymise."
)
QUOTE_PENDING = (
    "I cannot see the post you quote yet: it shows in your post once its author's server "
    "approves the quote. Ask me again when it does, or mention me in a reply to that post."
)
QUOTE_REFUSED = (
    "The author of the post you quote did not approve the quote, so I will not copy it from "
    "there."
)
NOT_YOURS = (
    "That post is not public, so I only make a copy of it for its author or the people it "
    "addresses. Please ask the author."
)
NOBOT = (
    "The author of that post asks bots not to interact with their posts (#nobot/#noanon in "
    "their profile), so I will not repost their image. Please ask them directly."
)
APOLOGY = (
    "Sorry, something went wrong and I could not complete your request. Nothing was kept. "
    "You can try again later."
)
#: added to an answer sent by direct message because the platform refused it as a reply
REPLIES_CLOSED = "The platform does not let me reply in that conversation, so I am sending this to you privately."
RATE_LIMITED = "I am handling too many requests right now; please ask again in an hour."
TAKEDOWN_HELP = (
    "To delete a copy I posted, send me a direct message with the link (or id) of my reply or "
    "of the original post."
)
DELETE_NOT_COPY = (
    "It sounds like you want my copy of this post deleted, so I did not make another. "
    + TAKEDOWN_HELP
)
DM_PHOTO = (
    "I cannot anonymise photos sent to me by direct message here. Post the photo (for your "
    "followers only, if you like) and mention me, or mention me in a reply to a post with photos. "
    + TAKEDOWN_HELP
)
TAKEDOWN_ASK = (
    "If you want me to delete my copy, answer with the word \"delete\" (or send me its link)."
)
# Never echo the references: the platform would turn an "@name" hidden in them into a mention
# and deliver this direct message to a third person.
TAKEDOWN_UNKNOWN = "I could not find a reply of mine for {count} of the links or ids you sent; nothing was deleted for {them}."
TAKEDOWN_DONE = "Done: I deleted {count} of my replies for that post."
TAKEDOWN_DONE_UNCOUNTED = "Done: I deleted my replies for that post."
TAKEDOWN_ONE_SIDED = (
    "{count} of them {were} direct message{s}, which the platform lets me delete only on my side: "
    "please delete {them} in your inbox too."
)
TAKEDOWN_ONE_SIDED_OTHERS = (
    "A copy I sent by direct message stays in its recipient's inbox: the platform lets me delete "
    "direct messages only on my side."
)
TAKEDOWN_ALREADY = "My copy of that post was already deleted."
TAKEN_DOWN = "A copy of this post was taken down at someone's request, so I will not post it again."
TAKEDOWN_LIMIT = "You have sent many deletion requests in the last hour; please try again later."


def failure_reason(exc: BaseException) -> str:
    """A short, user-facing reason for a failed image (the one mapping of errors to words)."""
    if isinstance(exc, MediaTooLarge) or isinstance(exc, ImageTooLarge):
        return "the image is too large"
    if isinstance(exc, ImageTooNarrow):
        return "the image is a long thin strip, not a photo"
    if isinstance(exc, AnimatedImage):
        return "animated images are not supported"
    if isinstance(exc, UnsupportedImage):
        return "it is not a supported image (JPEG, PNG, WebP, HEIC, AVIF, GIF)"
    if isinstance(exc, (CorruptImage, EmptyImage)):
        return "the image file is damaged or empty"
    if isinstance(exc, OutputTooLarge):
        return "the result was too large to upload"
    if isinstance(exc, FetchError):
        return str(exc)
    if isinstance(exc, AnonymiserError):
        return "the image could not be processed"
    return "an internal error occurred"


def failed_all(reasons: list[str], limit: int = MAX_TEXT - MENTION_ROOM) -> str:
    """Reply when no image of a post could be anonymised."""
    return _fit("Sorry, I could not anonymise this post:", [r + ";" for r in reasons], limit).rstrip(";") + "."


def takedown_unknown(count: int) -> str:
    """References in a takedown request that name nothing the bot posted."""
    return TAKEDOWN_UNKNOWN.format(count=count, them="it" if count == 1 else "those")


def takedown_one_sided(count: int) -> str:
    """Deleted copies that stay in the recipient's inbox (X direct messages)."""
    return TAKEDOWN_ONE_SIDED.format(
        count=count, were="was a" if count == 1 else "were", s="" if count == 1 else "s", them="it" if count == 1 else "them"
    )
