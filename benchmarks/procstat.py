"""Readings from /proc for the benchmarks.

Owns what the benchmarks learn about processes without their help: the CPU
seconds (utime + stime) of a process, of each of its threads and of a
server with its children (PostgreSQL's postmaster and backends), a
process's memory counters (VmRSS, VmHWM), a server process (the broker's
beam.smp, the postmaster) found by the port it listens on, and the load
average. Every reader returns None (or nothing) instead of raising when
/proc does not let it read.
"""

import os


CLK_TCK = os.sysconf('SC_CLK_TCK')


def _stat(pid):
    """The fields of /proc/`pid`/stat after the command name (fields[0]
    is field 3, the state), or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid):
    """utime + stime of `pid` (all its threads) in seconds, or None."""
    fields = _stat(pid)
    if fields is None:
        return None
    # utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid):
    """CPU seconds of `pid`, its reaped children (cutime + cstime) and
    its living children (e.g. a postmaster with its backends, also those
    that ended meanwhile), or None."""
    fields = _stat(pid)
    if fields is None:
        return None
    total = sum(int(v) for v in fields[11:15]) / CLK_TCK
    for child in _pids():
        child_fields = _stat(child)
        if child_fields is not None and child_fields[1] == str(pid):
            total += cpu_seconds(child) or 0
    return total


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


def find_listener_pid(port, comm):
    """The process named `comm` listening on `port` (several servers may
    run on this machine), or None."""
    inodes = {f'socket:[{i}]' for i in _listening_inodes(port)}
    for pid in _pids(comm):
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


def find_broker_pid(port=5672):
    """The broker (beam.smp) listening on `port` if /proc lets us read
    its CPU time, else None."""
    pid = find_listener_pid(port, 'beam.smp')
    return pid if pid and cpu_seconds(pid) is not None else None


def _pids(comm=None):
    """The pids in /proc (only those named `comm` if given)."""
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        if comm is None:
            yield int(entry)
            continue
        try:
            with open(f'/proc/{entry}/comm') as f:
                if f.read().strip() == comm:
                    yield int(entry)
        except OSError:
            continue


def load():
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()
