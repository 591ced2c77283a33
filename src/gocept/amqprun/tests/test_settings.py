import gocept.amqprun.interfaces
import gocept.amqprun.settings
import pytest
import zope.interface.verify


def test_settings_is_a_read_only_mapping_with_update():
    settings = gocept.amqprun.settings.Settings()
    assert zope.interface.verify.verifyObject(
        gocept.amqprun.interfaces.ISettings, settings)
    settings.update({'Foo.Bar': 'baz'})
    assert settings['Foo.Bar'] == 'baz'
    assert settings.get('missing') is None
    assert dict(settings) == {'Foo.Bar': 'baz'}
    assert len(settings) == 1
    with pytest.raises(TypeError):
        settings['x'] = 'y'
