"""The docs stay true to the code: every link into imm.py lands on what it names."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# [`name`](../imm.py#L12) must land on `def name(`; [L12](../imm.py#L12 "code") on a line containing "code".
LINK = re.compile(r'\[([^\]]+)\]\(\.\./imm\.py#L(\d+)(?: "([^"]+)")?\)')


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


def test_walkthrough_names_only_tests_that_exist():
    text = (ROOT / 'docs' / 'walkthrough.md').read_text()
    tests = (ROOT / 'tests' / 'test_imm.py').read_text()
    named = set(re.findall(r'\*(test_\w+)\*', text))
    assert len(named) >= 20
    missing = [n for n in named if f'def {n}(' not in tests]
    assert not missing, missing
