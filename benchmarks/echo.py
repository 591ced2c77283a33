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
"""

import argparse
import contextlib
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pika


CLK_TCK = os.sysconf('SC_CLK_TCK')
WORKDIR = None   # daemon directories go here (see main)
HERE = pathlib.Path(__file__).resolve().parent


# /proc helpers

def cpu_seconds(pid):
    """utime + stime of `pid` (all its threads) in seconds, or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid):
    """{tid: utime + stime in seconds} of `pid`'s threads."""
    result = {}
    try:
        tids = os.listdir(f'/proc/{pid}/task')
    except OSError:
        return result
    for tid in tids:
        seconds = cpu_seconds(f'{pid}/task/{tid}')
        if seconds is not None:
            result[tid] = seconds
    return result


def status_kb(pid, key):
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _listening_inodes(port):
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == '0A' and \
                            int(fields[1].rsplit(':', 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def find_broker_pid(port=5672):
    """The beam.smp process listening on `port` (several brokers may run
    on this machine), or None."""
    inodes = {f'socket:[{i}]' for i in _listening_inodes(port)}
    for pid in _beam_pids():
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f'/proc/{pid}/fd/{fd}') in inodes:
                    return pid
            except OSError:
                continue
    return None


def _beam_pids():
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/comm') as f:
                if f.read().strip() == 'beam.smp':
                    yield int(entry)
        except OSError:
            continue


def load():
    return os.getloadavg()


# Broker side of the workload

class Broker:
    """A blocking pika connection of the benchmark process (main thread)."""

    def __init__(self, host, port):
        self.params = pika.ConnectionParameters(
            host=host, port=port,
            credentials=pika.PlainCredentials('guest', 'guest'),
            heartbeat=0)
        self.connection = pika.BlockingConnection(self.params)
        self.channel = self.connection.channel()

    def declare(self, name, key):
        self.channel.queue_declare(name, durable=True)
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

    def prefill(self, name, key, count, size):
        """Publish `count` persistent messages to `name` via amq.topic."""
        body = b'x' * size
        props = pika.BasicProperties(
            delivery_mode=2, content_type='application/octet-stream')
        channel = self.connection.channel()
        for i in range(count):
            channel.basic_publish('amq.topic', key, body, props)
            if i % 2000 == 1999:
                self.connection.process_data_events(0)
        channel.close()
        deadline = time.monotonic() + 60 + count / 2000
        while self.count(name) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f'prefill of {name} stalled')
            time.sleep(0.05)

    def close(self):
        with contextlib.suppress(Exception):
            self.connection.close()


TAGS = []


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
    """A fresh input and output queue, pre-filled."""

    def __init__(self, broker, count, size, fill=True):
        tag = uuid.uuid4().hex[:10]
        TAGS.append(tag)
        self.broker = broker
        self.count = count
        self.input = f'bench.{tag}.in'
        self.input_key = f'bench.{tag}.request'
        self.output = f'bench.{tag}.out'
        self.output_key = f'bench.{tag}.reply'
        broker.declare(self.input, self.input_key)
        broker.declare(self.output, self.output_key)
        if fill:
            broker.prefill(self.input, self.input_key, count, size)

    def replies(self):
        return self.broker.count(self.output)

    def delete(self):
        # The daemon may declare auxiliary queues next to its input queue
        # (the retry policy's); sweep_queues() catches any others.
        self.broker.delete(self.input, self.output, f'{self.input}.retry',
                           f'{self.input}.parked')


# Consumers as processes

DAEMON_CONF = """\
<eventlog>
  level INFO
  <logfile>
    path {log}
    format %(asctime)s %(levelname)s %(name)s %(message)s
  </logfile>
</eventlog>
<logger>
  name pika
  level WARNING
</logger>
<amqp-server>
  hostname {host}
  port {port}
  username guest
  password guest
{server_extra}</amqp-server>
<worker>
  amount {workers}
  component-configuration {zcml}
{worker_extra}</worker>
"""

DAEMON_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="gocept.amqprun" />
  <utility component="{module}.echo" name="benchmark.echo" />
</configure>
"""

HANDLER = """\
import time
import gocept.amqprun.handler
import gocept.amqprun.message


@gocept.amqprun.handler.declare({input!r}, {input_key!r})
def echo(message):
    {sleep}return [gocept.amqprun.message.Message(
        {{'content_type': message.header.content_type}}, message.body,
        routing_key={output_key!r})]
"""


class Daemon:
    """The real daemon in a subprocess, with an echo handler."""

    def __init__(self, workload, args, sleep=0.0, directory=None,
                 confirm=False):
        self.dir = pathlib.Path(directory or tempfile.mkdtemp(
            prefix='daemon-', dir=WORKDIR))
        module = 'bench_' + uuid.uuid4().hex[:8]
        (self.dir / f'{module}.py').write_text(HANDLER.format(
            input=workload.input, input_key=workload.input_key,
            output_key=workload.output_key,
            sleep=f'time.sleep({sleep})\n    ' if sleep else ''))
        (self.dir / 'server.zcml').write_text(
            DAEMON_ZCML.format(module=module))
        self.log = self.dir / 'server.log'
        prefetch = args.confirm_prefetch if confirm else args.prefetch
        worker_extra = f'  prefetch {prefetch}\n' if prefetch else ''
        if confirm:
            worker_extra += '  commit-mode confirm\n'
        (self.dir / 'server.conf').write_text(DAEMON_CONF.format(
            log=self.log, host=args.host, port=args.port,
            workers=args.workers, zcml=self.dir / 'server.zcml',
            server_extra='', worker_extra=worker_extra + args.worker_extra))
        self.process = None

    def start(self, wrapper=()):
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(
            [str(self.dir)] + [p for p in sys.path if p])
        self.output = open(self.dir / 'output.txt', 'wb')
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            list(wrapper) + [sys.executable, '-m', 'gocept.amqprun',
                             str(self.dir / 'server.conf')],
            cwd=self.dir, env=env, stdout=self.output,
            stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self):
        return self.process.pid

    def logged(self, text):
        try:
            return text in self.log.read_text()
        except FileNotFoundError:
            return False

    def wait_for_log(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.logged(text):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f'daemon exited ({self.process.returncode}); see '
                    f'{self.dir}')
            if time.monotonic() > deadline:
                raise RuntimeError(f'{text!r} not logged; see {self.dir}')
            time.sleep(0.005)
        return time.monotonic()

    def stop(self, timeout=60):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()
        return self.process.returncode


def raw_main(argv):
    """`echo.py _raw MODE HOST PORT INPUT OUTPUT_KEY COUNT CONNECTIONS
    PREFETCH`: a raw pika echo consumer (a subprocess of the benchmark).
    Prints "ready" when it consumes; exits after COUNT messages."""
    mode, host, port, input_queue, output_key = argv[:5]
    count, connections, prefetch = map(int, argv[5:8])
    params = pika.ConnectionParameters(
        host=host, port=int(port),
        credentials=pika.PlainCredentials('guest', 'guest'), heartbeat=0)
    if mode in 'ce':
        return raw_async(mode, params, input_queue, output_key, count,
                         prefetch)
    lock = threading.Lock()
    done = [0]
    barrier = threading.Barrier(connections + 1)

    def consume():
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
            channel.basic_publish(
                'amq.topic', output_key, body, pika.BasicProperties(
                    delivery_mode=2, content_type=properties.content_type,
                    correlation_id=properties.message_id))
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

    def __init__(self, mode, workload, args, connections=1):
        self.argv = [
            sys.executable, __file__, '_raw', mode, args.host,
            str(args.port), workload.input, workload.output_key,
            str(workload.count), str(connections),
            str(args.raw_c_prefetch if mode in 'ce' else args.raw_prefetch)]

    def start(self):
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self

    @property
    def pid(self):
        return self.process.pid

    def wait_ready(self):
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


# One measurement

def measure(consumer, workload, broker_pid, wait_ready, interval=0.02,
            py_spy=None):
    """Start `consumer`, return a dict of numbers."""
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
    daemon = Daemon(workload, args, confirm=confirm)
    spy = None
    if args.py_spy:
        spy = f'{args.py_spy}{"-confirm" if confirm else ""}-{round_ + 1}.txt'
    try:
        return measure(
            daemon, workload, broker_pid,
            lambda d: d.wait_for_log('gocept.amqprun.main Started.'),
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
    daemon = Daemon(workload, args, sleep=sleep)
    try:
        daemon.start()
        daemon.wait_for_log('gocept.amqprun.main Started.')
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
        daemon = Daemon(workload, args)
        daemon.start()
        t_ready = daemon.wait_for_log('gocept.amqprun.main Started.')
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
    if argv[:1] == ['_raw']:
        return raw_main(argv[1:])
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
    import pika as _pika
    print(f'{time.strftime("%Y-%m-%d %H:%M:%S")}  {os.uname().nodename}  '
          f'{os.cpu_count()} CPUs  Python {sys.version.split()[0]}  '
          f'pika {_pika.__version__}  broker pid {broker_pid or "unreadable"}')
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
