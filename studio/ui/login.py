"""The password login (--auth / STUDIO_AUTH) with repeated failures slowed down: Gradio takes an
async callable as `auth`, and this one makes every attempt after a few failures wait, one attempt
at a time, so guessing a password behind a share link or on a Space costs time."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable


class ThrottledLogin:
    """`await login.check(user, password)` -> whether they match, compared in constant time. After
    `free_attempts` failures in a row, each attempt first waits `first_delay` seconds, doubling up
    to `max_delay`; attempts run one at a time, so parallel guesses queue. A success resets it."""

    def __init__(self, user: str, password: str, *, free_attempts: int = 3, first_delay: float = 1.0,
                 max_delay: float = 30.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self._user, self._password = user.encode(), password.encode()
        self.free_attempts, self.first_delay, self.max_delay = free_attempts, first_delay, max_delay
        self.failures = 0
        self._sleep = sleep
        self._lock: asyncio.Lock | None = None

    def delay(self) -> float:
        over = self.failures - self.free_attempts
        return 0.0 if over < 0 else min(self.max_delay, self.first_delay * 2**over)

    async def check(self, user: str, password: str) -> bool:
        """Gradio's `auth` callable. A coroutine function, as Gradio must see it: Gradio awaits only
        what `inspect.iscoroutinefunction` recognises, and an object with an async __call__
        would hand it an (always true) coroutine object instead of the answer."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if wait := self.delay():
                await self._sleep(wait)
            user_ok = hmac.compare_digest(str(user).encode(), self._user)
            password_ok = hmac.compare_digest(str(password).encode(), self._password)
            self.failures = 0 if user_ok and password_ok else self.failures + 1
            return user_ok and password_ok
