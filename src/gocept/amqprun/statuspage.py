"""The monitor's status page (``GET /``): one self-contained HTML page.

What a person needs to see and act on: per handler queue its backlog,
consumers and what was handled, retried and parked in the last minute
and in total; what each worker does; the connection; the newest parked
messages with their error and replay / drop buttons. Server-rendered,
no external assets (it works offline), a little JavaScript: it reloads
itself every few seconds, asks for the token once (kept in the tab's
sessionStorage) and sends the replay and drop requests with it.

Every value from outside (message ids, errors, queue names) is escaped;
the Content-Security-Policy of `CSP` allows only the page's own script
and style (by hash) and requests to its own origin.
"""

import base64
import collections
import datetime
import hashlib
import html
import os
import socket
import threading
import time

import gocept.amqprun.stats


# Seconds between the page's reloads.
REFRESH = 5
# Parked messages shown (the newest).
PARKED_SHOWN = 50

STYLE = '''
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em;
         text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00; font-weight: bold; } .good { color: #070; }
.muted { color: #777; } code { font-size: .95em; }
details pre { white-space: pre-wrap; max-width: 60em; }
#said { min-height: 1.4em; }
'''

SCRIPT = '''
(function () {
  "use strict";
  var KEY = "amqprun-monitor-token", SAID = "amqprun-monitor-said";
  var form = document.getElementById("token-form");
  var input = document.getElementById("token");
  var state = document.getElementById("token-state");
  var said = document.getElementById("said");
  var busy = false;
  function token() { return sessionStorage.getItem(KEY); }
  function say(text) { said.textContent = text; }
  function show() {
    var known = !!token();
    state.textContent = known ? "Token given (kept for this tab)."
                              : "Replay and drop need the token.";
    document.getElementById("forget").hidden = !known;
    input.hidden = known;
    document.getElementById("use").hidden = known;
  }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var value = input.value.trim();
    input.value = "";
    if (value) { sessionStorage.setItem(KEY, value); say(""); }
    show();
  });
  document.getElementById("forget").addEventListener("click", function () {
    sessionStorage.removeItem(KEY);
    show();
  });
  function act(button) {
    var action = button.getAttribute("data-action");
    var id = button.getAttribute("data-id");
    var queue = button.getAttribute("data-queue");
    if (!token()) { say("Enter the token first."); input.focus(); return; }
    if (action === "drop" &&
        !window.confirm("Drop message " + id + " for good?")) { return; }
    busy = true;
    say(action + ": " + id + " ...");
    fetch("parked/" + action, {
      method: "POST",
      headers: {"Authorization": "Bearer " + token(),
                "Content-Type": "application/json"},
      body: JSON.stringify({queue: queue, ids: [id]})
    }).then(function (response) {
      return response.json().catch(function () { return {}; })
        .then(function (result) {
          busy = false;
          if (response.status === 401) {
            sessionStorage.removeItem(KEY);
            show();
            say("The token was refused; enter it again.");
          } else if (!response.ok) {
            say(action + " failed: " + (result.error || response.status));
          } else {
            sessionStorage.setItem(SAID, result.message || action + " done");
            location.reload();
          }
        });
    }, function (error) { busy = false; say(action + " failed: " + error); });
  }
  var buttons = document.querySelectorAll("button[data-action]");
  for (var i = 0; i < buttons.length; i++) {
    buttons[i].addEventListener("click", function (event) {
      act(event.currentTarget);
    });
  }
  var last = sessionStorage.getItem(SAID);
  if (last) { say(last); sessionStorage.removeItem(SAID); }
  show();
  var seconds = Number(document.body.getAttribute("data-refresh")) || 5;
  setInterval(function () {
    if (!busy && document.activeElement !== input && !input.value) {
      location.reload();
    }
  }, seconds * 1000);
}());
'''


def _hash(text):
    digest = hashlib.sha256(text.encode('utf-8')).digest()
    return "'sha256-" + base64.b64encode(digest).decode('ascii') + "'"


CSP = ("default-src 'none'; "
       f"script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; "
       "connect-src 'self'; img-src 'none'; form-action 'none'; "
       "frame-ancestors 'none'; base-uri 'none'")


class Recent:
    """The outcomes counted in about the last `window` seconds, from
    snapshots of a `stats.Stats` that `sample()` takes (every few
    seconds; thread-safe)."""

    def __init__(self, stats, window=60.0, clock=time.monotonic):
        self.stats = stats
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._samples = collections.deque()   # (time, messages)
        self.sample()

    def sample(self):
        now = self.clock()
        messages = self.stats.snapshot()['messages']
        with self._lock:
            self._samples.append((now, messages))
            # Keep the newest sample older than the window as the base.
            while len(self._samples) > 1 \
                    and now - self._samples[1][0] >= self.window:
                self._samples.popleft()

    def counts(self):
        """({(queue, outcome): n in about the last window}, seconds that
        window really spans), from the base sample to now."""
        current = self.stats.snapshot()['messages']
        with self._lock:
            since, base = self._samples[0]
        counts = {key: n - base.get(key, 0) for key, n in current.items()}
        return counts, self.clock() - since


def _when(timestamp):
    """'YYYY-MM-DD HH:MM:SS UTC' of a time.time() or datetime, or '-'."""
    if timestamp is None:
        return '-'
    if not isinstance(timestamp, datetime.datetime):
        timestamp = datetime.datetime.fromtimestamp(
            timestamp, datetime.timezone.utc)
    return timestamp.astimezone(datetime.timezone.utc).strftime(
        '%Y-%m-%d %H:%M:%S UTC')


def _e(value):
    return html.escape('-' if value is None else str(value), quote=True)


def render(monitor):
    """The page (bytes, UTF-8) for `monitor` (a `monitor.Monitor`)."""
    server = monitor.server
    snapshot = server.stats.snapshot()
    depths = monitor.depths.snapshot() if monitor.depths else {}
    recent, span = monitor.recent.counts()
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width">',
        f'<noscript><meta http-equiv="refresh" content="{REFRESH}">'
        '</noscript>',
        f'<title>amqprun on {_e(socket.gethostname())}</title>',
        f'<style>{STYLE}</style></head>',
        f'<body data-refresh="{REFRESH}">',
        f'<h1>gocept.amqprun on {_e(socket.gethostname())} '
        f'(pid {os.getpid()})</h1>',
    ]
    parts += _connection(monitor, snapshot)
    parts += _queues(server, snapshot, depths, recent, span)
    parts += _workers(server)
    parts += _parked(monitor)
    parts.append(f'<script>{SCRIPT}</script></body></html>\n')
    return ''.join(parts).encode('utf-8')


def _connection(monitor, snapshot):
    server = monitor.server
    connection = server.connection
    if monitor.stopping:
        state = '<span class="bad">shutting down</span>'
    elif server.running:
        state = '<span class="good">ready</span> (consuming every queue)'
    elif server.connected:
        state = '<span class="bad">connected, not consuming every queue'\
            '</span>'
    else:
        state = '<span class="bad">not connected</span>'
    since = connection.connected_since
    ago = f' ({time.time() - since:.0f} s ago)' if since else ''
    return [
        '<h2>Connection</h2><table>',
        f'<tr><th>state</th><td>{state}</td></tr>',
        f'<tr><th>node</th><td><code>{_e(connection.address)}</code>'
        '</td></tr>',
        f'<tr><th>since</th><td>{_e(_when(since))}{ago}</td></tr>',
        f'<tr><th>reconnects</th><td>{snapshot["reconnects"]}</td></tr>',
        '<tr><th>commits in doubt</th>'
        f'<td>{snapshot["commits_in_doubt"]}</td></tr>',
        '</table>',
    ]


def _queues(server, snapshot, depths, recent, span):
    outcomes = gocept.amqprun.stats.OUTCOMES
    parts = [
        '<h2>Queues</h2><table><tr><th>queue</th><th>backlog</th>'
        '<th>consumers</th>',
        *(f'<th>{o}<br><span class="muted">last {span:.0f} s / total'
          '</span></th>' for o in outcomes),
        '<th>parked now</th></tr>']
    totals = snapshot['messages']
    for queue in sorted(server.handlers):
        depth = depths.get(queue)
        parts.append(f'<tr><td><code>{_e(queue)}</code></td>')
        parts.append(f'<td class="n">{_e(depth and depth.messages)}</td>'
                     f'<td class="n">{_e(depth and depth.consumers)}</td>')
        for outcome in outcomes:
            parts.append(
                f'<td class="n">{recent.get((queue, outcome), 0)} / '
                f'{totals.get((queue, outcome), 0)}</td>')
        parked = depth.parked if depth else None
        css = ' bad' if parked else ''
        parts.append(f'<td class="n{css}">{_e(parked)}</td></tr>')
    parts.append('</table>')
    if not depths and server.handlers:
        parts.append('<p class="muted">The broker has not told the queue '
                     'depths yet (or cannot be asked now).</p>')
    return parts


def _workers(server):
    parts = ['<h2>Workers</h2><table><tr><th>worker</th><th>handling</th>'
             '<th>queue</th><th>for</th></tr>']
    for activity in server.activity():
        if activity.seconds is None:
            parts.append(f'<tr><td>{_e(activity.worker)}</td>'
                         '<td class="muted">idle</td><td></td><td></td>'
                         '</tr>')
            continue
        parts.append(
            f'<tr><td>{_e(activity.worker)}</td>'
            f'<td><code>{_e(activity.message_id)}</code></td>'
            f'<td><code>{_e(activity.queue)}</code></td>'
            f'<td class="n">{activity.seconds:.1f} s</td></tr>')
    parts.append('</table>')
    return parts


def _parked(monitor):
    parts = [
        '<h2>Parked messages</h2>',
        '<form id="token-form"><span id="token-state"></span> '
        '<input id="token" type="password" autocomplete="off" '
        'placeholder="token" aria-label="token"> '
        '<button id="use" type="submit">Use token</button> '
        '<button id="forget" type="button" hidden>Forget token</button>'
        '</form><p id="said" role="status"></p>']
    messages, total, problem = monitor.parked.listing(PARKED_SHOWN)
    if problem:
        parts.append(f'<p class="muted">{_e(problem)}</p>')
        return parts
    if not messages:
        parts.append('<p>None.</p>')
        return parts
    shown = (f'The newest {len(messages)} of {total} parked messages:'
             if total > len(messages)
             else f'{total} parked message(s), newest first:')
    parts.append(
        f'<p>{shown}</p><table><tr><th>queue</th><th>message id</th>'
        '<th>parked</th><th>attempts</th><th>error</th><th></th></tr>')
    for message in messages:
        data = (f'data-queue="{_e(message.queue)}" '
                f'data-id="{_e(message.message_id)}"')
        buttons = (
            f'<button type="button" data-action="replay" {data}>replay'
            f'</button> <button type="button" data-action="drop" {data}>'
            'drop</button>') if message.message_id is not None else (
            '<span class="muted">no message id: only "all" reaches it'
            '</span>')
        parts.append(
            f'<tr><td><code>{_e(message.queue)}</code></td>'
            f'<td><code>{_e(message.message_id)}</code></td>'
            f'<td>{_e(_when(message.parked_at))}</td>'
            f'<td class="n">{_e(message.attempts)}</td>'
            f'<td><details><summary>{_e(message.error_line)}</summary>'
            f'<pre>{_e(message.error)}</pre></details></td>'
            f'<td>{buttons}</td></tr>')
    parts.append('</table>')
    return parts
