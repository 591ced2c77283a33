"""What the reference extensions share: a directive that renders reST it
generates from the sources, and object types whose entries get a target,
an index entry and a role.

An object type registered with `add_object_type` is a directive of the
``std`` domain, ``.. TYPE:: NAME (NOTE)``: it shows the last word of NAME
(or what its `show` makes of NAME) in bold, NOTE after it, and registers
NAME (e.g. ``worker retries``) so that ``:TYPE:`NAME``` (or ``:TYPE:`text
<NAME>```) links to it from any page. tests/test_docs.py reads these
registrations from the built environment to check that nothing of the
sources is missing.
"""

import re
import textwrap

from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.domains.std import GenericObject
from sphinx.roles import XRefRole
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


class GeneratedDirective(SphinxDirective):
    """Renders the reST lines of `lines()` in place of the directive
    (section titles allowed)."""

    has_content = False

    def lines(self):
        raise NotImplementedError

    def run(self):
        source = self.get_source_info()[0]
        content = StringList()
        for line in self.lines():
            content.append(line, source)
        node = addnodes.desc_content()  # a neutral container
        nested_parse_with_titles(self.state, content, node)
        return node.children


_signature = re.compile(r'(?P<name>[^()]+?)\s*(?:\((?P<note>.*)\))?$')


class Entry(GenericObject):
    """``.. TYPE:: NAME (NOTE)``: shows `show(NAME)` in bold and NOTE
    after it; NAME is the target. An entry of the page's table of
    contents, nested in the entry it is nested in."""

    show = staticmethod(lambda name: name.split()[-1])

    def handle_signature(self, sig, signode):
        match = _signature.match(sig.strip())
        name = ' '.join(match.group('name').split())
        shown = self.show(name)
        signode['amqprun_shown'] = shown
        signode += addnodes.desc_name(shown, shown)
        if match.group('note'):
            note = f' ({match.group("note")})'
            signode += addnodes.desc_annotation(note, note)
        return name

    # Sphinx's hooks for the table of contents of the page.
    def _object_hierarchy_parts(self, signode):
        return tuple(signode.get('amqprun_shown', '').split())

    def _toc_entry_name(self, signode):
        return signode.get('amqprun_shown', '')


def add_object_type(app, name, objname, show=None):
    """Register the object type `name` (directive and role). A role whose
    target does not exist warns (an error with -W), also without
    `nitpicky`: a misspelt key must not render as plain text."""
    app.add_object_type(name, name, objname=objname)
    app.add_role_to_domain('std', name, XRefRole(warn_dangling=True),
                           override=True)
    attributes = {'indextemplate': f'pair: %s; {objname}'}
    if show is not None:
        attributes['show'] = staticmethod(show)
    app.add_directive_to_domain(
        'std', name, type(f'{name}_entry', (Entry,), attributes),
        override=True)


def indent(text, prefix='   '):
    """`text` (a description, possibly indented as in XML) as lines
    indented by `prefix`."""
    lines = dedent(text)
    return [prefix + line if line else '' for line in lines]


def dedent(text):
    """The lines of `text`, with the indentation of its later lines
    removed (the first line of an XML description starts right after
    the tag)."""
    text = (text or '').strip('\n')
    if not text:
        return []
    first, _, rest = text.partition('\n')
    return [first.strip()] + textwrap.dedent(rest).splitlines()
