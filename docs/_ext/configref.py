"""The configuration file's reference, generated from ``schema.xml``.

``.. amqprun-configuration::`` walks the schema that the daemon loads
(`gocept.amqprun.config.load_schema`) and renders every section with
its keys -- datatype, default, lower bound or allowed values, whether
required, and the description: first the sections of schema.xml's own
section types, then those it imports from ZConfig (the logging
sections), then the handler sections that may be nested in those.

Keys of ``<amqp-server>`` take their defaults from
`gocept.amqprun.parameters.Parameters` (the schema leaves them out, so
that the section passes only what is set).

Objects: ``configsection`` (``:configsection:`worker```) and
``configkey`` (``:configkey:`worker retries```).
"""

import importlib.resources
import xml.etree.ElementTree

import ZConfig.info

import gocept.amqprun.config
import gocept.amqprun.parameters
import gocept.amqprun.retry

from generated import GeneratedDirective
from generated import add_object_type
from generated import indent


# Keys whose values are checked against a list after parsing.
CHOICES = {
    ('worker', 'commit-mode'): gocept.amqprun.config.COMMIT_MODES,
    ('worker', 'park'): gocept.amqprun.retry.PARK_MODES,
}


def occurrence(info):
    """How often a section may appear."""
    if info.maxOccurs == ZConfig.info.Unbounded:
        return 'optional, any number' if not info.minOccurs \
            else 'required, any number'
    return 'required' if info.minOccurs else 'optional'


def datatype_name(schema, datatype):
    """The name of a key's datatype as a reader knows it: ZConfig's
    names (``integer``, ``existing-file``), the last part of a dotted
    one (``monitor address``)."""
    name = schema.registry.find_name(datatype)
    if '.' in name:
        name = name.rsplit('.', 1)[1].replace('_', ' ')
    return name


def default_of(section, key, info):
    if section == 'amqp-server':
        value = gocept.amqprun.parameters.Parameters.defaults.get(
            key.replace('-', '_'))
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return None if value is None else str(value)
    value = info.getdefault()
    if isinstance(value, ZConfig.info.ValueInfo):
        return value.value
    if isinstance(value, list) and value:
        return ', '.join(v.value for v in value)
    return None


def minimum_of(section, key):
    for name, key_name, minimum in gocept.amqprun.config.MINIMUMS:
        if (name, key_name) == (section, key):
            return minimum
    return None


def key_note(schema, section, key, info):
    """The annotation of a key: datatype, default, bounds."""
    parts = [datatype_name(schema, info.datatype)]
    if info.minOccurs:
        parts.append('required')
    default = default_of(section, key, info)
    if default not in (None, ''):
        parts.append(f'default: {default}')
    minimum = minimum_of(section, key)
    if minimum is not None:
        parts.append(f'at least {minimum}')
    choices = CHOICES.get((section, key))
    if choices:
        parts.append('one of: ' + ', '.join(choices))
    if info.maxOccurs == ZConfig.info.Unbounded:
        parts.append('may be repeated')
    return ', '.join(parts)


def own_section_types():
    """The names of the section types that schema.xml defines itself
    (the others it imports from ZConfig)."""
    resource = importlib.resources.files('gocept.amqprun') / 'schema.xml'
    root = xml.etree.ElementTree.fromstring(resource.read_bytes())
    return [element.get('name') for element in root.iter('sectiontype')]


def section_lines(schema, info):
    """A top-level section: its occurrence, description and keys, and
    the section types that may be nested in it."""
    sectiontype = info.sectiontype
    lines = [f'.. configsection:: {sectiontype.name} ({occurrence(info)})',
             '']
    lines += indent(sectiontype.description) + ['']
    for name, key_info in sectiontype:
        if isinstance(key_info, ZConfig.info.SectionInfo):
            lines += ['   Sections inside it (' + occurrence(key_info)
                      + '): ' + ', '.join(
                          f':configsection:`<{n}> <{n}>`'
                          for n in concrete_types(key_info)) + '.', '']
        else:
            lines += key_lines(schema, sectiontype.name, name, key_info)
    return lines


def concrete_types(info):
    """The names of the section types a nested section may have."""
    sectiontype = info.sectiontype
    if sectiontype.isabstract():
        return sectiontype.getsubtypenames()
    return [sectiontype.name]


def key_lines(schema, section, name, info, in_contents=True):
    shown = 'KEY' if name == '+' else name
    note = key_note(schema, section, name, info)
    lines = [f'   .. configkey:: {section} {shown} ({note})']
    if not in_contents:
        # The page's table of contents names the section only.
        lines.append('      :no-contents-entry:')
    return lines + [''] + indent(info.description, '      ') + ['']


def nested_section_lines(schema, name):
    """A section type used inside another section (a log handler)."""
    sectiontype = schema.gettype(name)
    lines = [f'.. configsection:: {name}', '']
    lines += indent(sectiontype.description) + ['']
    for key, key_info in sectiontype:
        lines += key_lines(schema, name, key, key_info, in_contents=False)
    return lines


def heading(title, underline='-'):
    return [title, underline * len(title), '']


class ConfigurationDirective(GeneratedDirective):
    """The daemon's own sections, then the logging sections that the
    schema imports from ZConfig, then the sections nested in those."""

    def lines(self):
        schema = gocept.amqprun.config.load_schema()
        own = own_section_types()
        top = list(schema)
        result = heading("The daemon's sections")
        for name, info in top:
            if info.sectiontype.name in own:
                result += section_lines(schema, info)
        result += heading('Logging (from ZConfig)')
        nested = []
        for name, info in top:
            if info.sectiontype.name in own:
                continue
            result += section_lines(schema, info)
            for key, key_info in info.sectiontype:
                if isinstance(key_info, ZConfig.info.SectionInfo):
                    nested += [n for n in concrete_types(key_info)
                               if n not in nested]
        if nested:
            result += heading('Log handler sections (from ZConfig)')
            for name in nested:
                result += nested_section_lines(schema, name)
        return result


def setup(app):
    add_object_type(app, 'configsection', 'configuration section',
                    show=lambda name: f'<{name.split()[-1]}>')
    add_object_type(app, 'configkey', 'configuration key')
    app.add_directive('amqprun-configuration', ConfigurationDirective)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
