# Daily use from a checkout (see README.txt). Needs python3 (>= 3.11) with
# venv, and a RabbitMQ broker on localhost:5672 for `run` and `start`.
#
#   make run      set up .venv and run the example daemon in the foreground
#   make test     set up .venv and run the tests
#   make start / status / stop   the example daemon under zdaemon (var/)
#   make check    check etc/server.conf against the broker
#   make buildout the buildout deployment (bin/server, bin/serverctl)

PYTHON ?= python3
VENV = .venv
# The example handler module (etc/example.py) must be importable.
RUN = PYTHONPATH=etc $(VENV)/bin/server

.PHONY: venv install run start status stop check test buildout clean

venv: $(VENV)/bin/python

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/bin/python setup.py
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: install
	$(RUN) etc/server.conf

var:
	mkdir -p var

start: install var
	$(VENV)/bin/zdaemon -C etc/zdaemon.conf start

status: install
	$(VENV)/bin/zdaemon -C etc/zdaemon.conf status

stop: install
	$(VENV)/bin/zdaemon -C etc/zdaemon.conf stop

check: install
	$(RUN) --check etc/server.conf

test: install
	$(VENV)/bin/pytest

buildout: $(VENV)/bin/python
	$(VENV)/bin/pip install zc.buildout
	$(VENV)/bin/buildout

clean:
	rm -rf $(VENV) bin parts develop-eggs eggs .installed.cfg var
