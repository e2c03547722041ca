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


# ----------------------------------------------------------------------------
# The README's commands, typed into a fresh shell as a new user would
# ----------------------------------------------------------------------------

FRESH_PATH = "/usr/local/bin:/usr/bin:/bin"  # a login shell's PATH: no venv on it


def _first_commands():
    """The indented command block that opens the README's Installation section."""
    install = _readme().split("## Installation", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"\n\n((?: {4}\S.*\n)+)", install)
    assert match, "README's Installation section quotes no indented command block"
    return "\n".join(line[4:].split("  #")[0].rstrip() for line in match.group(1).splitlines())


def _fresh_shell(script, home):
    """Run `script` in bash from the repository root with an empty environment (PATH and HOME only)."""
    import subprocess
    return subprocess.run(["env", "-i", f"PATH={FRESH_PATH}", f"HOME={home}", "bash", "--noprofile", "--norc",
                           "-e", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_readme_first_commands_work_as_typed_in_a_fresh_shell(tmp_path):
    block = _first_commands()
    assert "make setup" in block and ".venv/bin/activate" in block and "python train.py --help" in block
    run = _fresh_shell(block + "\ncommand -v tensorboard", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--run_folder" in run.stdout  # train.py's help
    tensorboard = run.stdout.strip().splitlines()[-1]
    assert os.path.realpath(tensorboard) == os.path.realpath(os.path.join(ROOT, ".venv", "bin", "tensorboard"))


def test_every_script_the_readme_quotes_answers_help_in_the_readmes_shell(tmp_path):
    scripts = sorted(set(re.findall(r"\bpython ([\w/]+\.py)\b", _readme())))
    assert "train.py" in scripts and "bench/bench_feed.py" in scripts
    missing = [s for s in scripts if not os.path.isfile(os.path.join(ROOT, s))]
    assert not missing, f"README quotes scripts that do not exist: {missing}"
    loop = "\n".join(f"python {s} --help > /dev/null || {{ echo 'failed: {s}' >&2; exit 1; }}" for s in scripts)
    run = _fresh_shell(_first_commands() + "\n" + loop, str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
