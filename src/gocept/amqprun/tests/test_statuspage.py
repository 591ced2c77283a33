"""The status page: rendered by the real daemon, read over HTTP, and
driven in a real browser (Debian's chromium through playwright)."""

import html
import os
import re
import shutil

import pytest

import gocept.amqprun.stats
import gocept.amqprun.statuspage
from gocept.amqprun.testing import wait_for
from gocept.amqprun.tests.test_monitor import daemon  # noqa: F401 fixture
from gocept.amqprun.tests.test_monitor import get


TOKEN = 'page-token-0123456789'
HOSTILE = '<script>alert("id")</script>&'


def test_shows_queues_workers_connection_and_parked_messages(
        daemon, amqp_client, name_prefix):  # noqa: F811 fixture
    process = daemon(worker_extra='  retries 0\n', token=TOKEN)
    failing, slow = f'{name_prefix}.failing', f'{name_prefix}.slow'
    amqp_client.send(failing, b'', header={'message_id': HOSTILE})
    wait_for(lambda: amqp_client.count(f'{failing}.parked') == 1)
    slow_id = amqp_client.send(slow, b'')

    def page_with_everything():
        status, text = get(process.url)
        assert status == 200
        return text if ('idle' in text and html.escape(slow_id) in text
                        and 'not fixed yet' in text
                        and '<td class="n bad">1</td>' in text) else None
    page = wait_for(page_with_everything, timeout=30,
                    message='page without the parked and busy messages')
    # Escaped everywhere: no markup of the message id gets through.
    assert HOSTILE not in page
    assert '<script>alert' not in page
    escaped = html.escape(HOSTILE, quote=True)
    assert f'<code>{escaped}</code>' in page
    assert f'data-id="{escaped}"' in page
    assert '<summary>RuntimeError: not fixed yet</summary>' in page
    assert 'Traceback (most recent call last)' in page
    # The queues: handled / retried / parked, last minute and total.
    row = re.search(rf'<tr><td><code>{re.escape(failing)}</code></td>'
                    r'(.*?)</tr>', page).group(1)
    assert row.count('<td class="n">0 / 0</td>') == 2   # handled, retried
    assert '<td class="n">1 / 1</td>' in row            # parked
    # A worker handles the slow message; the other is idle.
    assert f'<td><code>{html.escape(slow_id)}</code></td>' \
           f'<td><code>{slow}</code></td>' in page
    # The connection: the node without its password, since when.
    assert 'amqp://guest@' in page
    assert ':guest@' not in page
    assert '<span class="good">ready</span>' in page
    assert re.search(r'<th>since</th><td>20\d\d-\d\d-\d\d \d\d:\d\d:\d\d '
                     r'UTC \(\d+ s ago\)', page)
    assert '<tr><th>reconnects</th><td>0</td></tr>' in page
    assert TOKEN not in page
    (process.directory / 'go').touch()
    assert process.stop() == 0


def test_recent_counts_about_the_last_minute():
    class Clock:
        now = 0.0

        def __call__(self):
            return self.now
    clock = Clock()
    stats = gocept.amqprun.stats.Stats()
    recent = gocept.amqprun.statuspage.Recent(stats, window=60, clock=clock)
    stats.message('q', 'handled')
    assert recent.counts() == ({('q', 'handled'): 1}, 0.0)
    for second in range(5, 125, 5):
        clock.now = second
        recent.sample()
        if second == 30:
            stats.message('q', 'handled')
            stats.message('q', 'parked')
    clock.now = 122.0
    # The base is the newest sample at least 60 s old (t=60): after both.
    counts, span = recent.counts()
    assert counts == {('q', 'handled'): 0, ('q', 'parked'): 0}
    assert span == 62.0
    stats.message('q', 'handled')
    assert recent.counts()[0][('q', 'handled')] == 1


def browser_or_skip():
    """playwright's sync API, or skip: the browser tests need Python's
    playwright and Debian's chromium (`.ci/run` installs both)."""
    sync_api = pytest.importorskip(
        'playwright.sync_api', reason='playwright is not installed')
    if not os.path.exists(CHROMIUM) and not shutil.which('chromium'):
        pytest.skip('chromium is not installed')
    return sync_api


CHROMIUM = '/usr/bin/chromium'
# Root needs --no-sandbox; without the background networking the browser
# tries hosts this machine cannot reach.
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic',
                 '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']


def test_replay_from_the_page_in_a_browser(
        daemon, amqp_client, name_prefix, tmp_path):  # noqa: F811 fixture
    sync_api = browser_or_skip()
    process = daemon(worker_extra='  retries 0\n', token=TOKEN)
    failing = f'{name_prefix}.failing'
    message_id = amqp_client.send(failing, b'from the page',
                                  header={'message_id': 'browser-1'})
    wait_for(lambda: amqp_client.count(f'{failing}.parked') == 1)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which('chromium') or CHROMIUM,
            args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on('pageerror', lambda error: errors.append(error))
            page.goto(process.url)
            row = page.locator('tr', has_text=message_id)
            sync_api.expect(row).to_contain_text(
                'RuntimeError: not fixed yet', timeout=15000)
            # The depths arrive within a second or two of the start.
            sync_api.expect(page.locator('td.bad')).to_have_text(
                '1', timeout=15000)
            page.screenshot(path=str(tmp_path / 'status-page-parked.png'),
                            full_page=True)
            # Without a token: asked for.
            row.get_by_role('button', name='replay').click()
            sync_api.expect(page.locator('#said')).to_have_text(
                'Enter the token first.')
            # A wrong token is refused and forgotten.
            page.fill('#token', 'wrong')
            page.click('#use')
            sync_api.expect(page.locator('#token-state')).to_have_text(
                'Token given (kept for this tab).')
            row.get_by_role('button', name='replay').click()
            sync_api.expect(page.locator('#said')).to_have_text(
                'The token was refused; enter it again.')
            assert amqp_client.count(f'{failing}.parked') == 1
            # The handler is fixed meanwhile; the right token replays.
            (process.directory / 'fixed').touch()
            page.fill('#token', TOKEN)
            page.click('#use')
            page.locator('tr', has_text=message_id).get_by_role(
                'button', name='replay').click()
            sync_api.expect(page.locator('#said')).to_contain_text(
                f'replayed 1 message(s) of {failing}: {message_id}',
                timeout=15000)
            reply = amqp_client.wait(f'{name_prefix}.out', timeout=15)
            assert reply.body == b'fixed: from the page'
            # After the reload: gone from the page, the token kept.
            sync_api.expect(page.locator('tr', has_text=message_id)) \
                .to_have_count(0)
            sync_api.expect(page.locator('#token-state')).to_have_text(
                'Token given (kept for this tab).')
            page.screenshot(path=str(tmp_path / 'status-page.png'),
                            full_page=True)
            assert errors == []
        finally:
            browser.close()
    assert (tmp_path / 'status-page.png').stat().st_size > 0
    assert TOKEN not in process.log_text()
    assert process.stop() == 0
