"""Paced benchmark: latency per message at a fixed rate, the daemon beside
raw pika.

Not a test: it prints numbers, it asserts nothing. See README.txt.

Every variant gets an empty input queue; once it consumes, the benchmark
publishes N persistent messages of SIZE bytes at a fixed RATE (an open
loop: each message has its time in the schedule, a late one does not
delay the next ones), and a consumer of the output queue (a thread of
this process with a connection of its own) takes the replies as they
arrive. A message's latency runs from just before its publish to its
reply's arrival; the publish time (time.monotonic_ns(), the same clock
as the arrival's: this process) travels at the start of the body, which
every variant echoes unchanged. Per variant: p50, p99 and max latency.

Variants (interleaved, ROUNDS times; medians of the per-run figures):

  daemon          the daemon in transaction mode (echo.py's), K workers
  daemon-confirm  (only if asked for) the same with commit-mode confirm
  raw-a           (only if asked for) one channel, tx_commit per message
  raw-b           K connections, tx_commit per message
  raw-g           one thread, one tx_commit for every delivery at hand

This file owns the pacing, the reply consumer and the latency figures;
the consumers are daemon.py's and raw.py's, measuring and the table
measure.py's (with its `drive`), the queues workload.py's.
"""

import argparse
import math
import sys
import threading
import time

import pika

from daemon import Daemon
from measure import (
    add_common_options, chosen, environment, fmt, header, measure, median,
    meter, rounds, table)
from procstat import cpu_seconds, find_broker_pid, load
from raw import Raw, add_raw_options
from workload import Workload, connection_parameters


VARIANTS = ('daemon', 'daemon-confirm', 'raw-a', 'raw-b', 'raw-g')


def stamped_body(seq, size):
    """A body of `size` bytes starting with `seq` and the publish time."""
    head = f'{seq} {time.monotonic_ns()} '.encode()
    return head + b'x' * max(0, size - len(head))


def parse_body(body):
    """(seq, publish time in ns) of a stamped body."""
    seq, sent = body.split(b' ', 2)[:2]
    return int(seq), int(sent)


class Replies(threading.Thread):
    """Consumes `queue` (auto-ack, a connection of its own) and records
    each reply's latency in ns (`latencies`: seq -> ns) and the
    time.monotonic() of the first arrival, until `count` distinct
    replies are in or stop() is called. `duplicates` counts replies seen
    twice."""

    def __init__(self, params, queue, count):
        super().__init__(daemon=True)
        self.params, self.queue, self.count = params, queue, count
        self.latencies = {}
        self.duplicates = 0
        self.first = None
        self.consuming = threading.Event()
        self.done = threading.Event()
        self.error = None

    def run(self):
        try:
            connection = pika.BlockingConnection(self.params)
            channel = connection.channel()
            channel.basic_consume(self.queue, self.on_reply, auto_ack=True)
            self.consuming.set()
            while not self.done.is_set():
                connection.process_data_events(time_limit=0.1)
            connection.close()
        except Exception as error:   # reported by the benchmark
            self.error = error
            self.consuming.set()
            self.done.set()

    def on_reply(self, channel, method, properties, body):
        now = time.monotonic_ns()
        seq, sent = parse_body(body)
        if seq in self.latencies:
            self.duplicates += 1
            return
        if self.first is None:
            self.first = now / 1e9
        self.latencies[seq] = now - sent
        if len(self.latencies) >= self.count:
            self.done.set()

    def stop(self):
        self.done.set()
        self.join(30)


def percentile(ordered, q):
    """The nearest-rank `q` percentile (0-100) of sorted `ordered`."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def publish_paced(params, workload, count, size, rate, replies, consumer):
    """`drive` for measure: publish `count` stamped messages at `rate`
    per second to the workload's input queue, then wait for the replies
    (at most 60 s after the last publish). Returns (first reply's
    time.monotonic(), the latency figures)."""
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    props = pika.BasicProperties(
        delivery_mode=2, content_type='application/octet-stream')
    t0 = time.monotonic()
    late = 0
    for seq in range(count):
        due = t0 + seq / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.01:
            late += 1
        channel.basic_publish('amq.topic', workload.input_key,
                              stamped_body(seq, size), props)
        if seq % 200 == 199:
            connection.process_data_events(0)
    sent_for = time.monotonic() - t0
    deadline = time.monotonic() + 60
    while not replies.done.wait(0.05):
        if consumer.process.poll() is not None or \
                time.monotonic() > deadline:
            break
    replies.stop()
    connection.close()
    if replies.error is not None:
        raise RuntimeError(f'reply consumer failed: {replies.error!r}')
    got = sorted(replies.latencies.values())
    notes = []
    if len(got) < count:
        notes.append(f'only {len(got)} of {count} replies')
    if replies.duplicates:
        notes.append(f'{replies.duplicates} duplicate replies')
    if late:
        notes.append(f'{late} publishes >10 ms late')
    ms = [ns / 1e6 for ns in got] or [None]
    return replies.first, dict(
        p50=percentile(ms, 50) if got else None,
        p99=percentile(ms, 99) if got else None,
        max=ms[-1], sent_rate=count / sent_for,
        note='; '.join(notes))


def run_variant(name, broker, args, workdir, meters):
    """One paced run of variant `name`."""
    workload = Workload(broker, args.messages, args.size, fill=False,
                        queue_type=args.queue_type)
    if name.startswith('daemon'):
        consumer = Daemon(workload, args, workdir,
                          confirm=name.startswith('daemon-confirm'),
                          baseline=name.endswith('-baseline'))
        wait_ready = Daemon.wait_started
    else:
        consumer = Raw(name.split('-')[1], workload, args)
        wait_ready = Raw.wait_ready
    params = connection_parameters(args.host, args.port)
    replies = Replies(params, workload.output, args.messages)
    replies.start()
    replies.consuming.wait(30)
    try:
        result = measure(
            consumer, workload, meters, wait_ready,
            drive=lambda consumer: publish_paced(
                params, workload, args.messages, args.size, args.rate,
                replies, consumer))
        if isinstance(consumer, Raw):
            per_commit = consumer.note(workload.count)
            if per_commit:
                result['note'] = '; '.join(
                    n for n in (result['note'], per_commit['note']) if n)
                result['per_commit'] = per_commit['per_commit']
        return result
    finally:
        replies.stop()
        process = getattr(consumer, 'process', None)
        if process is not None and process.poll() is None:
            process.kill()
            consumer.stop()
        workload.delete()


def latency_columns():
    def column(key):
        def value(runs):
            return fmt(median([r[key] for r in runs]), '.1f')
        return value
    return [(f'{key} ms', 9, column(key)) for key in ('p50', 'p99', 'max')]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_options(parser, messages=2000,
                       variants='daemon,raw-b,raw-g')
    add_raw_options(parser)
    parser.add_argument('--rate', type=float, default=200,
                        help='messages published per second')
    parser.add_argument('--confirm-prefetch', type=int, default=None,
                        help='daemon-confirm\'s prefetch (default: the '
                        'confirm mode\'s own)')
    args = parser.parse_args(argv)
    variants = chosen(parser, args, VARIANTS)
    broker_pid = find_broker_pid(args.port)
    header(broker_pid, f'  paced at {args.rate:g} msg/s')
    meters = {'broker': meter(cpu_seconds, broker_pid)}
    with environment(args) as (broker, workdir):
        results = rounds(variants, args.rounds, lambda name, _: (
            run_variant(name, broker, args, workdir, meters)))
        table(results, args, extra=latency_columns())
        print(f'(msg/s: replies per second from "consuming" to the last '
              f'reply; published at {args.rate:g} msg/s; latency from '
              f'publish to the reply\'s arrival, nearest-rank percentiles)')
        for name, runs in results.items():
            for round_, r in enumerate(runs):
                if r['note'] and 'replies' in r['note']:
                    print(f'{name} round {round_ + 1}: {r["note"]}')
        print()
        latency_ratios(results, [('daemon', 'raw-b'), ('daemon', 'raw-g'),
                                 ('daemon', 'daemon-confirm')])
        print('load average after: %.2f %.2f %.2f' % load())


def latency_ratios(results, pairs):
    """Print the median p50 and p99 of a variant over another's for each
    (a, b) of `pairs` that both ran (below 1: a answers faster)."""
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        figures = []
        for key in ('p50', 'p99'):
            x = median([r[key] for r in results[a]])
            y = median([r[key] for r in results[b]])
            if x is not None and y:
                figures.append(f'{key} {x / y:.2f}')
        print(f'latency {a} / {b}: {", ".join(figures)}')


if __name__ == '__main__':
    main()
