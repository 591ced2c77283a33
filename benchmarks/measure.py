"""Measuring runs and printing their figures, for echo.py and sql.py.

Owns one measured run (`measure`: a consumer started against a workload,
timed from "consuming" until the output queue holds every reply, with its
CPU, thread, memory and the other processes' CPU read from /proc), the
interleaved rounds of a benchmark (`rounds`), the options every benchmark
has (`add_common_options`), the broker connection and directory of a
run (`environment`), and the printed report: header, one line per
round, the table of medians and the ratios between variants.
"""

import contextlib
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pika

from procstat import cpu_seconds, load, status_kb, thread_cpu_seconds
from workload import QUEUE_TYPES, Broker, sweep_queues


def add_common_options(parser, messages, variants):
    """The options of every benchmark: workload, consumers, daemon."""
    parser.add_argument('--messages', '-n', type=int, default=messages)
    parser.add_argument('--workers', '-k', type=int, default=8)
    parser.add_argument('--rounds', '-r', type=int, default=3)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=5672)
    parser.add_argument('--prefetch', type=int, default=None,
                        help='the daemon\'s prefetch (default: its own)')
    parser.add_argument('--raw-prefetch', type=int, default=2,
                        help='prefetch of the raw tx consumers')
    parser.add_argument('--queue-type', choices=QUEUE_TYPES,
                        default='classic',
                        help='type of the input and output queues of every '
                        'variant (the daemon declares its queue with '
                        'x-queue-type quorum)')
    parser.add_argument('--worker-extra', default='',
                        help='more lines for the daemon\'s <worker>')
    parser.add_argument('--baseline', metavar='CHECKOUT', default=None,
                        help='an earlier checkout of gocept.amqprun: the '
                        'variants daemon-baseline and '
                        'daemon-confirm-baseline run its src/ (before/after '
                        'figures of one run)')
    parser.add_argument('--variants', default=variants,
                        help='comma-separated subset of the variants')
    parser.add_argument('--keep', action='store_true',
                        help='keep the daemons\' directories (config, log)')


def measure(consumer, workload, meters, wait_ready, interval=0.02,
            py_spy=None, drive=None):
    """Start `consumer`, return a dict of numbers.

    `consumer` has start() (setting `started_at`, a time.monotonic()),
    `pid`, `process` (a Popen) and stop(); `wait_ready(consumer)` returns
    the time.monotonic() at which it began consuming. The run ends when
    `workload` holds all its replies -- or, with `drive`, when
    `drive(consumer)` returns (it runs once the consumer consumes and the
    readings began, and returns the time.monotonic() of the first reply
    and a dict of more results). `meters` maps a name to a function
    returning another process's CPU seconds (or None); the result has
    each one's CPU per message as `<name>_ms`."""
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
    others0 = {name: meter() for name, meter in meters.items()}
    if drive is None:
        first, more = wait_for_replies(consumer, workload, t_ready,
                                       interval), {}
    else:
        first, more = drive(consumer)
    t_end = time.monotonic()
    cpu1 = cpu_seconds(consumer.pid)
    threads1 = thread_cpu_seconds(consumer.pid)
    others1 = {name: meter() for name, meter in meters.items()}
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
        cpu_ms=per_message(cpu0, cpu1, workload.count),
        rss_mb=rss / 1024 if rss else None,
        start=t_ready - consumer.started_at,
        first_reply=(first or t_end) - consumer.started_at,
        load=load()[0],
    )
    for name in meters:
        result[f'{name}_ms'] = per_message(
            others0[name], others1[name], workload.count)
    result.update(more)
    return result


def wait_for_replies(consumer, workload, t_ready, interval):
    """Poll until the output queue of `workload` holds all replies;
    return the time.monotonic() at which the first was seen. Raises
    RuntimeError if the consumer exits or stalls first."""
    first = None
    deadline = t_ready + 120 + workload.count / 200
    while True:
        n = workload.replies()
        now = time.monotonic()
        if n and first is None:
            first = now
        if n >= workload.count:
            return first
        if consumer.process.poll() is not None and \
                workload.replies() < workload.count:
            raise RuntimeError(
                f'consumer exited with {consumer.process.returncode} '
                f'after {n} replies')
        if now > deadline:
            raise RuntimeError(f'only {n} of {workload.count} replies')
        time.sleep(interval)


def per_message(seconds0, seconds1, count):
    """Milliseconds per message between two CPU readings, or None."""
    if seconds0 is None or seconds1 is None:
        return None
    return (seconds1 - seconds0) * 1000 / count


def rounds(variants, count, run):
    """Run each of `variants` `count` times, interleaved; `run(name,
    round_)` returns a result dict. Prints a line per run; returns
    {name: [result, ...]}."""
    results = {name: [] for name in variants}
    for round_ in range(count):
        for name in variants:
            r = run(name, round_)
            results[name].append(r)
            print(f'round {round_ + 1} {name:<14} {r["rate"]:7.0f} msg/s'
                  f'  cpu {fmt(r["cpu_ms"], ".3f")} ms/msg'
                  f' (busiest thread {fmt(r["busiest_pct"], ".0f")}%)'
                  + ''.join(f'  {key[:-3]} {fmt(r[key], ".3f")} ms/msg'
                            for key in meter_keys(r))
                  + f'  rss {fmt(r["rss_mb"], ".1f")} MB'
                  f'  load {r["load"]:.2f}'
                  + (f'  {r["note"]}' if r.get('note') else ''),
                  flush=True)
    return results


def meter_keys(result):
    """The `<name>_ms` keys of the meters (other processes' CPU)."""
    return [key for key in result
            if key.endswith('_ms') and key != 'cpu_ms']


def header(broker_pid, extra=''):
    print(f'{time.strftime("%Y-%m-%d %H:%M:%S")}  {os.uname().nodename}  '
          f'{os.cpu_count()} CPUs  Python {sys.version.split()[0]}  '
          f'pika {pika.__version__}  broker pid {broker_pid or "unreadable"}'
          f'{extra}')
    print('load average before: %.2f %.2f %.2f' % load())


def fmt(value, spec):
    return '-' if value is None else format(value, spec)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def medians(results):
    """{name: {key: median}} of `results` (as `rounds` returns them);
    values that are not numbers are left out."""
    return {name: {key: median([r[key] for r in runs])
                   for key in runs[0]
                   if isinstance(runs[0][key], (int, float, type(None)))}
            for name, runs in results.items()}


def table(results, args, extra=()):
    """Print the medians of `results`, a row per variant; `extra` are
    (title, width, function of a variant's runs) columns at the end.
    Returns the medians."""
    med = medians(results)
    meters = meter_keys(next(iter(results.values()))[0])
    print()
    print(f'{args.messages} messages x {args.size} B, persistent, '
          f'{args.queue_type} queues; K={args.workers}; {args.rounds} '
          f'round(s); medians')
    print(f'{"variant":<15}{"msg/s":>9}{"min":>8}{"max":>8}'
          f'{"cpu ms/msg":>12}{"busiest thr":>13}'
          + ''.join(f'{key[:-3] + " ms/msg":>15}' for key in meters)
          + f'{"peak RSS MB":>13}{"load":>7}'
          + ''.join(f'{title:>{width}}' for title, width, _ in extra))
    for name, runs in results.items():
        m = med[name]
        rates = [r['rate'] for r in runs]
        print(f'{name:<15}{m["rate"]:>9.0f}{min(rates):>8.0f}'
              f'{max(rates):>8.0f}{fmt(m["cpu_ms"], ".3f"):>12}'
              f'{fmt(m["busiest_pct"], ".0f"):>12}%'
              + ''.join(f'{fmt(m[key], ".3f"):>15}' for key in meters)
              + f'{fmt(m["rss_mb"], ".1f"):>13}{m["load"]:>7.2f}'
              + ''.join(f'{column(runs):>{width}}'
                        for _, width, column in extra))
    return med


def ratios(med, pairs, targets={}):
    """Print the rate of a variant over another's for each (a, b) of
    `pairs` that both ran, marked with `targets[a, b]` if given."""
    for a, b in pairs:
        if a not in med or b not in med:
            continue
        ratio = med[a]['rate'] / med[b]['rate']
        target = targets.get((a, b))
        note = ''
        if target is not None:
            met = 'met' if ratio >= target else 'MISSED'
            note = f'  (target >= {target}: {met})'
        print(f'{a} / {b:<5} = {ratio:.2f}{note}')


def meter(read, pid):
    """A meter for `measure`: `read(pid)` (CPU seconds), or None when
    `pid` is None."""
    return (lambda: read(pid)) if pid else (lambda: None)


def chosen(parser, args, known):
    """The variants of `args.variants`; an error for unknown ones. The
    daemon variants of `known` also exist as ``...-baseline`` (see
    --baseline, which they need), and with settings of their own
    (``daemon/channels=2``, see daemon.variant_settings)."""
    variants = args.variants.split(',')
    known = tuple(known) + tuple(
        f'{name}-baseline' for name in known if name.startswith('daemon'))
    unknown = [name for name in variants
               if name.split('/')[0] not in known]
    if any(name.endswith('-baseline') for name in variants) \
            and not args.baseline:
        parser.error('the -baseline variants need --baseline CHECKOUT')
    if unknown:
        parser.error(f'unknown variant(s): {", ".join(unknown)} (known: '
                     f'{", ".join(known)})')
    return variants


@contextlib.contextmanager
def environment(args):
    """A Broker connection and a fresh directory for the daemons. Then
    the run's leftover queues are swept and the directory is removed
    (kept with --keep)."""
    workdir = tempfile.mkdtemp(prefix='amqprun-bench-')
    broker = Broker(args.host, args.port)
    try:
        yield broker, workdir
    finally:
        # A second Ctrl-C (rabbitmqctl gets it too) must not keep the
        # directory.
        try:
            sweep_queues(broker)
            broker.close()
        finally:
            if args.keep:
                print(f'daemon directories kept in {workdir}')
            else:
                shutil.rmtree(workdir, ignore_errors=True)
