"""The ISettings utility: the configuration file's ``<settings>``."""

import collections.abc
import zope.interface
import gocept.amqprun.interfaces


@zope.interface.implementer(gocept.amqprun.interfaces.ISettings)
class Settings(collections.abc.Mapping):
    """A read-only mapping of str to str, filled by `update`."""

    def __init__(self, data=None):
        self._data = {}
        if data:
            self.update(data)

    def update(self, mapping):
        self._data.update(mapping)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __repr__(self):
        return f'<Settings {self._data!r}>'
