"""All of the bot's configuration, read from environment variables in one place.

``BotConfig.from_env()`` validates everything at start-up and raises ``ConfigError`` listing
every problem at once, so an operator fixes their ``.env`` in one go.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, MutableMapping
from urllib.parse import urlparse


class ConfigError(Exception):
    """The environment does not describe a runnable bot; ``problems`` lists every reason."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("Invalid configuration:\n  - " + "\n  - ".join(self.problems))


#: where the bot's entry points read settings the environment does not give (empty: nowhere)
ENV_FILE_VARIABLE = "BOT_ENV_FILE"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_env_file(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Read ``.env`` (``BOT_ENV_FILE``; relative to the working directory) into ``environ``,
    for names it does not set already: the environment wins, as with compose's ``env_file``.
    Returns the names it set.

    ``python -m bot`` and the Celery worker call this, so ``python -m bot check`` sees the same
    settings ``scripts/run`` and compose use. Lines are ``NAME=value``, optionally after
    ``export``, with ``#`` comments; single quotes keep a value literal; double quotes allow
    ``\\"``, ``\\$`` and ``\\\\``. A bare ``$`` outside single quotes is refused: a shell would
    expand it and this reader does not, and an operator should not have two readings of one file.
    """
    env = os.environ if environ is None else environ
    path = env.get(ENV_FILE_VARIABLE, ".env")
    if not path:
        return []
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no name
    except FileNotFoundError:
        if ENV_FILE_VARIABLE in env:
            raise ConfigError(f"{ENV_FILE_VARIABLE}={path}: no such file") from None
        return []
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    values: dict[str, str] = {}
    problems = []
    # Lines end at \n (and \r\n) only, as a shell reads them, not at every Unicode line break.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        try:
            parsed = _env_line(line)
        except ValueError as exc:
            problems.append(f"{path} line {number}: {exc}")
            continue
        if parsed is not None and parsed[0] == ENV_FILE_VARIABLE:
            # Read once by each process; a file naming another would give a listener and its
            # worker (which reads it again) different settings.
            problems.append(f"{path} line {number}: {ENV_FILE_VARIABLE} belongs in the environment, not in the file")
        elif parsed is not None:
            values[parsed[0]] = parsed[1]
    if problems:
        raise ConfigError(problems)
    added = [name for name in values if name not in env]
    for name in added:
        env[name] = values[name]
    return added


def _env_line(line: str) -> tuple[str, str] | None:
    """One ``.env`` line as ``(name, value)``; None for a blank line or a comment."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if re.match(r"export\s", line):
        line = line[len("export"):].lstrip()
    name, equals, raw = line.partition("=")
    if not equals or not _ENV_NAME.fullmatch(name):
        raise ValueError("expected NAME=value")
    if raw[:1] == "'":
        end = raw.find("'", 1)
        if end < 0:
            raise ValueError("a single quote is not closed")
        value, rest = raw[1:end], raw[end + 1:]
    elif raw[:1] == '"':
        chars, k = [], 1
        while k < len(raw) and raw[k] != '"':
            if raw[k] == "\\" and k + 1 < len(raw) and raw[k + 1] in '"\\$':
                k += 1
            elif raw[k] in "$`":
                raise ValueError(f"'{raw[k]}' would be expanded by a shell: put the value in single quotes")
            chars.append(raw[k])
            k += 1
        if k >= len(raw):
            raise ValueError("a double quote is not closed")
        value, rest = "".join(chars), raw[k + 1:]
    else:
        value, rest = re.split(r"\s#", raw, maxsplit=1)[0].strip(), ""
        if "$" in value or "`" in value:
            raise ValueError("'$' or '`' would be expanded by a shell: put the value in single quotes")
        if any(c.isspace() for c in value):
            raise ValueError("a value with spaces needs quotes")
        if "'" in value or '"' in value or "\\" in value:
            raise ValueError("quotes or backslashes inside a value: quote the whole value in single quotes")
    if rest and not rest[0].isspace() or rest.strip() and not rest.strip().startswith("#"):
        # A shell would join text after the quote to the value ('x'#c is x#c): be explicit.
        raise ValueError("unexpected text after the closing quote")
    if "\0" in value:
        raise ValueError("a value cannot hold a NUL byte")
    return name, value


#: the variables requests takes a proxy from (lower case first, as urllib reads them)
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


#: X (API v2): the app-only bearer token (filtered stream) and the OAuth 1.0a user context of
#: the bot account (mentions, posting, media, direct messages), all from the developer portal
#: seconds between Celery's soft time limit (the handler apologises) and its hard one (the run is killed)
HARD_LIMIT_GRACE_S = 30

X_VARIABLES = (
    ("X_BEARER_TOKEN", "x_bearer_token"),
    ("X_API_KEY", "x_api_key"),
    ("X_API_SECRET", "x_api_secret"),
    ("X_ACCESS_TOKEN", "x_access_token"),
    ("X_ACCESS_TOKEN_SECRET", "x_access_token_secret"),
)


#: images one post may carry on X and on a stock Mastodon server
MAX_IMAGES_PER_POST = 4


@dataclass(frozen=True)
class BotConfig:
    """Validated settings of the listener and the workers."""

    mastodon_base_url: str = ""
    mastodon_access_token: str = ""
    #: every platform this deployment serves (the workers serve all of them; each listener
    #: process serves the one named by ``BOT_PLATFORM``)
    platforms: tuple[str, ...] = ("mastodon",)
    x_bearer_token: str = ""
    x_api_key: str = ""
    x_api_secret: str = ""
    x_access_token: str = ""
    x_access_token_secret: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    hashtags: tuple[str, ...] = ()
    #: only for tests against a local fake server: allow media from loopback/private addresses
    allow_private_addresses: bool = False
    #: the proxy variables set in the environment (names only: a proxy URL may hold a password),
    #: which media downloads go through (requests reads them)
    proxy_variables: tuple[str, ...] = ()
    max_media_bytes: int = 40 * 1024 * 1024
    media_timeout_s: float = 20.0
    max_images: int = 4
    per_account_per_hour: int = 10
    global_per_hour: int = 600
    takedowns_per_account_per_hour: int = 20
    #: originals the listener checks for withdrawal per 5-minute round (0: no checks)
    withdrawal_checks: int = 50
    max_attempts: int = 5
    #: a job whose runs killed the worker (out of memory, a crash, the hard time limit) this many
    #: times is dead-lettered instead of being handed to the next worker to kill
    max_worker_losses: int = 2
    poll_interval_s: float = 30.0
    #: how far below a hashtag's cursor each poll looks for posts that federated late (0: off)
    late_window_s: float = 900.0
    stream: bool = True
    visibility_timeout_s: int = 900
    #: Celery's soft time limit per task run (prefork workers; the thread pool enforces none)
    task_time_limit_s: int = 600
    weights_dir: Path | None = None
    #: the worker's head locators (``ANON_LOCATORS``); None: every one whose weights are present
    locators: tuple[str, ...] | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "BotConfig":
        """Read and validate; raises ``ConfigError`` naming every bad or missing variable."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        values: dict[str, object] = {}

        platforms = _platforms(env, problems)
        values["platforms"] = platforms

        base = env.get("MASTODON_BASE_URL", "").strip().rstrip("/")
        parsed = urlparse(base)
        if "mastodon" in platforms:
            if not base:
                problems.append("MASTODON_BASE_URL is not set (e.g. https://mastodon.social)")
            elif parsed.scheme not in ("http", "https") or not parsed.netloc:
                problems.append(f"MASTODON_BASE_URL must be an http(s) URL, got {base!r}")
        values["mastodon_base_url"] = base
        token = env.get("MASTODON_ACCESS_TOKEN", "").strip()
        if not token and "mastodon" in platforms:
            problems.append("MASTODON_ACCESS_TOKEN is not set (Preferences > Development > New application)")
        values["mastodon_access_token"] = token

        for name, key in X_VARIABLES:
            value = env.get(name, "").strip()
            if not value and "x" in platforms:
                problems.append(f"{name} is not set (developer portal > your app > Keys and tokens)")
            values[key] = value

        redis_url = env.get("REDIS_URL", cls.redis_url).strip()
        # Not unix://: redis-py's spelling of a socket, which Kombu (the Celery broker) has no
        # transport for ("No such transport: unix" at start), and Kombu's redis+socket:// is
        # refused by redis-py, which the store, heartbeats and metrics use with the same URL.
        if urlparse(redis_url).scheme not in ("redis", "rediss"):
            problems.append(f"REDIS_URL must start with redis:// or rediss:// (the broker and the store share it; "
                            f"a Unix socket has no spelling both understand), got {redis_url!r}")
        values["redis_url"] = redis_url

        tags = []
        for raw in env.get("BOT_HASHTAGS", "").replace(",", " ").split():
            tag = raw.lstrip("#")
            if not tag.replace("_", "").isalnum():
                problems.append(f"BOT_HASHTAGS: {raw!r} is not a hashtag")
            else:
                tags.append(tag.lower())
        values["hashtags"] = tuple(dict.fromkeys(tags))

        def number(name: str, key: str, kind: type, minimum: float, maximum: float = math.inf) -> None:
            value = read_number(env, name, kind, problems, low=minimum, high=maximum)
            if value is not None:
                values[key] = value

        number("BOT_MAX_MEDIA_BYTES", "max_media_bytes", int, 1)
        number("BOT_MEDIA_TIMEOUT", "media_timeout_s", float, 0.1)
        # Every copy is one post: X and stock Mastodon servers take at most 4 images in one.
        number("BOT_MAX_IMAGES", "max_images", int, 1, MAX_IMAGES_PER_POST)
        number("BOT_RATE_PER_ACCOUNT_HOUR", "per_account_per_hour", int, 1)
        number("BOT_RATE_GLOBAL_HOUR", "global_per_hour", int, 1)
        number("BOT_TAKEDOWNS_PER_ACCOUNT_HOUR", "takedowns_per_account_per_hour", int, 1)
        number("BOT_WITHDRAWAL_CHECKS", "withdrawal_checks", int, 0, 1000)
        number("BOT_MAX_ATTEMPTS", "max_attempts", int, 1)
        number("BOT_MAX_WORKER_LOSSES", "max_worker_losses", int, 1)
        number("BOT_POLL_INTERVAL", "poll_interval_s", float, 0.05)
        number("BOT_LATE_WINDOW", "late_window_s", float, 0, 7 * 24 * 3600)
        number("BOT_VISIBILITY_TIMEOUT", "visibility_timeout_s", int, 1)
        number("BOT_TASK_TIME_LIMIT", "task_time_limit_s", int, 1)
        for name, key in (("BOT_ALLOW_PRIVATE_ADDRESSES", "allow_private_addresses"), ("BOT_STREAM", "stream")):
            raw = env.get(name, "").strip()
            if raw:  # empty, like every other setting: the default (BOT_STREAM= used to mean off)
                try:
                    values[key] = _bool(raw)
                except ValueError as exc:
                    problems.append(f"{name}: {exc}")
        values["proxy_variables"] = tuple(name for name in PROXY_VARIABLES if env.get(name, "").strip())
        if env.get("ANON_WEIGHTS_DIR"):
            values["weights_dir"] = Path(env["ANON_WEIGHTS_DIR"])
        locators = _locators(env, problems)
        if locators:
            values["locators"] = locators
        if problems:
            raise ConfigError(problems)
        return cls(**values)  # type: ignore[arg-type]


    def risks(self) -> list[str]:
        """Settings that work but can misbehave, for the start-up log (tests shorten the
        visibility timeout on purpose, so these are warnings, not errors)."""
        found = []
        if self.task_time_limit_s + HARD_LIMIT_GRACE_S >= self.visibility_timeout_s:
            # Redis would hand a job still running to a second worker: two runs, two replies.
            found.append(
                f"BOT_TASK_TIME_LIMIT ({self.task_time_limit_s}) plus the {HARD_LIMIT_GRACE_S} s before the hard "
                f"limit is not below BOT_VISIBILITY_TIMEOUT ({self.visibility_timeout_s}): a job still running on a "
                "prefork worker would be handed to a second worker"
            )
        if self.hashtags and "x" in self.platforms:
            found.append(
                "BOT_HASHTAGS is not watched on X (its rules and, since 23 Feb 2026, its API refuse replies to "
                "authors who did not mention the bot): the X listener answers mentions only"
            )
        if self.proxy_variables and not self.allow_private_addresses:
            # bot/fetch.py checks the address a connection opens to; through a proxy the proxy
            # opens it, and only the bot's own lookup before the request is checked.
            found.append(
                f"{' and '.join(self.proxy_variables)} set: media downloads go through that proxy, which opens the "
                "connections, so the bot can check only its own lookup of each address (a DNS server answering the "
                "proxy differently could point it at a private or metadata address): give workers no proxy, or one "
                "that refuses private, loopback and link-local addresses"
            )
        return found


def _locators(env: Mapping[str, str], problems: list[str]) -> tuple[str, ...]:
    """``ANON_LOCATORS``: a comma list of registered locator names (whether their weights are
    present is checked by the worker at start, against its weights folder)."""
    from anonymiser.locators.registry import REGISTRY

    names = [n.strip().lower() for n in env.get("ANON_LOCATORS", "").replace(",", " ").split()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        problems.append(f"ANON_LOCATORS: unknown locator(s) {', '.join(unknown)} (known: {', '.join(REGISTRY)})")
        return ()
    return tuple(dict.fromkeys(names))


def _platforms(env: Mapping[str, str], problems: list[str]) -> tuple[str, ...]:
    """The platforms in use: those named by ``BOT_PLATFORMS`` / ``BOT_PLATFORM`` and those with
    any of their variables set (a partial set is then reported); Mastodon when nothing says."""
    from .platforms.registry import PLATFORMS  # the registry imports this module

    named: list[str] = []
    for variable in ("BOT_PLATFORMS", "BOT_PLATFORM"):
        for raw in env.get(variable, "").replace(",", " ").split():
            name = raw.strip().lower()
            if name not in PLATFORMS:
                problems.append(f"{variable}: unknown platform {raw!r} (known: {', '.join(PLATFORMS)})")
            elif name not in named:
                named.append(name)
    if any(env.get(k, "").strip() for k in ("MASTODON_BASE_URL", "MASTODON_ACCESS_TOKEN")) and "mastodon" not in named:
        named.append("mastodon")
    if any(env.get(name, "").strip() for name, _ in X_VARIABLES) and "x" not in named:
        named.append("x")
    if not named and not any(env.get(v, "").strip() for v in ("BOT_PLATFORMS", "BOT_PLATFORM")):
        named.append("mastodon")
    return tuple(sorted(named, key=list(PLATFORMS).index))


def read_number(
    env: Mapping[str, str], name: str, kind: type, problems: list[str], low: float, high: float = math.inf
) -> int | float | None:
    """The number in ``env[name]``, or None when unset; a bad value is added to ``problems``.

    The one parser of numeric settings, so every process reports them the same way.
    """
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        problems.append(f"{name} must be a{'n integer' if kind is int else ' number'}, got {raw!r}")
        return None
    if not math.isfinite(value):
        problems.append(f"{name} must be a finite number, got {raw!r}")
        return None
    if not low <= value <= high:
        bound = f"at least {low}" if high == math.inf else f"between {low:g} and {high:g}"
        problems.append(f"{name} must be {bound}, got {raw!r}")
        return None
    return value


def int_or_default(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """For settings needed at import time: a bad value falls back to the default here, and
    ``BotConfig.from_env`` reports it when the process starts."""
    try:
        return int((os.environ if environ is None else environ).get(name, "").strip() or default)
    except ValueError:
        return default


def credentials_given(environ: Mapping[str, str] | None = None) -> bool:
    """True when any platform credential is set, complete or not: the main job then runs the
    bot, whose start-up check names what is missing, instead of quietly running the demo."""
    env = os.environ if environ is None else environ
    names = ["MASTODON_BASE_URL", "MASTODON_ACCESS_TOKEN"] + [name for name, _ in X_VARIABLES]
    return any(env.get(name, "").strip() for name in names)


def _locator_problems(config: BotConfig, env: Mapping[str, str]) -> list[str]:
    """Whether the worker's locators can be loaded: known names, weights present (the files are
    checked, nothing is loaded). Part of the start-up check, so ``python -m bot check`` reports a
    locator whose weights are missing instead of passing a worker that then refuses to start."""
    from anonymiser.errors import WeightsError
    from anonymiser.locators.registry import default_weights_dir, resolve_names

    if config.locators is None and config.weights_dir is not None and not config.weights_dir.is_dir():
        # "Every locator whose weights are present" would quietly be CenterFace alone, which
        # misses every head seen from behind. (Locators named in ANON_LOCATORS are checked below.)
        return [f"ANON_WEIGHTS_DIR={config.weights_dir} is not a folder"]
    try:
        resolve_names(config.locators, config.weights_dir or default_weights_dir(env))
    except (WeightsError, ValueError) as exc:
        return [f"cannot load the models: {exc}"]
    return []


def check_startup(worker: bool, environ: Mapping[str, str] | None = None) -> BotConfig:
    """Every setting a bot process reads, validated together at start-up: the bot's own, the
    fleet's and, for a worker, the anonymiser's (``ANON_MAX_*``, ``ANON_ONNX_*``, and on a GPU
    worker ``ANON_LSCCNN_*``), which it would otherwise first read on a job and fail it with.
    ``ConfigError`` lists every problem at once, not the first group's."""
    from anonymiser.limits import Limits
    from anonymiser.locators.onnx_models import OnnxOptions

    from .routing import FleetSettings  # it reads its numbers through this module

    env = os.environ if environ is None else environ
    problems: list[str] = []
    config = fleet = None
    try:
        config = BotConfig.from_env(env)
    except ConfigError as exc:
        problems += exc.problems
    try:
        fleet = FleetSettings.from_env(env)
    except ConfigError as exc:
        problems += exc.problems
    if worker:
        readers: list[Callable[[Mapping[str, str]], object]] = [Limits.from_env, OnnxOptions.from_env]  # type: ignore[list-item]
        role = fleet.role if fleet is not None else env.get("BOT_WORKER_ROLE", "").strip().lower()
        if role == "gpu":
            from anonymiser.batching.options import EngineOptions, checkpoint_expectations  # loads torch: GPU only

            readers += [EngineOptions.from_env, checkpoint_expectations]
        for read in readers:
            try:
                read(env)
            except ValueError as exc:
                problems.append(str(exc))
        if config is not None:
            problems += _locator_problems(config, env)
    if problems or config is None:
        raise ConfigError(problems)
    return config
