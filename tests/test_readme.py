"""The README is the user's manual: every config section and key must be documented there."""
import os
import re

from utils.schema import SCHEMA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_every_config_key_is_documented_in_its_section():
    text = _readme()
    config_part = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = []
    for section, keys in SCHEMA.items():
        match = re.search(r"\*\*\[" + re.escape(section) + r"\]\*\*(.*?)(?=\n\*\*\[|\Z)", config_part, re.S)
        if not match:
            missing.append(f"[{section}]")
            continue
        missing += [f"[{section}] {key}" for key in keys if f"`{key}`" not in match.group(1)]
    assert not missing, f"README's Configuration section does not describe: {', '.join(missing)}"


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "make test" in ci and "`make test`" in _readme()
