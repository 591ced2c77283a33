"""Echo benchmark: the gocept.amqprun daemon beside raw pika.

Not a test: it prints numbers, it asserts nothing. See README.txt.

Every variant gets the same workload: N persistent messages of SIZE bytes
pre-published to a fresh durable queue bound to amq.topic; a consumer
answers each one with one reply (routed to a fresh output queue) and ACKs
the request. The clock runs from "consuming" until the output queue holds N
replies (polled with a passive queue.declare).

Variants (interleaved, ROUNDS times; medians are printed):

  daemon   `python -m gocept.amqprun server.conf`: the real main(), a
           ZCML-registered echo handler, K worker threads
  daemon-confirm
           the same with `commit-mode confirm` (publisher confirms
           instead of transactions; that mode's default prefetch)
  raw-a    pika: publish + ack + tx_commit per message, one channel
  raw-b    the same with K connections in K threads committing concurrently
  raw-c    pika: publish + ack, no transaction, one channel (an
           asynchronous SelectConnection client, prefetch 100)
  raw-d    (only if asked for) K connections in K threads with publisher
           confirms: publish, wait for its confirm, then ack -- what the
           opt-in confirm mode would do, K confirms outstanding
  raw-e    one channel, publisher confirms handled asynchronously:
           publish at once, ack each delivery when its reply is confirmed
           (up to the raw-c prefetch outstanding)

Every consumer is a process of its own, so its CPU time (utime + stime) and
peak RSS (VmHWM) come from /proc/<pid>; the broker's CPU comes from the
beam.smp process when /proc lets us read it.

Extras (once, after the rounds): start-to-consuming, SIGTERM-to-exit with
K busy workers, and RSS while consuming a large backlog.

This file runs the rounds and the extras and prints the report; the
consumers live in daemon.py and raw.py, the queues in workload.py, the
/proc readings in procstat.py.
"""

import argparse
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import pika

from daemon import Daemon
from procstat import (
    cpu_seconds, find_broker_pid, load, status_kb, thread_cpu_seconds)
from raw import Raw
from workload import Broker, Workload, sweep_queues


WORKDIR = None   # daemon directories go here (see main)


# One measurement

def measure(consumer, workload, broker_pid, wait_ready, interval=0.02,
            py_spy=None):
    """Start `consumer`, return a dict of numbers.

    `consumer` has start() (setting `started_at`, a time.monotonic()),
    `pid`, `process` (a Popen) and stop(); `wait_ready(consumer)` returns
    the time.monotonic() at which it began consuming. The run ends when
    `workload` holds all its replies."""
    consumer.start()
    t_ready = wait_ready(consumer)
    spy = None
    if py_spy:
        # Samples while consuming; its own CPU is another process's.
        spy = subprocess.Popen(
            [str(pathlib.Path(sys.executable).with_name('py-spy')),
             'record', '--pid', str(consumer.pid), '--threads',
             '--nonblocking', '--rate', '200', '--format', 'raw',
             '--output', py_spy], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    cpu0 = cpu_seconds(consumer.pid)
    threads0 = thread_cpu_seconds(consumer.pid)
    bcpu0 = cpu_seconds(broker_pid) if broker_pid else None
    first = None
    deadline = t_ready + 120 + workload.count / 200
    while True:
        n = workload.replies()
        now = time.monotonic()
        if n and first is None:
            first = now
        if n >= workload.count:
            break
        if consumer.process.poll() is not None and \
                workload.replies() < workload.count:
            raise RuntimeError(
                f'consumer exited with {consumer.process.returncode} '
                f'after {n} replies')
        if now > deadline:
            raise RuntimeError(f'only {n} of {workload.count} replies')
        time.sleep(interval)
    t_end = time.monotonic()
    cpu1 = cpu_seconds(consumer.pid)
    threads1 = thread_cpu_seconds(consumer.pid)
    bcpu1 = cpu_seconds(broker_pid) if broker_pid else None
    rss = status_kb(consumer.pid, 'VmHWM')
    consumer.stop()
    if spy is not None:
        spy.wait(30)
    elapsed = t_end - t_ready
    # The busiest thread: the daemon's IO thread (its saturation caps the
    # throughput), or the raw consumers' busiest connection thread.
    busiest = max((threads1[tid] - threads0.get(tid, 0)
                   for tid in threads1), default=None)
    result = dict(
        busiest_pct=busiest * 100 / elapsed if busiest is not None
        else None,
        rate=workload.count / elapsed,
        cpu_ms=(cpu1 - cpu0) * 1000 / workload.count
        if cpu0 is not None and cpu1 is not None else None,
        rss_mb=rss / 1024 if rss else None,
        broker_ms=(bcpu1 - bcpu0) * 1000 / workload.count
        if bcpu0 is not None and bcpu1 is not None else None,
        start=t_ready - consumer.started_at,
        first_reply=(first or t_end) - consumer.started_at,
        load=load()[0],
    )
    return result


def run_daemon(broker, args, broker_pid, round_=0, confirm=False):
    workload = Workload(broker, args.messages, args.size)
    daemon = Daemon(workload, args, WORKDIR, confirm=confirm)
    spy = None
    if args.py_spy:
        spy = f'{args.py_spy}{"-confirm" if confirm else ""}-{round_ + 1}.txt'
    try:
        return measure(daemon, workload, broker_pid, Daemon.wait_started,
                       py_spy=spy)
    finally:
        if daemon.process and daemon.process.poll() is None:
            daemon.stop()
        workload.delete()


def run_raw(mode, broker, args, broker_pid):
    workload = Workload(broker, args.messages, args.size)
    connections = args.workers if mode in ('b', 'd') else 1
    raw = Raw(mode[0], workload, args, connections)
    try:
        return measure(raw, workload, broker_pid, Raw.wait_ready)
    finally:
        if raw.process.poll() is None:
            raw.process.kill()
            raw.stop()
        workload.delete()


# Extras

def sigterm_busy(broker, args, sleep=0.2):
    """Seconds from SIGTERM to exit with all workers inside a handler
    that sleeps `sleep` s; and whether every message is either replied
    to or back in the input queue."""
    count = args.workers * 20
    workload = Workload(broker, count, args.size)
    daemon = Daemon(workload, args, WORKDIR, sleep=sleep)
    try:
        daemon.start()
        daemon.wait_started()
        time.sleep(max(0.5, 3 * sleep))
        t0 = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(120)
        elapsed = time.monotonic() - t0
        daemon.output.close()
        time.sleep(0.5)   # let the broker requeue what was unacked
        replies, left = workload.replies(), broker.count(workload.input)
        return dict(seconds=elapsed, code=code, replies=replies,
                    requeued=left, total_ok=replies + left == count)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        workload.delete()


def backlog_rss(broker, args, broker_pid):
    """Peak RSS while consuming a backlog of args.backlog messages for
    args.backlog_seconds seconds."""
    workload = Workload(broker, args.backlog, args.size, fill=False)
    try:
        t0 = time.monotonic()
        broker.prefill(workload.input, workload.input_key, args.backlog,
                       args.size)
        fill = time.monotonic() - t0
        daemon = Daemon(workload, args, WORKDIR)
        daemon.start()
        t_ready = daemon.wait_started()
        cpu0 = cpu_seconds(daemon.pid)
        n0 = workload.replies()
        samples = []
        while time.monotonic() - t_ready < args.backlog_seconds:
            samples.append(status_kb(daemon.pid, 'VmRSS') or 0)
            time.sleep(0.25)
        n1 = workload.replies()
        cpu1 = cpu_seconds(daemon.pid)
        hwm = status_kb(daemon.pid, 'VmHWM')
        elapsed = time.monotonic() - t_ready
        daemon.stop()
        return dict(
            backlog=args.backlog, fill_seconds=fill,
            hwm_mb=hwm / 1024, rss_mb=max(samples) / 1024,
            consumed=n1, rate=(n1 - n0) / elapsed,
            cpu_ms=(cpu1 - cpu0) * 1000 / max(1, n1 - n0))
    finally:
        workload.delete()


# Output

def fmt(value, spec):
    return '-' if value is None else format(value, spec)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(results, args):
    names = list(results)
    med = {name: {key: median([r[key] for r in results[name]])
                  for key in results[name][0]} for name in names}
    print()
    print(f'{args.messages} messages x {args.size} B, persistent; '
          f'K={args.workers}; {args.rounds} round(s); medians')
    print(f'{"variant":<15}{"msg/s":>9}{"min":>8}{"max":>8}'
          f'{"cpu ms/msg":>12}{"busiest thr":>13}{"broker ms/msg":>15}'
          f'{"peak RSS MB":>13}{"load":>7}')
    for name in names:
        m = med[name]
        rates = [r['rate'] for r in results[name]]
        print(f'{name:<15}{m["rate"]:>9.0f}{min(rates):>8.0f}'
              f'{max(rates):>8.0f}{fmt(m["cpu_ms"], ".3f"):>12}'
              f'{fmt(m["busiest_pct"], ".0f"):>12}%'
              f'{fmt(m["broker_ms"], ".3f"):>15}'
              f'{fmt(m["rss_mb"], ".1f"):>13}{m["load"]:>7.2f}')
    daemons = [name for name in names if name in DAEMONS]
    raws = [name for name in names if name not in DAEMONS]
    for daemon in daemons:
        d = med[daemon]['rate']
        print()
        for name in raws:
            ratio = d / med[name]['rate']
            target = TARGETS.get((daemon, name))
            note = ''
            if target is not None:
                met = 'met' if ratio >= target else 'MISSED'
                note = f'  (target >= {target}: {met})'
            print(f'{daemon} / {name:<5} = {ratio:.2f}{note}')
    for daemon in daemons:
        if daemon == daemons[0]:
            print()
        print(f'{daemon} start to consuming ("Started." logged): '
              f'{med[daemon]["start"]:.2f} s; to first reply: '
              f'{med[daemon]["first_reply"]:.2f} s (medians)')


DAEMONS = ('daemon', 'daemon-confirm')
# The issue's targets: the daemon's rate relative to a raw reference.
TARGETS = {('daemon', 'raw-a'): 2, ('daemon', 'raw-b'): 0.9,
           ('daemon-confirm', 'raw-c'): 0.6}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--messages', '-n', type=int, default=20000)
    parser.add_argument('--workers', '-k', type=int, default=8)
    parser.add_argument('--rounds', '-r', type=int, default=3)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=5672)
    parser.add_argument('--prefetch', type=int, default=None,
                        help='the daemon\'s prefetch (default: its own)')
    parser.add_argument('--confirm-prefetch', type=int, default=None,
                        help='daemon-confirm\'s prefetch (default: the '
                        'confirm mode\'s own)')
    parser.add_argument('--raw-prefetch', type=int, default=2,
                        help='prefetch of the raw tx consumers (a, b)')
    parser.add_argument('--raw-c-prefetch', type=int, default=100,
                        help='prefetch of the raw no-tx consumer (c)')
    parser.add_argument('--py-spy', metavar='PREFIX', default=None,
                        help='record each daemon run with py-spy into '
                        'PREFIX-<round>.txt (collapsed stacks, per thread)')
    parser.add_argument('--worker-extra', default='',
                        help='more lines for the daemon\'s <worker>')
    parser.add_argument(
        '--variants', default='daemon,daemon-confirm,raw-a,raw-b,raw-c,raw-e',
        help='comma-separated subset of daemon,daemon-confirm,raw-a,raw-b,'
        'raw-c,raw-d,raw-e')
    parser.add_argument('--no-extras', action='store_true',
                        help='skip the SIGTERM and backlog measurements')
    parser.add_argument('--backlog', type=int, default=200000,
                        help='backlog size for the RSS measurement '
                        '(0: skip)')
    parser.add_argument('--backlog-seconds', type=float, default=15)
    parser.add_argument('--keep', action='store_true',
                        help='keep the daemons\' directories (config, log)')
    args = parser.parse_args(argv)
    variants = args.variants.split(',')
    known = DAEMONS + ('raw-a', 'raw-b', 'raw-c', 'raw-d', 'raw-e')
    unknown = [name for name in variants if name not in known]
    if unknown:
        parser.error(f'unknown variant(s): {", ".join(unknown)}')
    global WORKDIR
    WORKDIR = tempfile.mkdtemp(prefix='amqprun-bench-')

    broker_pid = find_broker_pid(args.port)
    if broker_pid and cpu_seconds(broker_pid) is None:
        broker_pid = None
    print(f'{time.strftime("%Y-%m-%d %H:%M:%S")}  {os.uname().nodename}  '
          f'{os.cpu_count()} CPUs  Python {sys.version.split()[0]}  '
          f'pika {pika.__version__}  broker pid {broker_pid or "unreadable"}')
    print('load average before: %.2f %.2f %.2f' % load())
    broker = Broker(args.host, args.port)
    results = {name: [] for name in variants}
    try:
        for round_ in range(args.rounds):
            for name in variants:
                if name in DAEMONS:
                    r = run_daemon(broker, args, broker_pid, round_,
                                   confirm=name == 'daemon-confirm')
                else:
                    r = run_raw(name.split('-')[1], broker, args, broker_pid)
                results[name].append(r)
                print(f'round {round_ + 1} {name:<14} {r["rate"]:7.0f} msg/s'
                      f'  cpu {fmt(r["cpu_ms"], ".3f")} ms/msg'
                      f' (busiest thread {fmt(r["busiest_pct"], ".0f")}%)'
                      f'  broker {fmt(r["broker_ms"], ".3f")} ms/msg'
                      f'  rss {fmt(r["rss_mb"], ".1f")} MB'
                      f'  load {r["load"]:.2f}', flush=True)
        report(results, args)
        if not args.no_extras:
            print()
            s = sigterm_busy(broker, args)
            print(f'SIGTERM to exit, {args.workers} workers busy in a 0.2 s '
                  f'handler: {s["seconds"]:.2f} s (exit {s["code"]}; '
                  f'{s["replies"]} replied + {s["requeued"]} requeued = '
                  f'{"all" if s["total_ok"] else "NOT all"} messages)')
            if args.backlog:
                b = backlog_rss(broker, args, broker_pid)
                print(f'backlog {b["backlog"]} (filled in '
                      f'{b["fill_seconds"]:.0f} s): peak RSS '
                      f'{b["hwm_mb"]:.1f} MB (VmHWM; max sampled VmRSS '
                      f'{b["rss_mb"]:.1f} MB) while consuming '
                      f'{b["consumed"]} in {args.backlog_seconds:.0f} s '
                      f'({b["rate"]:.0f} msg/s, {b["cpu_ms"]:.3f} ms/msg)')
        print('load average after: %.2f %.2f %.2f' % load())
    finally:
        sweep_queues(broker)
        broker.close()
        if args.keep:
            print(f'daemon directories kept in {WORKDIR}')
        else:
            shutil.rmtree(WORKDIR, ignore_errors=True)


if __name__ == '__main__':
    main()
