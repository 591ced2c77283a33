"""Sphinx configuration of the gocept.amqprun documentation.

Built by ``make docs`` (``sphinx-build -W --keep-going -b html docs
docs/_build/html``: warnings are errors). The reference pages are
generated from the sources by the extensions in ``_ext/``; the package
must be importable (``make docs`` installs it with its ``docs`` extra).
"""

import importlib.metadata
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(__file__), '_ext'))

project = 'gocept.amqprun'
author = 'gocept.amqprun developers'
copyright = 'gocept.amqprun developers'
release = importlib.metadata.version('gocept.amqprun')
version = '.'.join(release.split('.')[:2])

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.viewcode',
    'repoze.sphinx.autointerface',
    # Ours (docs/_ext/): the docstrings' convention as reST, and the
    # reference generated from the sources.
    'docstrings',
    'interfacesref',
    'configref',
    'zcmlref',
    'cliref',
    'metricsref',
]

exclude_patterns = ['_build']
# The docstrings write `name` for a Python object: link it when Sphinx
# knows it, else show it as code (nitpicky is off, so no warning).
default_role = 'py:obj'
nitpicky = False

autodoc_member_order = 'bysource'
autodoc_default_options = {
    'show-inheritance': True,
}
# Signatures as written; the project does not annotate types.
autodoc_typehints = 'none'
# repoze.sphinx.autointerface: members in the order of the interface.
autointerface_members_order = 'bysource'

html_theme = 'furo'
html_title = f'gocept.amqprun {release}'
html_static_path = []
