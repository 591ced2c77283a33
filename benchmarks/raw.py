"""The raw pika consumers of the echo benchmark (variants raw-a to raw-e).

Owns the reference consumers written directly against pika, with no
gocept.amqprun in between, and how they run: `Raw` starts this file (or
another script built on `raw_main`, like rawsql.py) in a subprocess of
its own (so that /proc shows its CPU time and memory alone); the script
prints "ready" once it consumes, answers COUNT messages and stays alive
until its stdin is closed. MODE a and b commit a transaction per message
(b with several connections), c neither transacts nor confirms, d waits
for each publisher confirm, e handles the confirms asynchronously.
"""

import contextlib
import pathlib
import subprocess
import sys
import threading
import time

import pika

from workload import connection_parameters


SCRIPT = str(pathlib.Path(__file__).resolve())


def raw_main(argv, work=None):
    """`raw.py MODE HOST PORT INPUT OUTPUT_KEY COUNT CONNECTIONS
    PREFETCH`: a raw pika echo consumer (a subprocess of the benchmark).
    Prints "ready" when it consumes; answers COUNT messages, then exits
    once its stdin is closed (until then /proc keeps its numbers).

    `work()`, if given, is called in each connection's thread (modes a,
    b, d) and returns a function `(properties, body, reply)` called with
    each delivery and its reply's properties before the reply is
    published."""
    mode, host, port, input_queue, output_key = argv[:5]
    count, connections, prefetch = map(int, argv[5:8])
    params = connection_parameters(host, int(port))
    if mode in 'ce':
        return raw_async(mode, params, input_queue, output_key, count,
                         prefetch)
    lock = threading.Lock()
    done = [0]
    barrier = threading.Barrier(connections + 1)

    def consume():
        handle = work() if work is not None else None
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        if mode == 'd':
            # basic_publish now waits for the broker's confirm.
            channel.confirm_delivery()
        elif mode != 'c':
            channel.tx_select()
        channel.basic_qos(prefetch_count=prefetch)
        barrier.wait()
        for method, properties, body in channel.consume(
                input_queue, inactivity_timeout=0.5):
            if method is None:
                with lock:
                    if done[0] >= count:
                        break
                continue
            reply = pika.BasicProperties(
                delivery_mode=2, content_type=properties.content_type,
                correlation_id=properties.message_id)
            if handle is not None:
                handle(properties, body, reply)
            channel.basic_publish('amq.topic', output_key, body, reply)
            channel.basic_ack(method.delivery_tag)
            if mode in 'ab':
                channel.tx_commit()
            with lock:
                done[0] += 1
                if done[0] >= count:
                    break
        with contextlib.suppress(Exception):
            channel.cancel()
            # Unacked prefetched deliveries go back to the queue.
            connection.close()
        finished.wait()    # keep the thread's CPU time in /proc

    finished = threading.Event()
    threads = [threading.Thread(target=consume) for _ in range(connections)]
    for t in threads:
        t.start()
    barrier.wait()
    print('ready', flush=True)
    # Stay alive (for /proc) until the benchmark closes our stdin.
    sys.stdin.read()
    finished.set()
    for t in threads:
        t.join()


def raw_async(mode, params, input_queue, output_key, count, prefetch):
    """Variants c and e on one SelectConnection channel (a lean client:
    no blocking adapter in the way).

    c: publish the reply and ACK the delivery at once, no transaction.
    e: confirm mode; publish the reply at once and ACK the delivery when
       the broker confirms the reply (up to `prefetch` outstanding)."""
    import pika.spec
    pending = {}    # publish sequence number -> delivery tag
    state = dict(seq=0, done=0, channel=None)

    def on_open(connection):
        connection.channel(on_open_callback=on_channel)

    def on_channel(channel):
        state['channel'] = channel
        if mode == 'c':
            channel.basic_qos(prefetch_count=prefetch, callback=start)
            return
        channel.confirm_delivery(
            ack_nack_callback=on_confirm,
            callback=lambda frame: channel.basic_qos(
                prefetch_count=prefetch, callback=start))

    def start(frame):
        state['channel'].basic_consume(
            input_queue, on_message,
            callback=lambda frame: print('ready', flush=True))

    def on_message(channel, method, properties, body):
        channel.basic_publish(
            'amq.topic', output_key, body, pika.BasicProperties(
                delivery_mode=2, content_type=properties.content_type,
                correlation_id=properties.message_id))
        if mode == 'c':
            channel.basic_ack(method.delivery_tag)
            state['done'] += 1
            if state['done'] >= count:
                connection.close()
            return
        state['seq'] += 1
        pending[state['seq']] = method.delivery_tag

    def on_confirm(frame):
        method = frame.method
        tag = method.delivery_tag
        seqs = sorted(s for s in pending if s <= tag) \
            if method.multiple else [tag]
        channel = state['channel']
        for seq in seqs:
            delivery_tag = pending.pop(seq)
            if isinstance(method, pika.spec.Basic.Ack):
                channel.basic_ack(delivery_tag)
            else:
                channel.basic_nack(delivery_tag, requeue=True)
            state['done'] += 1
        if state['done'] >= count:
            connection.close()

    connection = pika.SelectConnection(
        params, on_open_callback=on_open,
        on_close_callback=lambda *a: connection.ioloop.stop())
    connection.ioloop.start()
    sys.stdin.read()


class Raw:
    """Raw consumer `mode` (a-e) of `workload`, `script` (this file) run
    in a subprocess with `extra` arguments at the end; `connections` is
    the number of connections (threads) of a blocking consumer. The
    benchmark's `args` supply host, port and the prefetch options."""

    def __init__(self, mode, workload, args, connections=1, script=SCRIPT,
                 extra=()):
        self.argv = [
            sys.executable, script, mode, args.host,
            str(args.port), workload.input, workload.output_key,
            str(workload.count), str(connections),
            str(args.raw_c_prefetch if mode in ('c', 'e')
                else args.raw_prefetch)] + list(extra)

    def start(self):
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self

    @property
    def pid(self):
        return self.process.pid

    def wait_ready(self):
        """Wait until the consumer consumes; return time.monotonic() then.
        """
        line = self.process.stdout.readline()
        if line.strip() != b'ready':
            raise RuntimeError('raw consumer failed to start')
        return time.monotonic()

    def stop(self, timeout=60):
        self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        return self.process.returncode


if __name__ == '__main__':
    raw_main(sys.argv[1:])
