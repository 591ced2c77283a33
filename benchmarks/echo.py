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
  raw-g    pika in one thread, tx mode, a group commit by hand: publish
           the reply and ack every delivery at hand, then one tx_commit
           (prefetch 100): what the broker gives transactions
  raw-n    the same blocking thread without a transaction (publish and
           ack, prefetch 100): a plain pika consumer without tx
  daemon-notrace, daemon-sdk
           (only if asked for) `daemon` with tracing switched off (as
           without the `otel` extra), and with OpenTelemetry's SDK (a
           batch processor, spans discarded); `daemon` itself traces as
           installed (opentelemetry-api without an SDK: no-op spans)

Every consumer is a process of its own, so its CPU time (utime + stime) and
peak RSS (VmHWM) come from /proc/<pid>; the broker's CPU comes from the
beam.smp process when /proc lets us read it.

Extras (once, after the rounds): start-to-consuming, SIGTERM-to-exit with
K busy workers, and RSS while consuming a large backlog.

This file owns the variants, the extras and the report's ratios; the
consumers live in daemon.py and raw.py, the queues in workload.py, the
measuring, rounds and table in measure.py, the /proc readings in
procstat.py.
"""

import argparse
import signal
import sys
import time

from daemon import Daemon, variant_settings
from measure import (
    add_common_options, chosen, environment, fmt, header, measure, median,
    meter, ratios, rounds, table)
from procstat import cpu_seconds, find_broker_pid, load, status_kb
from raw import Raw, add_raw_options
from workload import Workload


WORKDIR = None   # daemon directories go here (see main)


def run_daemon(broker, args, meters, round_=0, confirm=False,
               baseline=False, settings=(), tracing=None):
    workload = Workload(broker, args.messages, args.size,
                        queue_type=args.queue_type,
                        traceparent=args.traceparent)
    daemon = Daemon(workload, args, WORKDIR, confirm=confirm,
                    baseline=baseline, settings=settings,
                    tracing=tracing)
    spy = None
    if args.py_spy:
        spy = f'{args.py_spy}{"-confirm" if confirm else ""}-{round_ + 1}.txt'
    try:
        result = measure(daemon, workload, meters, Daemon.wait_started,
                         py_spy=spy)
        daemon.stop()
        if not confirm and not baseline:
            result.update(daemon.note(workload.count))
        return result
    finally:
        if daemon.process and daemon.process.poll() is None:
            daemon.stop()
        workload.delete()


def run_raw(mode, broker, args, meters):
    workload = Workload(broker, args.messages, args.size,
                        queue_type=args.queue_type,
                        traceparent=args.traceparent)
    raw = Raw(mode[0], workload, args)
    try:
        result = measure(raw, workload, meters, Raw.wait_ready)
        result.update(raw.note(workload.count))
        return result
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
    workload = Workload(broker, count, args.size,
                        queue_type=args.queue_type)
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


def backlog_rss(broker, args):
    """Peak RSS while consuming a backlog of args.backlog messages for
    args.backlog_seconds seconds."""
    workload = Workload(broker, args.backlog, args.size, fill=False,
                        queue_type=args.queue_type)
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

def report(results, args):
    med = table(results, args, extra=[('msg/commit', 12, per_commit)])
    daemons = [name for name in results if name.startswith('daemon')]
    raws = [name for name in results if not name.startswith('daemon')]
    for daemon in daemons:
        print()
        others = raws + [name for name in daemons if name != daemon]
        ratios(med, [(daemon, name) for name in others], TARGETS)
    if args.workers != 8:
        print(f'(the targets are for K=8; this run had K={args.workers})')
    print()
    cpu_targets(med)
    broker_in_tx(med)
    for daemon in daemons:
        if daemon == daemons[0]:
            print()
        print(f'{daemon} start to consuming ("Started." logged): '
              f'{med[daemon]["start"]:.2f} s; to first reply: '
              f'{med[daemon]["first_reply"]:.2f} s (medians)')


def per_commit(runs):
    """The table's msg/commit column: raw-g's messages per tx.commit."""
    values = [r['per_commit'] for r in runs if r.get('per_commit')]
    return fmt(median(values), '.1f') if values else '-'


def cpu_targets(med):
    """The client CPU per message of each daemon against its raw
    reference (target: at most as much)."""
    for a, b in CPU_TARGETS:
        if a not in med or b not in med or None in (
                med[a]['cpu_ms'], med[b]['cpu_ms']):
            continue
        x, y = med[a]['cpu_ms'], med[b]['cpu_ms']
        met = 'met' if x <= y else 'MISSED'
        print(f'client cpu {a} {x:.3f} ms/msg vs {b} {y:.3f} '
              f'= {x / y:.2f} (target <= 1: {met})')


def broker_in_tx(med):
    """The broker's CPU per message of the transactional variants, side
    by side (a commit costs the broker; compare before/after)."""
    names = [name for name in TX if name in med
             and med[name].get('broker_ms') is not None]
    if names:
        print('broker cpu per message in tx: ' + ', '.join(
            f'{name} {med[name]["broker_ms"]:.3f} ms' for name in names))


DAEMONS = ('daemon', 'daemon-confirm')
# Daemon variants of tracing (transaction mode): Daemon's `tracing`.
TRACING = {'daemon-notrace': 'off', 'daemon-sdk': 'sdk'}
# The targets (K=8): the daemon's rate relative to a reference.
TARGETS = {('daemon', 'raw-b'): 2, ('daemon', 'raw-g'): 0.9,
           ('daemon', 'daemon-confirm'): 0.9,
           ('daemon-confirm', 'raw-c'): 0.6}
# Client CPU per message: the first at most the second's.
CPU_TARGETS = (('daemon', 'raw-b'), ('daemon-confirm', 'raw-n'),
               ('daemon-confirm', 'raw-c'))
# The variants committing AMQP transactions.
TX = ('daemon', 'daemon-baseline', 'daemon-notrace', 'daemon-sdk', 'raw-a',
      'raw-b', 'raw-g')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_options(
        parser, messages=20000,
        variants='daemon,daemon-confirm,raw-a,raw-b,raw-c,raw-e,raw-g,raw-n')
    parser.add_argument('--confirm-prefetch', type=int, default=None,
                        help='daemon-confirm\'s prefetch (default: the '
                        'confirm mode\'s own)')
    add_raw_options(parser)
    parser.add_argument('--py-spy', metavar='PREFIX', default=None,
                        help='record each daemon run with py-spy into '
                        'PREFIX-<round>.txt (collapsed stacks, per thread)')
    parser.add_argument('--traceparent', action='store_true',
                        help='every input message carries a W3C '
                        'traceparent header (a trace of its own)')
    parser.add_argument('--no-extras', action='store_true',
                        help='skip the SIGTERM and backlog measurements')
    parser.add_argument('--backlog', type=int, default=200000,
                        help='backlog size for the RSS measurement '
                        '(0: skip)')
    parser.add_argument('--backlog-seconds', type=float, default=15)
    args = parser.parse_args(argv)
    variants = chosen(parser, args, DAEMONS + tuple(TRACING) + (
        'raw-a', 'raw-b', 'raw-c', 'raw-d', 'raw-e', 'raw-g', 'raw-n'))
    broker_pid = find_broker_pid(args.port)
    header(broker_pid)
    meters = {'broker': meter(cpu_seconds, broker_pid)}

    def run(name, round_):
        if name.startswith('daemon'):
            base = name.split('/')[0]
            return run_daemon(broker, args, meters, round_,
                              confirm=base.startswith('daemon-confirm'),
                              baseline=base.endswith('-baseline'),
                              settings=variant_settings(name),
                              tracing=TRACING.get(base))
        return run_raw(name.split('-')[1], broker, args, meters)

    global WORKDIR
    with environment(args) as (broker, WORKDIR):
        results = rounds(variants, args.rounds, run)
        report(results, args)
        if not args.no_extras:
            print()
            s = sigterm_busy(broker, args)
            print(f'SIGTERM to exit, {args.workers} workers busy in a 0.2 s '
                  f'handler: {s["seconds"]:.2f} s (exit {s["code"]}; '
                  f'{s["replies"]} replied + {s["requeued"]} requeued = '
                  f'{"all" if s["total_ok"] else "NOT all"} messages)')
            if args.backlog:
                b = backlog_rss(broker, args)
                print(f'backlog {b["backlog"]} (filled in '
                      f'{b["fill_seconds"]:.0f} s): peak RSS '
                      f'{b["hwm_mb"]:.1f} MB (VmHWM; max sampled VmRSS '
                      f'{b["rss_mb"]:.1f} MB) while consuming '
                      f'{b["consumed"]} in {args.backlog_seconds:.0f} s '
                      f'({b["rate"]:.0f} msg/s, {b["cpu_ms"]:.3f} ms/msg)')
        print('load average after: %.2f %.2f %.2f' % load())


if __name__ == '__main__':
    main()
