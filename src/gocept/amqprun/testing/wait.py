"""Waiting for a condition in tests (instead of sleeping)."""

import time


def wait_for(condition, timeout=10, interval=0.02, message=None):
    """Poll `condition` until it returns a true value, which is returned.

    Raises AssertionError after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                message or f'{condition!r} not true within {timeout} s')
        time.sleep(interval)
