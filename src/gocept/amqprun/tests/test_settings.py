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
    with pytest.raises(TypeError):
        del settings['Foo.Bar']
    assert dict(settings) == {'Foo.Bar': 'baz'}


def test_settings_do_not_follow_changes_of_their_source():
    source = {'a': '1'}
    settings = gocept.amqprun.settings.Settings(source)
    source['a'] = '2'
    source['b'] = '3'
    assert dict(settings) == {'a': '1'}
    copy = dict(settings)
    copy['a'] = 'changed'
    assert settings['a'] == '1'
