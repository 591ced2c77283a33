"""The ZCML directives' reference, generated from ``meta.zcml``.

``.. amqprun-zcml::`` reads the package's ``meta.zcml`` and renders every
directive it declares (``meta:directive``, also inside
``meta:directives``) with the docstring of its schema interface, and
every attribute of that schema in the schema's order: its field type,
whether it is required, its default (if the field has one), title and
description.

Objects: ``zcmldirective`` (``:zcmldirective:`amqp:writefiles```) and
``zcmlattribute`` (``:zcmlattribute:`amqp:writefiles queue_name```). The
prefix of the names (``amqp``) is the one the package's examples use for
the directives' namespace.
"""

import collections
import importlib
import importlib.resources
import inspect
import xml.etree.ElementTree

import zope.schema

from generated import GeneratedDirective
from generated import add_object_type
from generated import indent


META = '{http://namespaces.zope.org/meta}'
# The prefix for the namespaces of the directives in names and examples.
PREFIXES = {'http://namespaces.gocept.com/amqp': 'amqp'}

Directive = collections.namedtuple(
    'Directive', 'namespace name schema handler')


def resolve(package, dotted):
    """A dotted name of meta.zcml (``.zcml.IWriteFilesDirective`` is
    relative to `package`) -> the object."""
    if dotted.startswith('.'):
        dotted = package + dotted
    module, _, name = dotted.rpartition('.')
    return getattr(importlib.import_module(module), name)


def directives(package='gocept.amqprun', filename='meta.zcml'):
    """The `Directive`s that `filename` of `package` declares, in order."""
    resource = importlib.resources.files(package) / filename
    root = xml.etree.ElementTree.fromstring(resource.read_bytes())
    result = []

    def walk(element, namespace):
        for child in element:
            if child.tag == f'{META}directives':
                walk(child, child.get('namespace'))
            elif child.tag == f'{META}directive':
                result.append(Directive(
                    child.get('namespace', namespace), child.get('name'),
                    resolve(package, child.get('schema')),
                    resolve(package, child.get('handler'))))
    walk(root, None)
    return result


def qualified(directive):
    prefix = PREFIXES.get(directive.namespace)
    return f'{prefix}:{directive.name}' if prefix else directive.name


def field_type(field):
    """`field`'s type as the class names of zope.schema and
    zope.configuration say it (``Tokens of TextLine``)."""
    name = type(field).__name__
    value_type = getattr(field, 'value_type', None)
    if value_type is not None:
        name += f' of {type(value_type).__name__}'
    return name


def field_note(field):
    parts = [field_type(field),
             'required' if field.required else 'optional']
    if getattr(field, 'min', None) is not None:
        parts.append(f'at least {field.min}')
    if field.default not in (None, ''):
        parts.append(f'default: {field.default}')
    return ', '.join(parts)


def directive_lines(directive):
    name = qualified(directive)
    lines = [f'.. zcmldirective:: {name}', '']
    lines += indent(inspect.getdoc(directive.schema)) + ['']
    for attribute, field in zope.schema.getFieldsInOrder(directive.schema):
        lines += [f'   .. zcmlattribute:: {name} {attribute} '
                  f'({field_note(field)})', '']
        lines += indent(field.title, '      ') + ['']
        if field.description:
            lines += indent(field.description, '      ') + ['']
    return lines


class ZCMLDirective(GeneratedDirective):

    def lines(self):
        result = []
        for directive in directives():
            result += directive_lines(directive)
        return result


def setup(app):
    add_object_type(app, 'zcmldirective', 'ZCML directive',
                    show=lambda name: f'<{name}>')
    add_object_type(app, 'zcmlattribute', 'ZCML attribute')
    app.add_directive('amqprun-zcml', ZCMLDirective)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
