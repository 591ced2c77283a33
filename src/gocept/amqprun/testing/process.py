"""The daemon under test: in a subprocess (the real `server` entry point)
or in a thread of the test process (a `server.Server`)."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

from gocept.amqprun.testing.wait import wait_for


class ServerProcess:
    """The real `server` entry point in a subprocess.

    `zcml` is the body of a ZCML file (inside <configure>, gocept.amqprun's
    configure.zcml included); `handlers` a Python module's source that it
    may name as `handlers.<name>`; `settings` a dict for <settings>;
    `extra` more configuration text.
    """

    def __init__(self, directory, parameters, zcml='', handlers='',
                 amount=2, settings=None, extra='', server_extra='',
                 worker_extra=''):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = self.directory / 'server.log'
        self.process = None
        (self.directory / 'handlers.py').write_text(
            textwrap.dedent(handlers))
        (self.directory / 'server.zcml').write_text(
            '<configure xmlns="http://namespaces.zope.org/zope"\n'
            '           xmlns:amqp="http://namespaces.gocept.com/amqp">\n'
            '  <include package="gocept.amqprun" />\n'
            f'{textwrap.dedent(zcml)}\n</configure>\n')
        settings_text = ''
        if settings:
            settings_text = '<settings>\n' + ''.join(
                f'  {k} {v}\n' for k, v in settings.items()) + '</settings>\n'
        p = parameters
        (self.directory / 'server.conf').write_text(
            '<eventlog>\n  level DEBUG\n  <logfile>\n'
            f'    path {self.log}\n'
            '    formatter zope.exceptions.log.Formatter\n'
            '    format %(asctime)s %(levelname)s %(name)s %(message)s\n'
            '  </logfile>\n</eventlog>\n'
            '<logger>\n  name pika\n  level WARNING\n</logger>\n'
            '<amqp-server>\n'
            f'  hostname {p.hostname}\n'
            f'  port {p.port or 5672}\n'
            f'  username {p.username}\n'
            f'  password {p.password}\n'
            f'  virtual_host {p.virtual_host}\n'
            f'{server_extra}'
            '</amqp-server>\n'
            '<worker>\n'
            f'  amount {amount}\n'
            f'  component-configuration {self.directory}/server.zcml\n'
            f'{worker_extra}'
            '</worker>\n' + settings_text + extra)

    @property
    def config(self):
        return self.directory / 'server.conf'

    def start(self, wait=True, timeout=30, wrapper=(), environ=None):
        """Start the daemon; with `wait`, until it consumes. `wrapper`: a
        command line that runs the daemon's (``opentelemetry-instrument``,
        say); `environ`: more environment variables."""
        env = dict(os.environ)
        env.update(environ or {})
        env['PYTHONPATH'] = os.pathsep.join(
            [str(self.directory)] + sys.path)
        self.output = open(self.directory / 'output.txt', 'ab')
        self.process = subprocess.Popen(
            list(wrapper)
            + [sys.executable, '-m', 'gocept.amqprun', str(self.config)],
            cwd=self.directory, env=env, stdout=self.output,
            stderr=subprocess.STDOUT)
        if wait:
            self.wait_for_log('gocept.amqprun.main Started.', timeout)
        return self

    def log_text(self):
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ''

    def output_text(self):
        return (self.directory / 'output.txt').read_text()

    def wait_for_log(self, text, timeout=30, count=1):
        """Wait until `text` is in the log `count` times."""
        def found():
            if self.log_text().count(text) >= count:
                return True
            if self.process.poll() is not None:
                raise AssertionError(
                    f'server exited with {self.process.returncode} before '
                    f'logging {text!r}:\n{self.output_text()}\n'
                    f'{self.log_text()}')
        wait_for(found, timeout, interval=0.05,
                 message=f'{text!r} not logged within {timeout} s:\n'
                 f'{self.log_text()}')

    def stop(self, signum=signal.SIGTERM, timeout=30):
        """Send `signum`, wait for the exit, return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f'server did not exit within {timeout} s')
        self.output.close()
        return self.process.returncode

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.output.close()

    def wait(self, timeout=30):
        """Wait for the process to exit by itself; return the exit code."""
        code = self.process.wait(timeout)
        self.output.close()
        return code


class ServerThread:
    """A `server.Server` running in a thread of the test process."""

    def __init__(self, server):
        self.server = server
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.server.start()
        except Exception as e:
            self.error = e

    def start(self, timeout=30):
        self.thread.start()
        if not self.server.wait_until_running(timeout):
            raise AssertionError(f'server not running: {self.error!r}')
        return self

    def stop(self):
        self.server.stop()
        self.thread.join(30)
