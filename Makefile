# Daily use from a checkout (see README.txt). Needs python3 (>= 3.11) with
# venv; `start` and `check` need a RabbitMQ broker on localhost:5672, `run`
# starts a private one if none answers there and Debian's rabbitmq-server
# is installed (etc/run_example.py).
#
#   make run      set up .venv and run the example daemon in the foreground
#   make test     set up .venv and run the tests
#   make tox      the tests on every supported Python found (tox.ini;
#                 TOXENV=py312-fast make tox: one, the fast tests only)
#   make start / status / stop   the example daemon under zdaemon (var/)
#   make check    check etc/server.conf against the broker
#   make buildout the buildout deployment (bin/server, bin/serverctl)
#   make docs     the documentation (docs/) as HTML in docs/_build/html;
#                 Sphinx warnings are errors

PYTHON ?= python3
VENV = .venv
# The example handler module (etc/example.py) must be importable.
RUN = PYTHONPATH=etc $(VENV)/bin/server
# pyenv's interpreters of the supported versions, for tox to find.
PYENV_ROOT ?= $(HOME)/.pyenv
PYENV_VERSIONS = $(PYENV_ROOT)/versions/3.1[1-3].*
PYENV_PYTHONS = $(wildcard $(PYENV_VERSIONS)/bin/python3.1[1-3])

.PHONY: venv install run start status stop check test tox buildout docs \
	clean

venv: $(VENV)/bin/python

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/bin/python setup.py
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: install
	PYTHONPATH=etc $(VENV)/bin/python etc/run_example.py etc/server.conf

var:
	mkdir -p var

start: install var
	$(VENV)/bin/zdaemon -C etc/zdaemon.conf start

status: install
	$(VENV)/bin/zdaemon -C etc/zdaemon.conf status

stop: install
	$(VENV)/bin/zdaemon -C etc/zdaemon.conf stop

check: install
	$(RUN) check etc/server.conf

test: install
	$(VENV)/bin/pytest

tox: install
	$(VENV)/bin/pip install -q 'tox >= 4'
	$(VENV)/bin/tox $(if $(PYENV_PYTHONS),--discover $(PYENV_PYTHONS))

buildout: $(VENV)/bin/python
	$(VENV)/bin/pip install zc.buildout
	$(VENV)/bin/buildout

# The test extra too: `make docs` must not take away what `make test`
# needs (pip leaves installed packages alone, so this only adds).
$(VENV)/.installed-docs: $(VENV)/.installed setup.py
	$(VENV)/bin/pip install -e '.[test,docs]'
	touch $@

# -E: read every page anew; the reference is generated from sources that
# Sphinx does not watch (schema.xml, meta.zcml, the code).
docs: $(VENV)/.installed-docs
	$(VENV)/bin/sphinx-build -E -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .tox bin parts develop-eggs eggs .installed.cfg var \
		docs/_build
