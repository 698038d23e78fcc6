"""Configuration: every problem reported at once, before the bot starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import X_VARIABLES, BotConfig, ConfigError, check_startup, credentials_given, load_env_file

REPO = Path(__file__).resolve().parents[2]


def problems(error: ConfigError) -> list[str]:
    return [line[4:] for line in str(error).splitlines() if line.startswith("  - ")]


def test_missing_credentials_are_both_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        BotConfig.from_env({})
    found = problems(caught.value)
    assert len(found) == 2
    assert found[0].startswith("MASTODON_BASE_URL is not set")
    assert found[1].startswith("MASTODON_ACCESS_TOKEN is not set")


def test_every_invalid_variable_is_listed_in_one_error() -> None:
    env = {
        "MASTODON_BASE_URL": "ftp://mastodon.example",
        "MASTODON_ACCESS_TOKEN": "   ",
        "REDIS_URL": "http://127.0.0.1:6379",
        "BOT_HASHTAGS": "#fine, not-a-tag",
        "BOT_MAX_MEDIA_BYTES": "forty megabytes",
        "BOT_MEDIA_TIMEOUT": "0",
        "BOT_MAX_IMAGES": "0",
        "BOT_MAX_ATTEMPTS": "-1",
        "BOT_POLL_INTERVAL": "soon",
        "BOT_VISIBILITY_TIMEOUT": "1.5",
        "BOT_TASK_TIME_LIMIT": "-5",
        "BOT_STREAM": "maybe",
        "BOT_ALLOW_PRIVATE_ADDRESSES": "perhaps",
    }
    with pytest.raises(ConfigError) as caught:
        BotConfig.from_env(env)
    found = problems(caught.value)
    named = [p.split(" ", 1)[0].rstrip(":") for p in found]
    assert named == [
        "MASTODON_BASE_URL", "MASTODON_ACCESS_TOKEN", "REDIS_URL", "BOT_HASHTAGS", "BOT_MAX_MEDIA_BYTES",
        "BOT_MEDIA_TIMEOUT", "BOT_MAX_IMAGES", "BOT_MAX_ATTEMPTS", "BOT_POLL_INTERVAL", "BOT_VISIBILITY_TIMEOUT",
        "BOT_TASK_TIME_LIMIT", "BOT_ALLOW_PRIVATE_ADDRESSES", "BOT_STREAM",
    ]
    assert "'not-a-tag'" in found[3]
    assert "got 'forty megabytes'" in found[4]
    base = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t"}
    assert BotConfig.from_env(base | {"BOT_MAX_IMAGES": "4"}).max_images == 4
    # A fifth image would make every larger post's copy a refused post, then a dead letter.
    with pytest.raises(ConfigError, match="BOT_MAX_IMAGES"):
        BotConfig.from_env(base | {"BOT_MAX_IMAGES": "5"})
    assert BotConfig.from_env(base).withdrawal_checks == 50
    assert BotConfig.from_env(base | {"BOT_WITHDRAWAL_CHECKS": "0"}).withdrawal_checks == 0  # off
    for bad in ("-1", "5000", "some"):
        with pytest.raises(ConfigError, match="BOT_WITHDRAWAL_CHECKS"):
            BotConfig.from_env(base | {"BOT_WITHDRAWAL_CHECKS": bad})
    assert BotConfig.from_env(base).late_window_s == 900
    assert BotConfig.from_env(base | {"BOT_LATE_WINDOW": "0"}).late_window_s == 0  # off
    assert BotConfig.from_env(base | {"BOT_LATE_WINDOW": "3600"}).late_window_s == 3600
    for bad in ("-1", "700000", "an hour", "inf"):
        with pytest.raises(ConfigError, match="BOT_LATE_WINDOW"):
            BotConfig.from_env(base | {"BOT_LATE_WINDOW": bad})


def test_valid_configuration_is_parsed() -> None:
    config = BotConfig.from_env({
        "MASTODON_BASE_URL": "https://mastodon.example/",
        "MASTODON_ACCESS_TOKEN": " token ",
        "REDIS_URL": "redis://redis:6379/1",
        "BOT_HASHTAGS": "#Protest, demo #protest",
        "BOT_MAX_MEDIA_BYTES": "1048576",
        "BOT_MEDIA_TIMEOUT": "2.5",
        "BOT_STREAM": "off",
        "BOT_ALLOW_PRIVATE_ADDRESSES": "0",
    })
    assert config.mastodon_base_url == "https://mastodon.example"
    assert config.mastodon_access_token == "token"
    assert config.redis_url == "redis://redis:6379/1"
    assert config.hashtags == ("protest", "demo")
    assert config.max_media_bytes == 1048576 and config.media_timeout_s == 2.5
    assert config.stream is False and config.allow_private_addresses is False
    assert BotConfig.from_env({"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t"}).allow_private_addresses is False
    # an empty value (``BOT_STREAM=`` in .env) is the default, as for every other setting
    empty = BotConfig.from_env({"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t",
                                "BOT_STREAM": " ", "BOT_ALLOW_PRIVATE_ADDRESSES": ""})
    assert empty.stream is True and empty.allow_private_addresses is False


def test_a_time_limit_that_outlasts_the_visibility_timeout_is_flagged() -> None:
    """Redis hands a job still running past the visibility timeout to a second worker (two runs,
    two replies on X, which has no idempotency key): start-up logs say so."""
    base = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t"}
    assert BotConfig.from_env(base).risks() == []  # 600 + 30 < 900
    [risk] = BotConfig.from_env(base | {"BOT_TASK_TIME_LIMIT": "880"}).risks()
    assert "BOT_TASK_TIME_LIMIT (880)" in risk and "BOT_VISIBILITY_TIMEOUT (900)" in risk
    assert BotConfig.from_env(base | {"BOT_TASK_TIME_LIMIT": "880", "BOT_VISIBILITY_TIMEOUT": "1200"}).risks() == []


def test_a_proxy_from_the_environment_is_flagged_without_its_password() -> None:
    """Through a proxy, the proxy opens the download's connection: the address check the bot
    makes as a connection opens (against DNS rebinding) cannot run, so start-up says so, naming
    the variable and never its value (a proxy URL may carry a password)."""
    base = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t"}
    [risk] = BotConfig.from_env(base | {"HTTPS_PROXY": "http://ops:s3cret@proxy.internal:3128"}).risks()
    assert risk.startswith("HTTPS_PROXY set: media downloads go through that proxy") and "private" in risk
    assert "s3cret" not in risk and "proxy.internal" not in risk
    [both] = BotConfig.from_env(base | {"http_proxy": "http://p:3128", "ALL_PROXY": "socks5://p:1080"}).risks()
    assert both.startswith("http_proxy and ALL_PROXY set")
    assert BotConfig.from_env(base | {"HTTPS_PROXY": " "}).risks() == []  # empty: no proxy
    # tests against a local fake server allow private addresses anyway: nothing to warn about
    assert BotConfig.from_env(base | {"HTTPS_PROXY": "http://p:3128", "BOT_ALLOW_PRIVATE_ADDRESSES": "1"}).risks() == []


def test_a_redis_url_the_broker_cannot_use_is_refused() -> None:
    """REDIS_URL is the Celery broker's URL and the store's: Kombu knows no unix:// transport
    (the worker and the listener failed at start with "No such transport: unix"), and redis-py
    no redis+socket://, so neither passes the start-up check."""
    from kombu import Connection

    base = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t"}
    for url in ("unix:///run/redis/redis.sock", "redis+socket:///run/redis/redis.sock"):
        with pytest.raises(ConfigError) as raised:
            BotConfig.from_env(base | {"REDIS_URL": url})
        assert "REDIS_URL" in str(raised.value)
    for url in ("redis://redis:6379/1", "rediss://redis:6380/0"):
        assert Connection(BotConfig.from_env(base | {"REDIS_URL": url}).redis_url).transport.driver_type == "redis"


def test_worker_locators_are_chosen_by_name() -> None:
    """``ANON_LOCATORS`` picks the worker's locators (e.g. CPU workers without LSC-CNN when the
    weights folder is shared with GPU workers); unknown names are refused at start."""
    base = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t"}
    assert BotConfig.from_env(base).locators is None
    assert BotConfig.from_env(base | {"ANON_LOCATORS": "CenterFace, heads,centerface"}).locators == ("centerface", "heads")
    with pytest.raises(ConfigError, match="ANON_LOCATORS: unknown locator.*yolo"):
        BotConfig.from_env(base | {"ANON_LOCATORS": "centerface,yolo"})


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without bot settings, and no ``.env`` read (a developer's own
    ``.env`` in this checkout must not change what the tests see)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTODON_", "BOT_", "REDIS_"))}
    return env | {"BOT_ENV_FILE": ""} | extra


def test_listener_refuses_to_start_and_lists_the_problems() -> None:
    done = subprocess.run([sys.executable, "-m", "bot", "listen"], cwd=REPO,
                          env=clean_env(BOT_MAX_ATTEMPTS="x", BOT_HEARTBEAT_INTERVAL="0"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "MASTODON_BASE_URL is not set" in done.stderr and "BOT_MAX_ATTEMPTS must be an integer" in done.stderr
    assert "BOT_HEARTBEAT_INTERVAL" in done.stderr  # the fleet's settings in the same list
    assert "Traceback" not in done.stderr


def test_worker_refuses_to_start_and_lists_the_problems() -> None:
    # Redis is unreachable on purpose: the worker must stop on the configuration, not retry Redis.
    try:
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "bot.tasks", "worker", "--pool", "solo", "-n", "badconfig@%h",
             "--without-mingle", "--without-gossip"],
            cwd=REPO, env=clean_env(REDIS_URL="redis://127.0.0.1:9/0", MASTODON_BASE_URL="https://m.example", BOT_STREAM="maybe",
                                    BOT_GPU_QUEUE_LIMIT="x", ANON_MAX_INPUT_BYTES="abc", ANON_ONNX_THREADS="-3"),
            capture_output=True, text=True, timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the worker started despite an invalid configuration (and kept retrying Redis)")
    assert done.returncode != 0
    assert "MASTODON_ACCESS_TOKEN is not set" in done.stderr and "BOT_STREAM" in done.stderr
    # The fleet's and the anonymiser's settings too, in the same list: the anonymiser's were
    # once read only by the first job, so a worker announced itself ready and failed every job.
    for name in ("BOT_GPU_QUEUE_LIMIT", "ANON_MAX_INPUT_BYTES must be an integer", "ANON_ONNX_THREADS must be at least 0"):
        assert name in done.stderr
    assert "Cannot connect to redis" not in done.stderr


def test_startup_check_lists_every_setting_a_process_reads() -> None:
    """One list for the bot's, the fleet's and (workers only; GPU workers also LSC-CNN's) the
    anonymiser's settings; a GPU role is recognised even when another fleet setting is bad."""
    env = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t", "BOT_WORKER_ROLE": "gpu",
           "BOT_HEARTBEAT_INTERVAL": "0", "ANON_MAX_OUTPUT_BYTES": "big", "ANON_LSCCNN_PRECISION": "fp8"}
    with pytest.raises(ConfigError) as worker:
        check_startup(worker=True, environ=env)
    names = ("BOT_HEARTBEAT_INTERVAL", "ANON_MAX_OUTPUT_BYTES", "ANON_LSCCNN_PRECISION")
    assert len(worker.value.problems) == 3
    assert all(name in problem for name, problem in zip(names, worker.value.problems))
    with pytest.raises(ConfigError) as listener:
        check_startup(worker=False, environ=env)
    assert listener.value.problems == worker.value.problems[:1]
    good = {k: v for k, v in env.items() if k in ("MASTODON_BASE_URL", "MASTODON_ACCESS_TOKEN")}
    assert check_startup(worker=True, environ=good) == BotConfig.from_env(good)


def test_bot_check_and_help() -> None:
    """``python -m bot check`` validates without starting anything; ``--help`` anywhere prints
    the commands (it once started the listener when given after ``listen``)."""
    def bot(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bot", *args], cwd=REPO, env=clean_env(**env),
                              capture_output=True, text=True, timeout=60)

    good = bot("check", MASTODON_BASE_URL="https://m.example", MASTODON_ACCESS_TOKEN="t")
    assert good.returncode == 0 and "configuration ok" in good.stdout
    bad = bot("check", MASTODON_BASE_URL="https://m.example", ANON_MAX_INPUT_BYTES="abc")
    assert bad.returncode == 2 and "MASTODON_ACCESS_TOKEN is not set" in bad.stderr and "ANON_MAX_INPUT_BYTES" in bad.stderr
    x_keys = {name: "k" for name, _ in X_VARIABLES}
    tagged = bot("check", MASTODON_BASE_URL="https://m.example", MASTODON_ACCESS_TOKEN="t", BOT_HASHTAGS="protest", **x_keys)
    assert tagged.returncode == 0 and "warning: BOT_HASHTAGS is not watched on X" in tagged.stderr
    for args in (("--help",), ("listen", "--help")):
        helped = bot(*args)
        assert helped.returncode == 0 and "listen | run | check" in helped.stdout
    assert bot("bogus").returncode == 2


def test_main_job_runs_the_demo_only_without_any_credential(tmp_path: Path) -> None:
    """``scripts/run`` with some credentials (a URL without its token, as a half-filled
    .env.example leaves it) refuses with the missing ones named, instead of quietly running
    the offline demo as if nothing had been configured."""
    assert not credentials_given({}) and not credentials_given({"MASTODON_BASE_URL": " "})
    assert credentials_given({"MASTODON_BASE_URL": "https://m.example"}) and credentials_given({"X_API_KEY": "k"})
    done = subprocess.run([str(REPO / "scripts" / "run"), str(tmp_path / "out")], cwd=REPO,
                          env=clean_env(MASTODON_BASE_URL="https://m.example"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "MASTODON_ACCESS_TOKEN is not set" in done.stderr and "offline demo" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["BOT_POLL_INTERVAL", "BOT_MEDIA_TIMEOUT"])
@pytest.mark.parametrize("raw", ["inf", "nan"])
def test_numbers_must_be_finite(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        BotConfig.from_env({"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t", name: raw})


def test_a_bad_visibility_timeout_does_not_break_importing_the_tasks() -> None:
    """The tasks module reads two settings at import; a bad value must reach the operator as the
    usual list of problems at start-up, not as a traceback from the import."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "BOT_VISIBILITY_TIMEOUT": "1.5", "BOT_TASK_TIME_LIMIT": "soon",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", "import bot.tasks as t; print(t._VISIBILITY_TIMEOUT_S, t._TIME_LIMIT_S)"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["900", "600"]


def test_env_file_fills_in_what_the_environment_does_not_set(tmp_path: Path) -> None:
    """``.env`` lines as a shell would read them; the environment wins; every bad line is named."""
    (tmp_path / ".env").write_text(
        "# comment\n\nMASTODON_BASE_URL=https://m.example\nexport MASTODON_ACCESS_TOKEN='t$ok'\n"
        'BOT_HASHTAGS="protest demo" # two\nBOT_MAX_ATTEMPTS=7 # seven\nREDIS_URL=redis://from-file/0\n')
    env = {"BOT_ENV_FILE": str(tmp_path / ".env"), "REDIS_URL": "redis://from-env/0"}
    assert sorted(load_env_file(env)) == ["BOT_HASHTAGS", "BOT_MAX_ATTEMPTS", "MASTODON_ACCESS_TOKEN", "MASTODON_BASE_URL"]
    assert env["MASTODON_ACCESS_TOKEN"] == "t$ok" and env["BOT_HASHTAGS"] == "protest demo"
    assert env["BOT_MAX_ATTEMPTS"] == "7" and env["REDIS_URL"] == "redis://from-env/0"

    (tmp_path / "bad.env").write_text('A=$HOME\nB=two words\nC="open\nD=fine\nnot a line\n')
    with pytest.raises(ConfigError) as caught:
        load_env_file({"BOT_ENV_FILE": str(tmp_path / "bad.env")})
    assert [p.split(":")[0].rsplit(" ", 1)[-1] for p in problems(caught.value)] == ["1", "2", "3", "5"]
    assert "single quotes" in problems(caught.value)[0]
    assert load_env_file({"BOT_ENV_FILE": ""}) == []
    (tmp_path / "editor.env").write_bytes("\ufeffA=1\r\nexport\tB=2\t# tab\r\nC=\"x\\$y\"\r\n".encode())
    edited = {"BOT_ENV_FILE": str(tmp_path / "editor.env")}
    load_env_file(edited)
    assert (edited["A"], edited["B"], edited["C"]) == ("1", "2", "x$y")  # a BOM, CRLF, tabs, an escaped $
    (tmp_path / "odd.env").write_text("A=x'y\nB='x'#c\nC=a`id`\nD=x\0y\nE=\u00e9\u2028F=1\n")
    with pytest.raises(ConfigError) as caught:  # what a shell reads otherwise, or not at all
        load_env_file({"BOT_ENV_FILE": str(tmp_path / "odd.env")})
    assert [p.split(":")[0].rsplit(" ", 1)[-1] for p in problems(caught.value)] == ["1", "2", "3", "4", "5"]
    (tmp_path / "nested.env").write_text("BOT_ENV_FILE=other.env\n")
    with pytest.raises(ConfigError, match="line 1: BOT_ENV_FILE belongs in the environment"):
        load_env_file({"BOT_ENV_FILE": str(tmp_path / "nested.env")})
    with pytest.raises(ConfigError, match="no such file"):
        load_env_file({"BOT_ENV_FILE": str(tmp_path / "missing.env")})


def test_bot_commands_and_the_worker_read_env_in_their_directory(tmp_path: Path) -> None:
    """``python -m bot check`` and the Celery worker read ``.env`` in their working directory (it
    once took ``scripts/run`` to load it, so ``check`` refused a complete ``.env``); a broken
    file stops both with the line at fault."""
    env = clean_env(PYTHONPATH=str(REPO))
    del env["BOT_ENV_FILE"]
    (tmp_path / ".env").write_text("MASTODON_BASE_URL=https://m.example\nMASTODON_ACCESS_TOKEN=t\n")

    def run(*command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *command], cwd=tmp_path, env=env | extra,
                              capture_output=True, text=True, timeout=60)

    good = run("-m", "bot", "check")
    assert good.returncode == 0 and "configuration ok" in good.stdout, good.stderr
    overridden = run("-m", "bot", "check", MASTODON_ACCESS_TOKEN="")
    assert overridden.returncode == 2 and "MASTODON_ACCESS_TOKEN is not set" in overridden.stderr
    read = run("-c", "import os, bot.tasks; print(os.environ['MASTODON_ACCESS_TOKEN'])")
    assert read.stdout.strip() == "t", read.stderr
    # Read before the metrics module picks its mode: BOT_METRICS_PORT in .env alone must put a
    # prefork worker's children's counts in the shared (multiprocess) registry.
    (tmp_path / ".env").write_text("MASTODON_BASE_URL=https://m.example\nMASTODON_ACCESS_TOKEN=t\nBOT_METRICS_PORT=9\n")
    mode = run("-c", "import os, bot.tasks; print(os.environ.get('PROMETHEUS_MULTIPROC_DIR', '-'))", TMPDIR=str(tmp_path))
    assert mode.stdout.strip().startswith(str(tmp_path / "ppb-metrics-")), mode.stderr

    (tmp_path / ".env").write_text("MASTODON_BASE_URL=https://m.example\nMASTODON_ACCESS_TOKEN=$TOKEN\n")
    broken = run("-m", "bot", "check")
    assert broken.returncode == 2 and ".env line 2" in broken.stderr
    worker = run("-m", "celery", "-A", "bot.tasks", "worker", "--pool", "solo", "-n", "envfile@%h",
                 "--without-mingle", "--without-gossip", REDIS_URL="redis://127.0.0.1:9/0")
    assert worker.returncode == 2 and ".env line 2" in worker.stderr


def test_check_reports_what_the_worker_would_refuse(tmp_path: Path) -> None:
    """``python -m bot check`` (exit 0: "a worker and a listener would start") checks the
    locators' weights and a GPU worker's checkpoint settings, which a worker refused at start
    although the check had passed them."""
    env = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t", "ANON_WEIGHTS_DIR": str(tmp_path)}
    with pytest.raises(ConfigError) as caught:
        check_startup(worker=True, environ=env | {"ANON_LOCATORS": "centerface,lsccnn"})
    assert problems(caught.value) == [f"cannot load the models: weights for lsccnn are not in {tmp_path}; see weights/README.md"]
    check_startup(worker=False, environ=env | {"ANON_LOCATORS": "centerface,lsccnn"})  # a listener loads no model
    with pytest.raises(ConfigError) as caught:
        check_startup(worker=True, environ=env | {"BOT_WORKER_ROLE": "gpu", "ANON_LOCATORS": "centerface",
                                                  "ANON_LSCCNN_MD5": "zz", "ANON_LSCCNN_SIZE": "big"})
    [found] = problems(caught.value)
    assert "ANON_LSCCNN_MD5 must be 32 hex digits" in found and "ANON_LSCCNN_SIZE must be a positive number" in found
    assert check_startup(worker=True, environ=env | {"ANON_LOCATORS": "centerface"}).locators == ("centerface",)
    typo = env | {"ANON_WEIGHTS_DIR": str(tmp_path / "wieghts")}  # CenterFace alone would run: refused
    with pytest.raises(ConfigError, match="ANON_WEIGHTS_DIR=.*wieghts is not a folder"):
        check_startup(worker=True, environ=typo)
    check_startup(worker=False, environ=typo)  # the listener needs no weights
    check_startup(worker=True, environ=typo | {"ANON_LOCATORS": "centerface"})  # nor does CenterFace


def test_every_bad_anonymiser_variable_is_named() -> None:
    """Not only the first bad ``ANON_MAX_*`` or ``ANON_ONNX_*``, and by the variable's name (an
    out-of-range value was named by an internal field, ``max_input_bytes``)."""
    env = {"MASTODON_BASE_URL": "https://m.example", "MASTODON_ACCESS_TOKEN": "t", "ANON_MAX_INPUT_BYTES": "0",
           "ANON_MAX_OUTPUT_PIXELS": "y", "ANON_MAX_ASPECT_RATIO": "abc", "ANON_ONNX_THREADS": "x",
           "ANON_ONNX_TILE_BATCH": "99", "ANON_ONNX_GPU_RUNS": "0", "ANON_ONNX_GPU_MEMORY_MB": "10"}
    with pytest.raises(ConfigError) as caught:
        check_startup(worker=True, environ=env)
    text = "\n".join(problems(caught.value))
    for expected in ("ANON_MAX_INPUT_BYTES must be positive, got 0", "ANON_MAX_OUTPUT_PIXELS must be an integer",
                     "ANON_MAX_ASPECT_RATIO must be an integer", "ANON_ONNX_THREADS must be an integer",
                     "ANON_ONNX_TILE_BATCH must be between 1 and", "ANON_ONNX_GPU_RUNS must be between 1 and",
                     "ANON_ONNX_GPU_MEMORY_MB must be at least 512, got 10"):
        assert expected in text, text
