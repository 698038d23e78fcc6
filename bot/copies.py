"""The bot's copies of an original: finding the live ones and deleting one.

Shared by the takedown flow (someone asked) and the withdrawal sweep (the author took the photo
back), and by the handler when a takedown overtakes a copy being made.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

from .platforms.base import NotFound, Platform, Post
from .store import Store

log = logging.getLogger("bot.copies")


def own_copies(platform: Platform, store: Store, original: str, my_id: str,
               only: Iterable[str] | None = None) -> Iterator[Post]:
    """The bot's live copies of ``original`` (those of ``only`` among them, when given); the
    records of copies already gone are forgotten.

    A recorded id that is not the bot's post is skipped: deletion is only ever of its own posts.
    """
    recorded = store.replies_of(platform.name, original)
    for reply_id in sorted(recorded if only is None else recorded & set(only)):
        try:
            post = platform.get_post(reply_id)
        except NotFound:
            store.forget_reply(platform.name, original, reply_id)
            continue
        if post.account.id != my_id:
            log.warning("not_ours", extra={"post_id": reply_id})
            continue
        yield post


def delete_copy(platform: Platform, store: Store, original: str, copy: Post,
                count: Callable[[bool], None] = lambda removed: None) -> bool | None:
    """Delete one of the bot's copies and forget its record.

    Returns True when it is gone for everyone, False when only from the bot's side (X DMs),
    None when it was gone already (deleted by hand, by a moderator). ``count`` sees the first two
    before the record is forgotten.
    """
    try:
        removed: bool | None = platform.delete_post(copy.id)
    except NotFound:
        removed = None
    if removed is not None:
        count(removed)
    store.forget_reply(platform.name, original, copy.id)
    return removed
