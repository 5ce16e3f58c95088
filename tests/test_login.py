"""The password login: right credentials in, wrong ones out, and repeated failures slowed down,
in the running app (POST /login, as the login page sends it) and in the throttle itself."""

import asyncio
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from studio.ui.login import ThrottledLogin
from tests.app_server import AppServer


def test_failures_past_the_free_ones_wait_longer_each_time_until_a_success():
    waits = []

    async def sleep(seconds):
        waits.append(seconds)

    login = ThrottledLogin("ann", "s3cret", free_attempts=2, first_delay=1.0, max_delay=4.0, sleep=sleep)

    async def attempts():
        results = [await login.check("ann", f"guess{i}") for i in range(6)]
        results.append(await login.check("ann", "s3cret"))
        results.append(await login.check("ann", "wrong"))
        return results

    assert asyncio.run(attempts()) == [False] * 6 + [True, False]
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0], "two free failures, then doubling to the cap; reset by success"
    assert not asyncio.run(login.check("bob", "s3cret")), "the user name counts too"


def post_login(server, user, password) -> tuple[int, float]:
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    started = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(server.url + "login", data=data), timeout=30) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.monotonic() - started


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("auth-app"), "--auth", "ann:s3cret")
    try:
        server.wait_until_serving(timeout=60)
        yield server
    finally:
        server.stop()


def test_the_app_asks_for_the_password_and_slows_down_guessing(locked_app):
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(locked_app.url + "config", timeout=10)  # nothing without logging in
    assert post_login(locked_app, "ann", "s3cret")[0] == 200
    quick = [post_login(locked_app, "ann", f"guess{i}") for i in range(3)]
    assert all(status == 400 for status, _ in quick)
    status, seconds = post_login(locked_app, "ann", "guess3")
    assert status == 400 and seconds >= 0.9, "the fourth failure in a row waits"
    assert post_login(locked_app, "ann", "s3cret")[0] == 200, "the right password still gets in"
