"""``.. autointerfaces:: MODULE``: every zope interface that MODULE
defines, in the order of its source, as repoze.sphinx.autointerface's
``autointerface`` with its members (autodoc's ``automodule`` passes them
over)."""

import importlib

import zope.interface.interface

from generated import GeneratedDirective


class AutoInterfacesDirective(GeneratedDirective):

    required_arguments = 1

    def lines(self):
        module = importlib.import_module(self.arguments[0])
        result = []
        for name, value in vars(module).items():
            if isinstance(value, zope.interface.interface.InterfaceClass) \
                    and value.__module__ == module.__name__:
                result += [f'.. autointerface:: {module.__name__}.{name}',
                           '   :members:', '']
        return result


def setup(app):
    app.setup_extension('repoze.sphinx.autointerface')
    app.add_directive('autointerfaces', AutoInterfacesDirective)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
