"""The raw pika consumers of the echo benchmark (variants raw-a to raw-g).

Owns the reference consumers written directly against pika, with no
gocept.amqprun in between, and how they run: `Raw` starts this file (or
another script built on `raw_main`, like rawsql.py) in a subprocess of
its own (so that /proc shows its CPU time and memory alone); the script
prints "ready" once it consumes, answers COUNT messages and stays alive
until its stdin is closed. MODE a and b commit a transaction per message
(b with several connections), c neither transacts nor confirms, d waits
for each publisher confirm, e handles the confirms asynchronously, g
commits groups: one transaction for all deliveries at hand (it prints
"commits N" when done, see `Raw.commits`).
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
    if mode in 'gn':
        return raw_group(params, input_queue, output_key, count, prefetch,
                         transactional=mode == 'g')
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
            reply = reply_properties(properties)
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


def reply_properties(properties):
    """The reply's properties for a delivery with `properties`."""
    return pika.BasicProperties(
        delivery_mode=2, content_type=properties.content_type,
        correlation_id=properties.message_id)


def raw_group(params, input_queue, output_key, count, prefetch,
              transactional=True):
    """Variant g: a group commit by hand, in one thread on one channel in
    tx mode. Gather every delivery at hand (``process_data_events`` with
    ``time_limit=0``), publish each one's reply and ACK it, then ONE
    tx.commit for the whole group. Each message's reply and ACK are still
    in one transaction; the broker's cost is per commit. Variant n
    (not `transactional`): the same loop without a transaction -- one
    blocking pika thread publishing and ACKing, no tx, no confirms.

    Prints "ready" once it consumes, "commits N" after COUNT messages."""
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    if transactional:
        channel.tx_select()
    channel.basic_qos(prefetch_count=prefetch)
    at_hand = []
    channel.basic_consume(
        input_queue, lambda channel, method, properties, body:
        at_hand.append((method, properties, body)))
    print('ready', flush=True)
    done = commits = 0
    while done < count:
        if not at_hand:
            # Blocks until something arrives (deliveries buffered while
            # the last commit waited count too).
            connection.process_data_events(time_limit=1)
        connection.process_data_events(time_limit=0)
        if not at_hand:
            continue
        group = list(at_hand)
        del at_hand[:]
        for method, properties, body in group:
            channel.basic_publish('amq.topic', output_key, body,
                                  reply_properties(properties))
            channel.basic_ack(method.delivery_tag)
        if transactional:
            channel.tx_commit()
            commits += 1
        done += len(group)
    if transactional:
        print(f'commits {commits}', flush=True)
    with contextlib.suppress(Exception):
        channel.cancel()
        connection.close()
    sys.stdin.read()


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
        channel.basic_publish('amq.topic', output_key, body,
                              reply_properties(properties))
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


# The variants with K connections (threads); the others have one.
MULTI = ('b', 'd')


def add_raw_options(parser):
    """The prefetch options of raw.py's variants beyond raw-a/raw-b's
    (``--raw-prefetch`` is a common option)."""
    parser.add_argument('--raw-c-prefetch', type=int, default=100,
                        help='prefetch of the raw asynchronous consumers '
                        '(c, e)')
    parser.add_argument('--raw-g-prefetch', type=int, default=100,
                        help='prefetch of the raw group-committing consumer '
                        '(g): the most deliveries one commit can take; also '
                        'of raw-n')


def prefetch_of(mode, args):
    """The prefetch of raw variant `mode` given the benchmark's options."""
    if mode in ('c', 'e'):
        return args.raw_c_prefetch
    if mode in ('g', 'n'):
        return args.raw_g_prefetch
    return args.raw_prefetch


class Raw:
    """Raw consumer `mode` (a-g) of `workload`, `script` (this file) run
    in a subprocess with `extra` arguments at the end; `connections` is
    the number of connections (threads) of a blocking consumer (default:
    K, ``args.workers``, for b and d, else 1). The benchmark's `args`
    supply host, port and the prefetch options. After stop(), `commits`
    is the number of transactions variant g committed (else None)."""

    def __init__(self, mode, workload, args, connections=None,
                 script=SCRIPT, extra=()):
        if connections is None:
            connections = args.workers if mode in MULTI else 1
        self.commits = None
        self.argv = [
            sys.executable, script, mode, args.host,
            str(args.port), workload.input, workload.output_key,
            str(workload.count), str(connections),
            str(prefetch_of(mode, args))] + list(extra)

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
        for line in self.process.stdout.read().decode().splitlines():
            if line.startswith('commits '):
                self.commits = int(line.split()[1])
        self.process.stdout.close()
        return self.process.returncode

    def note(self, count):
        """Messages per commit (variant g) as a result's entries."""
        if not self.commits:
            return {}
        per = count / self.commits
        return dict(per_commit=per, note=f'{per:.1f} msg/commit')


if __name__ == '__main__':
    raw_main(sys.argv[1:])
