"""The documentation builds without a warning, and its reference names
everything of the sources: every section and key of schema.xml, every
ZCML directive and attribute, every command, metric, interface and
public name of `testing`.

The docs (docs/ of the checkout) are built once per test session, as
``make docs`` builds them (warnings are errors), into a temporary
directory; the checks read what the build registered (the objects of its
environment) and look for each object's anchor in its HTML page. The
expected names are read from the sources here, not from the extensions
that render them. Skipped without Sphinx (the ``docs`` extra) or without
docs/ (an installed package).
"""

import argparse
import importlib
import importlib.resources
import pathlib
import pickle
import subprocess
import sys
import xml.etree.ElementTree

import pytest
import zope.interface.interface
import zope.schema

import gocept.amqprun.cli
import gocept.amqprun.config
import gocept.amqprun.interfaces
import gocept.amqprun.metrics
import gocept.amqprun.testing


DOCS = pathlib.Path(__file__).resolve().parents[4] / 'docs'
META = '{http://namespaces.zope.org/meta}'
# The prefix the reference gives the directives of our namespace.
PREFIX = {'http://namespaces.gocept.com/amqp': 'amqp'}


class Build:
    """A build of the docs: its output directory and the objects it
    registered ({(type, name): (page, anchor)} of the std domain,
    {name: (page, anchor, type)} of the Python domain)."""

    def __init__(self, html, doctrees):
        self.html = html
        with open(doctrees / 'environment.pickle', 'rb') as f:
            env = pickle.load(f)
        self.std = dict(env.domaindata['std']['objects'])
        self.py = {name: (entry.docname, entry.node_id, entry.objtype)
                   for name, entry in env.domaindata['py']['objects'].items()}
        self._pages = {}

    def page(self, docname):
        if docname not in self._pages:
            self._pages[docname] = (
                self.html / f'{docname}.html').read_text(encoding='utf-8')
        return self._pages[docname]

    def missing(self, objtype, names):
        """Those of `names` without an object `objtype` whose anchor is in
        its page."""
        result = []
        for name in names:
            found = self.std.get((objtype, name))
            if found is None or f'id="{found[1]}"' not in self.page(
                    found[0]):
                result.append(name)
        return result


@pytest.fixture(scope='session')
def docs(tmp_path_factory):
    for module in ('sphinx', 'furo', 'repoze.sphinx.autointerface'):
        pytest.importorskip(
            module, reason='the documentation needs the extra "docs" '
            "(pip install -e '.[docs]')")
    if not (DOCS / 'conf.py').exists():
        pytest.skip(f'no documentation sources at {DOCS}')
    out = tmp_path_factory.mktemp('docs')
    result = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q',
         '-b', 'html', '-d', str(out / 'doctrees'), str(DOCS),
         str(out / 'html')],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f'sphinx-build failed:\n{result.stdout}\n{result.stderr}')
    return Build(out / 'html', out / 'doctrees')


def package_xml(name):
    resource = importlib.resources.files('gocept.amqprun') / name
    return xml.etree.ElementTree.fromstring(resource.read_bytes())


def test_the_docs_build_without_warnings(docs):
    # The fixture asserts the build; the front page is there.
    assert (docs.html / 'index.html').exists()
    assert 'reference/index' in docs.page('index')


def test_reference_names_every_section_and_key_of_schema_xml(docs):
    root = package_xml('schema.xml')
    sections, keys = [], []
    for sectiontype in root.iter('sectiontype'):
        name = sectiontype.get('name')
        for key in sectiontype.iter('key'):
            # '+': any key (<settings>), shown as KEY.
            keys.append(f'{name} {key.get("name").replace("+", "KEY")}')
    for section in root.iter('section'):
        sections.append(section.get('type'))
    for multisection in root.iter('multisection'):
        sections.append(multisection.get('type'))
    # The sections schema.xml imports from ZConfig (<eventlog>, <logger>)
    # and their keys, as the daemon's schema has them.
    schema = gocept.amqprun.config.load_schema()
    own = {t.get('name') for t in root.iter('sectiontype')}
    for name in sections:
        if name not in own:
            keys += [f'{name} {key}' for key, info in schema.gettype(name)
                     if key is not None]
    assert len(sections) == 6 and len(keys) > 30
    assert docs.missing('configsection', sections) == []
    assert docs.missing('configkey', keys) == []


def test_every_key_of_schema_xml_has_a_description():
    # The reference shows them; a key without one tells the reader
    # nothing but its name.
    undescribed = [
        f'<{sectiontype.get("name")}> {key.get("name")}'
        for sectiontype in package_xml('schema.xml').iter('sectiontype')
        for key in sectiontype.iter('key')
        if not (key.findtext('description') or '').strip()]
    assert undescribed == []


def zcml_directives():
    """{name: schema interface} of the directives meta.zcml declares."""
    result = {}
    for group in package_xml('meta.zcml').iter(f'{META}directives'):
        prefix = PREFIX[group.get('namespace')]
        for directive in group.iter(f'{META}directive'):
            module, _, schema = ('gocept.amqprun' + directive.get(
                'schema')).rpartition('.')
            result[f'{prefix}:{directive.get("name")}'] = getattr(
                importlib.import_module(module), schema)
    return result


def test_every_zcml_directive_and_attribute_is_described():
    directives = zcml_directives()
    assert [n for n, schema in directives.items() if not schema.__doc__] \
        == []
    assert [f'{n} {a}' for n, schema in directives.items()
            for a, field in zope.schema.getFieldsInOrder(schema)
            if not field.title] == []


def test_reference_names_every_zcml_directive_and_attribute(docs):
    directives = zcml_directives()
    attributes = [f'{name} {attribute}'
                  for name, schema in directives.items()
                  for attribute in zope.schema.getFieldNamesInOrder(schema)]
    assert list(directives) == [
        'amqp:writefiles', 'amqp:readfiles', 'amqp:outbox']
    assert docs.missing('zcmldirective', list(directives)) == []
    assert docs.missing('zcmlattribute', attributes) == []


def test_reference_names_every_command_and_action(docs):
    commands = ['server']
    for name in gocept.amqprun.cli.COMMANDS:
        commands.append(f'server {name}')
        parser = gocept.amqprun.cli.command_parser(name)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands += [f'server {name} {choice}'
                             for choice in action.choices]
    assert 'server parked replay' in commands
    assert docs.missing('command', commands) == []
    for code in ('EXIT_OK', 'EXIT_FAILURE', 'EXIT_CONFIG'):
        assert f'gocept.amqprun.interfaces.{code}' in docs.py


def test_reference_names_every_metric(docs):
    names = [m.exposed for m in gocept.amqprun.metrics.METRICS]
    assert 'amqprun_messages_total' in names
    assert docs.missing('metric', names) == []


def test_reference_documents_the_public_python_api(docs):
    names = [
        'handler.declare', 'handler.Handler', 'message.Message',
        'message.Header', 'settings.Settings', 'server.Server',
        'parameters.Parameters', 'retry.RetryPolicy', 'errors.AMQPError',
        'errors.CommitInDoubt', 'log.JSONFormatter', 'log.TraceFormatter',
        'parked.Parked', 'outbox.Outbox']
    assert [n for n in names if f'gocept.amqprun.{n}' not in docs.py] == []


def test_reference_documents_every_interface_and_testing_name(docs):
    module = gocept.amqprun.interfaces
    interfaces = [f'{module.__name__}.{name}'
                  for name, value in vars(module).items()
                  if isinstance(value, zope.interface.interface.InterfaceClass)
                  and value.__module__ == module.__name__]
    assert len(interfaces) >= 10
    for name in interfaces:
        assert docs.py.get(name, (None, None, None))[2] == 'interface', name
    missing = [name for name in gocept.amqprun.testing.__all__
               if f'gocept.amqprun.testing.{name}' not in docs.py]
    # Constants without a docstring are named in the module's docstring.
    assert all(name.isupper() for name in missing), missing
