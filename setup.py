"""gocept.amqprun: AMQP consumers the Zope Tool Kit way."""

from setuptools import find_namespace_packages
from setuptools import setup


def read(name):
    with open(name, encoding='utf-8') as f:
        return f.read()


setup(
    name='gocept.amqprun',
    version='4.0.dev0',
    author='gocept.amqprun developers',
    description='Run AMQP consumers (handlers configured with ZCML and '
                'ZConfig) with exactly-once replies.',
    long_description=read('README.txt') + '\n\n' + read('CHANGES.txt'),
    long_description_content_type='text/x-rst',
    license='ZPL 2.1',
    python_requires='>=3.11',
    package_dir={'': 'src'},
    packages=find_namespace_packages('src', include=['gocept.*']),
    include_package_data=True,
    # skeleton/: the templates of `server init`.
    package_data={'gocept.amqprun': ['*.xml', '*.zcml', 'skeleton/*.in']},
    zip_safe=False,
    install_requires=[
        # The AMQP client; 1.x is the async API the IO thread is built on.
        # Below 1.5: transport.py relies on internals of pika's plaintext
        # transport (tests/test_transport.py checks them).
        'pika >= 1.3, < 1.5',
        # Configuration file (server.conf) and its logging sections.
        'ZConfig >= 4.0',
        # One handled message is one transaction.
        'transaction >= 4.0',
        # Handlers are named utilities registered in ZCML.
        'zope.component[zcml] >= 5.0',
        'zope.configuration >= 5.0',
        'zope.event >= 5.0',
        'zope.interface >= 6.0',
        'zope.schema >= 7.0',
        # Tracebacks in log files (formatter of the example configuration).
        'zope.exceptions >= 5.0',
        # Process management (zdaemon configuration in etc/).
        'zdaemon >= 5.0',
        # <monitor>: /metrics in Prometheus' format (pure Python, no
        # dependencies; imported only when the section is configured).
        'prometheus_client >= 0.17',
    ],
    extras_require={
        'security': ['zope.security >= 6.0'],
        'readfiles': ['gocept.filestore >= 1.0'],
        'writefiles': [],
        # <amqp:outbox>: exactly-once effects in the handler's database
        # transaction.
        'sql': ['SQLAlchemy >= 2.0', 'zope.sqlalchemy >= 3.0'],
        # The status page's browser test (tests/test_statuspage.py) drives
        # the system's chromium (no browser download); .ci/run installs
        # both. Not in 'test': ~170 MB with its own driver, useless
        # without a browser, and the test skips cleanly without it.
        'browser': ['playwright >= 1.40'],
        # Traces through the daemon (`tracing`); the application brings
        # the SDK and its exporter.
        'otel': ['opentelemetry-api >= 1.20'],
        # `make docs`: the Sphinx site in docs/ (its reference is
        # generated from schema.xml, meta.zcml, the argparse parsers, the
        # metrics table and the docstrings). Sphinx 7.2: the
        # no-contents-entry option of object descriptions.
        'docs': [
            'Sphinx >= 7.2',
            'furo >= 2024.1.29',
            'repoze.sphinx.autointerface >= 1.1',
        ],
        'test': [
            'pytest >= 7.0',
            'zope.security >= 6.0',
            'gocept.filestore >= 1.0',
            'SQLAlchemy >= 2.0',
            'zope.sqlalchemy >= 3.0',
            # PostgreSQL for the outbox tests (SQLAlchemy 2's default
            # postgresql:// driver).
            'psycopg[binary] >= 3.1',
            # tests/test_tracing.py: the SDK's in-memory exporter, the
            # daemon under `opentelemetry-instrument` (the distro
            # configures the SDK from OTEL_* variables) beside pika's own
            # instrumentation. (Their releases pin each other's versions;
            # pip picks a set that fits.)
            'opentelemetry-api >= 1.20',
            'opentelemetry-sdk >= 1.27',
            'opentelemetry-distro >= 0.48b0',
            'opentelemetry-instrumentation-pika >= 0.48b0',
        ],
    },
    entry_points={
        'console_scripts': [
            'server = gocept.amqprun.main:main',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Framework :: ZODB',
        'Topic :: System :: Networking',
    ],
)
