"""The docs stay true to the code: every link into imm.py lands on what it names and says the line it lands on,
and the README's settings and flag tables are the ones the code has.

    python tests/test_docs.py       # after a change to imm.py, settings.py or a parser: rewrite the links and tables
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts live at the repository root

import sample  # noqa: E402
import settings  # noqa: E402

# [`name`](../imm.py#L12) must land on `def name(`; [L12](../imm.py#L12 "code") on a line containing "code", and a
# label that names a line (L12, imm.py#L12) names the line it links to.
LINK = re.compile(r'\[([^\]]+)\]\(\.\./imm\.py#L(\d+)(?: "([^"]+)")?\)')
LINE_LABEL = re.compile(r'(?:imm\.py#)?L(\d+)')
GENERATED = re.compile(r'(<!-- generated: (.+?) -->\n).*?(<!-- end generated -->)', re.S)


def target_line(label, code, lines):
    """The line (1-based) of imm.py that a link's label or code title names: the one line that holds it."""
    wanted = f'def {label.strip("`")}(' if label.startswith('`') else code
    found = [i + 1 for i, line in enumerate(lines) if wanted and wanted in line]
    return found[0] if len(found) == 1 else None


def test_walkthrough_links_into_imm_py_land_on_what_they_name():
    text = (ROOT / 'docs' / 'walkthrough.md').read_text()
    lines = (ROOT / 'imm.py').read_text().splitlines()
    links = LINK.findall(text)
    assert len(links) >= 30
    for label, line, code in links:
        target = lines[int(line) - 1]
        if label.startswith('`'):
            assert f'def {label.strip("`")}(' in target, f'{label} -> imm.py line {line} is {target!r}'
        else:
            assert code, f'link {label} to imm.py line {line} needs a "code" title saying what it points at'
            assert code in target, f'{label} -> imm.py line {line} is {target!r}, expected it to contain {code!r}'


def test_walkthrough_line_labels_equal_their_targets():
    text = (ROOT / 'docs' / 'walkthrough.md').read_text()
    numbered = [(label, line) for label, line, _ in LINK.findall(text) if LINE_LABEL.fullmatch(label)]
    assert len(numbered) >= 10
    wrong = [f'{label} links to L{line}' for label, line in numbered if LINE_LABEL.fullmatch(label)[1] != line]
    assert not wrong, wrong


def test_walkthrough_names_only_tests_that_exist():
    text = (ROOT / 'docs' / 'walkthrough.md').read_text()
    tests = (ROOT / 'tests' / 'test_imm.py').read_text()
    named = set(re.findall(r'\*(test_\w+)\*', text))
    assert len(named) >= 20
    missing = [n for n in named if f'def {n}(' not in tests]
    assert not missing, missing


# ---- The README's generated tables

def flag_table(parser):
    """A parser's flags as a Markdown table: the flag (and its --no- form) and its help, %(default)s filled in."""
    rows = ['| flag | what it does |', '|---|---|']
    for action in parser._actions:
        if not action.option_strings or action.dest == 'help':
            continue
        flags = ', '.join(f'`{f}`' for f in action.option_strings)
        text = ((action.help or '') % {'default': action.default}).replace('|', r'\|')
        rows.append(f'| {flags} | {text} |')
    return '\n'.join(rows)


def settings_table(table=settings.TABLE, label=lambda name: '--' + name.replace('_', '-')):
    """settings.TABLE (or SAMPLING) as a Markdown table: one row per setting (labelled by its train.py flag),
    one column per kind of data, and the source."""
    rows = [f"| setting | {' | '.join(settings.KINDS)} | where the value comes from |",
            '|---' * (len(settings.KINDS) + 2) + '|']
    for name, *values, source in table:
        rows.append(f"| `{label(name)}` | {' | '.join(f'`{v}`' for v in values)} | {source} |")
    return '\n'.join(rows)


TABLES = {'settings table': settings_table, 'sampling table': lambda: settings_table(settings.SAMPLING, str),
          'train.py flags': lambda: flag_table(settings.parser()), 'sample.py flags': lambda: flag_table(sample.parser())}


def regenerate(readme):
    return GENERATED.sub(lambda m: f"{m[1]}{TABLES[m[2]]()}\n{m[3]}", readme)


def test_readme_tables_are_generated_from_the_code():
    readme = (ROOT / 'README.md').read_text()
    assert sorted(m[2] for m in GENERATED.finditer(readme)) == sorted(TABLES)
    assert readme == regenerate(readme), 'README tables are stale: run python tests/test_docs.py'


def test_every_flag_of_the_table_says_its_default_is_the_table():
    helps = {a.dest: a.help for a in settings.parser()._actions}
    missing = [name for name, *_ in settings.TABLE if 'settings table' not in helps[name]]
    assert not missing, missing


if __name__ == '__main__':
    path = ROOT / 'docs' / 'walkthrough.md'
    lines = (ROOT / 'imm.py').read_text().splitlines()

    def retarget(m):
        label, line, code = m.groups()
        found = target_line(label, code, lines) or int(line)
        label = f"{'imm.py#' if label.startswith('imm.py#') else ''}L{found}" if LINE_LABEL.fullmatch(label) else label
        return f'[{label}](../imm.py#L{found}' + (f' "{code}")' if code else ')')
    path.write_text(LINK.sub(retarget, path.read_text()))
    (ROOT / 'README.md').write_text(regenerate((ROOT / 'README.md').read_text()))
    print(f'rewrote the imm.py links of {path} and the generated tables of README.md')
