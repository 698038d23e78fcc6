"""The same small world (people, photo posts, mentions, DMs) on Mastodon and on X, so that the
shared pipeline tests run one scenario against both platforms."""

from __future__ import annotations

from typing import Any

import responses

from bot.platforms.mastodon import MastodonPlatform, html_to_text
from bot.platforms.x import XPlatform

from fake_x import BEARER, KEYS, FakeX
from mastodon_responses import BASE, TOKEN, FakeMastodonHTTP
from x_driver import make_config


class XWorld:
    name = "x"

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.fake = FakeX(mock)
        self.platform = XPlatform(BEARER, **KEYS)
        self.config = make_config(platforms=("x",))

    def person(self, username: str, note: str = "") -> dict[str, Any]:
        return self.fake.add_user(username, description=note)

    def photo_post(self, author: dict[str, Any], text: str, images: list[bytes]) -> dict[str, Any]:
        return self.fake.tweet(author, text, media=[self.fake.photo(d) for d in images])

    def mention(self, author: dict[str, Any], text: str, images: list[bytes] = (), in_reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.fake.tweet(author, f"@protestbot {text}", media=[self.fake.photo(d) for d in images], in_reply_to=in_reply_to)

    def direct_message(self, author: dict[str, Any], text: str) -> None:
        self.fake.dm(author, text)

    def replies_to(self, post: dict[str, Any]) -> list[dict[str, Any]]:
        return self.fake.replies_to(post["id"])

    def public_posts_by_bot(self) -> list[dict[str, Any]]:
        return self.fake.bot_tweets()

    def text_of(self, post: dict[str, Any]) -> str:
        return post["text"]

    def images_of(self, post: dict[str, Any]) -> list[tuple[bytes, str]]:
        return [(m["data"], m["alt_text"]) for m in self.fake.media_of(post)]

    def url_of(self, post: dict[str, Any]) -> str:
        return f"https://x.com/{self.fake.users[post['author_id']]['username']}/status/{post['id']}"

    def deleted(self) -> list[str]:
        return self.fake.deleted

    def dms_to(self, person: dict[str, Any]) -> list[str]:
        return [e["text"] for e in self.fake.bot_dms(to=person)]

    # the author changes their mind
    def author_deletes(self, post: dict[str, Any]) -> None:
        del self.fake.tweets[post["id"]]

    def lock(self, person: dict[str, Any]) -> None:
        person["protected"] = True  # the bot follows them: it still reads their tweets

    def set_note(self, person: dict[str, Any], note: str) -> None:
        person["description"] = note


class MastodonWorld:
    name = "mastodon"

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.fake = FakeMastodonHTTP(mock)
        self.platform = MastodonPlatform(BASE, TOKEN)
        self.config = make_config(mastodon_base_url=BASE, mastodon_access_token=TOKEN, platforms=("mastodon",))

    def person(self, username: str, note: str = "") -> dict[str, Any]:
        return self.fake.add_account(username, note=note)

    def photo_post(self, author: dict[str, Any], text: str, images: list[bytes]) -> dict[str, Any]:
        return self.fake.status(author, text, media=[self.fake.media(d) for d in images])

    def mention(self, author: dict[str, Any], text: str, images: list[bytes] = (), in_reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.fake.status(author, f"@protestbot {text}", media=[self.fake.media(d) for d in images],
                                in_reply_to=in_reply_to, mentions=[self.fake.bot])

    def direct_message(self, author: dict[str, Any], text: str) -> None:
        self.fake.status(author, f"@protestbot {text}", visibility="direct", mentions=[self.fake.bot])

    def replies_to(self, post: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in self.fake.bot_statuses() if s["in_reply_to_id"] == post["id"]]

    def public_posts_by_bot(self) -> list[dict[str, Any]]:
        return [s for s in self.fake.bot_statuses() if s["visibility"] != "direct"]

    def text_of(self, post: dict[str, Any]) -> str:
        return html_to_text(post["content"])

    def images_of(self, post: dict[str, Any]) -> list[tuple[bytes, str]]:
        return [(self.fake.upload_data[m["id"]], m["description"]) for m in post["media_attachments"]]

    def url_of(self, post: dict[str, Any]) -> str:
        return post["url"]

    def deleted(self) -> list[str]:
        return self.fake.deleted

    def dms_to(self, person: dict[str, Any]) -> list[str]:
        return [html_to_text(s["content"]) for s in self.fake.bot_statuses()
                if s["visibility"] == "direct" and any(m["id"] == person["id"] for m in s["mentions"])]

    # the author changes their mind
    def author_deletes(self, post: dict[str, Any]) -> None:
        del self.fake.statuses[post["id"]]

    def lock(self, person: dict[str, Any]) -> None:
        person["locked"] = True  # statuses embed the same account object

    def set_note(self, person: dict[str, Any], note: str) -> None:
        person["note"] = f"<p>{note}</p>"


WORLDS = {"mastodon": MastodonWorld, "x": XWorld}
