"""Whether a message asks for the bot's copy to be deleted.

Shared by the listener (which takes a command under a copy as a takedown), the takedown flow
and the mention handler (which never answers a deletion request with a new copy).
"""

from __future__ import annotations

import re

#: a link; phones capitalise a message's first word ("Https://...")
URL = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
#: words that ask for deletion, at a word's start, in the languages protests are most often
#: photographed in; a bare "thanks!" answering the bot's copy must not delete it, nor must an
#: English word that merely begins like one ("quite", "borrow", "exclusive", "cancellation",
#: "retired")
_DELETE_INTENT = re.compile(
    r"\b(?:delet|remov|take ?(?:it |this |that )?down|takedown|unpublish|erase|withdraw"
    r"|l[öo]sch|entfern|supprim|ret[ií]r(?:a|er|ez|e-)|effac|b[oó]rr[ae]|elimin|qu[ií]ta|rimuov"
    r"|cancella(?!tion)|verwijder|apag|exclu[aií]|usu[ńn])",
    re.IGNORECASE,
)
#: what may come before the command in a public answer: "please", in those languages
_PLEASE = re.compile(
    r"^(?:(?:please|pls|plz|kindly|bitte|por favor|per favore|s'il (?:te|vous) pla[iî]t|svp|alsjeblieft"
    r"|prosz[eę]|por gentileza)\b[\s,.!:;-]*)*",
    re.IGNORECASE,
)
_HANDLE = re.compile(r"(?<![\w/])@[\w.\-]+(?:@[\w.\-]+)?")


def _words(text: str) -> str:
    """The message without its @handles (replies pre-fill them: "@retired_nurse" is a name, not
    a request) and links."""
    return " ".join(_HANDLE.sub(" ", URL.sub(" ", text)).split())


def asks_deletion(text: str) -> bool:
    """Whether a direct answer to the bot's copy asks for it to be deleted."""
    return bool(_DELETE_INTENT.search(_words(text)))


def commands_deletion(text: str) -> bool:
    """Whether a public answer to the bot's copy is a command to delete it: a deletion word
    first, after at most a "please". Public answers are mostly thanks and talk ("I'll delete
    my original now", "please don't delete this"), which must not take the copy down."""
    return bool(_DELETE_INTENT.match(_PLEASE.sub("", _words(text))))
