"""The broker side of the benchmarks' workload.

Owns the benchmark process's own connection to the broker (`Broker`: declare,
pre-fill, count and delete queues), the `Workload` every variant gets (a
fresh durable input queue, pre-filled, and an output queue for the
replies, both bound to amq.topic, classic or quorum queues), and the
final sweep that deletes what
is left of this run's queues. All queue names of a run start with
`bench.<tag>.`, one tag per workload.
"""

import contextlib
import os
import subprocess
import time
import uuid

import pika


def connection_parameters(host, port):
    """pika parameters for the broker at `host`:`port`: user guest, no
    heartbeats."""
    return pika.ConnectionParameters(
        host=host, port=port,
        credentials=pika.PlainCredentials('guest', 'guest'), heartbeat=0)


class Broker:
    """A blocking pika connection of the benchmark process (main thread)."""

    def __init__(self, host, port):
        self.params = connection_parameters(host, port)
        self.connection = pika.BlockingConnection(self.params)
        self.channel = self.connection.channel()

    def declare(self, name, key, arguments=None):
        self.channel.queue_declare(name, durable=True, arguments=arguments)
        self.channel.queue_bind(name, 'amq.topic', routing_key=key)

    def count(self, name):
        return self.channel.queue_declare(
            name, durable=True, passive=True).method.message_count

    def delete(self, *names):
        for name in names:
            with contextlib.suppress(Exception):
                if not self.channel.is_open:
                    self.channel = self.connection.channel()
                self.channel.queue_delete(name)

    def prefill(self, name, key, count, size, message_ids=False,
                traceparent=False):
        """Publish `count` persistent messages to `name` via amq.topic
        (with message-ids `<i.name@bench>` if `message_ids`; with a
        W3C ``traceparent`` header of a trace of its own each if
        `traceparent`)."""
        body = b'x' * size
        props = pika.BasicProperties(
            delivery_mode=2, content_type='application/octet-stream')
        channel = self.connection.channel()
        for i in range(count):
            if message_ids or traceparent:
                props = pika.BasicProperties(
                    delivery_mode=2, content_type=props.content_type,
                    message_id=f'<{i}.{name}@bench>' if message_ids
                    else None,
                    headers={'traceparent': random_traceparent()}
                    if traceparent else None)
            channel.basic_publish('amq.topic', key, body, props)
            if i % 2000 == 1999:
                self.connection.process_data_events(0)
        # The publishing channel stays open until the queue holds them
        # all (a stalled quorum queue prefill was seen once).
        deadline = time.monotonic() + 60 + count / 2000
        while (n := self.count(name)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f'prefill of {name} stalled at {n} of {count}')
            time.sleep(0.05)
        channel.close()

    def close(self):
        with contextlib.suppress(Exception):
            self.connection.close()


def random_traceparent():
    """A W3C traceparent of a new (sampled) trace."""
    return f'00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01'


TAGS = []

QUEUE_TYPES = ('classic', 'quorum')


def queue_arguments(queue_type):
    """The x-arguments declaring a queue of `queue_type` (None: classic,
    the broker's default, declared without arguments as the daemon does
    by default)."""
    if queue_type in (None, 'classic'):
        return None
    return {'x-queue-type': queue_type}


def sweep_queues(broker):
    """Delete leftover queues of this run (needs rabbitmqctl)."""
    try:
        out = subprocess.run(
            ['rabbitmqctl', '-q', 'list_queues', 'name'],
            capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return
    prefixes = tuple(f'bench.{tag}.' for tag in TAGS)
    broker.delete(*[line.split()[0] for line in out.splitlines()
                    if line.startswith(prefixes)])


class Workload:
    """A fresh input and output queue of `queue_type` (classic or quorum;
    `arguments` are their x-arguments), pre-filled (with message-ids if
    `message_ids`, a traceparent header each if `traceparent`)."""

    def __init__(self, broker, count, size, fill=True, message_ids=False,
                 queue_type=None, traceparent=False):
        tag = uuid.uuid4().hex[:10]
        TAGS.append(tag)
        self.broker = broker
        self.count = count
        self.input = f'bench.{tag}.in'
        self.input_key = f'bench.{tag}.request'
        self.output = f'bench.{tag}.out'
        self.output_key = f'bench.{tag}.reply'
        self.arguments = queue_arguments(queue_type)
        broker.declare(self.input, self.input_key, self.arguments)
        broker.declare(self.output, self.output_key, self.arguments)
        if fill:
            broker.prefill(self.input, self.input_key, count, size,
                           message_ids, traceparent)

    def replies(self):
        return self.broker.count(self.output)

    def delete(self):
        # The daemon may declare auxiliary queues next to its input queue
        # (the retry policy's); sweep_queues() catches any others.
        self.broker.delete(self.input, self.output, f'{self.input}.retry',
                           f'{self.input}.parked',
                           f'{self.input}.quarantine')
