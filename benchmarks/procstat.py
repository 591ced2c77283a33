"""Readings from /proc for the echo benchmark.

Owns what the benchmark learns about processes without their help: the CPU
seconds (utime + stime) of a process and of each of its threads, a
process's memory counters (VmRSS, VmHWM), the broker's beam.smp process
found by the port it listens on, and the load average. Every reader returns
None (or nothing) instead of raising when /proc does not let it read.
"""

import os


CLK_TCK = os.sysconf('SC_CLK_TCK')


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
    """The kB value of `key` (e.g. 'VmRSS') in /proc/`pid`/status, or
    None."""
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
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()
