"""The project's docstring convention as reST, for autodoc.

Docstrings describe arguments and attributes as lines ``name: text``
(several names separated by commas), the text's further lines indented::

    retries: retries after the first failure (0: park at once); also
        the number of unsettled returns ...
    delay: seconds before the first retry.

Plain reST reads such lines as a paragraph that is unexpectedly indented.
This `autodoc-process-docstring` handler turns each run of them into a
definition list (the names as code), with the blank lines around it that
reST needs. Other lines are left alone.
"""

import re


# Argument names are lower-case: "Decorator: ..." is a sentence.
_item = re.compile(
    r'(?P<names>[a-z_]\w*(?:, [a-z_]\w*)*): (?P<text>\S.*)$')


def convert(lines):
    """`lines` (a cleaned docstring) with the ``name: text`` items as a
    definition list."""
    result = []
    in_list = False
    previous_blank = True
    for line in lines:
        match = _item.match(line)
        continuation = in_list and line.startswith(' ') and line.strip()
        if match and (previous_blank or in_list):
            if not in_list and result and result[-1] != '':
                result.append('')
            names = ', '.join(
                f'``{name}``' for name in match.group('names').split(', '))
            result += [names, f'    {match.group("text")}']
            in_list = True
        elif continuation:
            result.append(f'    {line.strip()}')
        else:
            if in_list and line.strip():
                result.append('')
            in_list = False
            result.append(line)
        previous_blank = not line.strip()
    return result


def process_docstring(app, what, name, obj, options, lines):
    lines[:] = convert(lines)


def setup(app):
    app.connect('autodoc-process-docstring', process_docstring)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
