"""tools/launch.py (what `make demo` trains with): supervision of the producer and trainer.

Stand-in scripts replace runtime_preprocessing.py and train.py, so these tests
exercise the process handling (restart, failure report, clean stop, no stray
process) in a second or two each, without TensorFlow.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "tools", "launch.py")

FAKE = textwrap.dedent('''
    import os, subprocess, sys, time
    role = sys.argv[1]
    d = os.environ["FAKE_DIR"]
    mode = os.environ.get("FAKE_" + role.upper(), "forever")
    with open(os.path.join(d, role + ".starts"), "a") as f:
        f.write(" ".join(sys.argv[2:]) + "\\n")
    starts = len(open(os.path.join(d, role + ".starts")).read().splitlines())
    # a grandchild, as a worker pool would have: it must not outlive the launcher
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.path.join(d, "pids"), "a") as f:
        f.write(f"{os.getpid()}\\n{worker.pid}\\n")
    print(f"{role} started ({mode}, start {starts})", file=sys.stderr, flush=True)
    if role == "producer" and not mode.endswith("crash") and not (mode == "crash_once" and starts == 1):
        import json, socket  # a heartbeat, as the real producer writes
        beat = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "interval": 60,
                "state": "running"}
        with open(os.path.join(os.environ["FAKE_BUFFER"], "producer.json"), "w") as f:
            json.dump(beat, f)
    if mode == "ok":
        time.sleep(1.0)
        sys.exit(0)
    if mode == "fail":
        time.sleep(0.5)
        print("Traceback: something broke\\nValueError: the trainer's real error", file=sys.stderr, flush=True)
        sys.exit(5)
    if mode == "crash_once" and starts == 1:
        print("producer crashed: worker died", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "always_crash":
        sys.exit(4)
    while True:
        time.sleep(0.05)
''')


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    for role in ("producer", "trainer"):
        (tmp_path / f"{role}.py").write_text(
            f"import runpy, sys\nsys.argv = [sys.argv[0], '{role}'] + sys.argv[1:]\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    config = open(os.path.join(ROOT, "configs", "demo.txt")).read()
    (tmp_path / "buffer").mkdir()
    (tmp_path / "demo.txt").write_text(config.replace("../demo_data/buffer", str(tmp_path / "buffer")))
    yield tmp_path
    for pid in _pids(tmp_path):  # never leave anything behind, even when a test fails
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids(d):
    path = d / "pids"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def _launch(d, producer="forever", trainer="ok", extra=(), wait=True, sigint_ignored=False):
    env = dict(os.environ, FAKE_DIR=str(d), FAKE_BUFFER=str(d / "buffer"), FAKE_PRODUCER=producer,
               FAKE_TRAINER=trainer)
    argv = [sys.executable, LAUNCH, "--run_folder=r", "--epoch_start=0", "--epoch_end=2", "--batch_size=8",
            f"--config={d / 'demo.txt'}", f"--producer_script={d / 'producer.py'}",
            f"--trainer_script={d / 'trainer.py'}", *extra]
    # As `make test &` from a script starts it: SIGINT ignored, inherited across exec.
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _all_gone(d):
    return wait_until(lambda: not any(_alive(p) for p in _pids(d)), timeout=5)


def test_trainer_success_stops_the_producer_and_leaves_no_process(fake):
    code, _, err = _launch(fake, trainer="ok", extra=["--learning_rate=0.05"])
    assert code == 0, err
    assert "trainer finished" in err
    assert len(_pids(fake)) == 4
    assert _all_gone(fake)
    trainer_args = (fake / "trainer.starts").read_text()
    assert "--run_folder=r" in trainer_args and "--learning_rate=0.05" in trainer_args
    producer_args = (fake / "producer.starts").read_text()
    assert "--batch_size=8" in producer_args and "--learning_rate" not in producer_args


def test_trainer_failure_exits_nonzero_with_its_last_stderr_lines(fake):
    code, _, err = _launch(fake, trainer="fail")
    assert code == 5
    assert "trainer failed (exit code 5)" in err
    assert "trainer: ValueError: the trainer's real error" in err
    assert _all_gone(fake)


def test_a_dead_producer_is_restarted_and_logged(fake):
    code, _, err = _launch(fake, producer="crash_once", trainer="ok")
    assert code == 0, err
    assert "producer exited with code 3; restart 1/5" in err
    assert len((fake / "producer.starts").read_text().splitlines()) == 2
    assert _all_gone(fake)


def test_producer_restarts_are_bounded(fake):
    code, _, err = _launch(fake, producer="always_crash", trainer="forever", extra=["--max_producer_restarts=2"])
    assert code == 1
    assert "after 2 restarts" in err and "then rerun with --epoch_start=auto" in err
    assert len((fake / "producer.starts").read_text().splitlines()) == 3
    assert _all_gone(fake)


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "started_with_sigint_ignored"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_launcher_stops_both_process_groups(fake, sig, sigint_ignored):
    proc = _launch(fake, trainer="forever", wait=False, sigint_ignored=sigint_ignored)
    try:
        assert wait_until(lambda: len(_pids(fake)) == 4)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode in (130, 143), err
    assert _all_gone(fake)


def test_children_and_their_workers_die_with_a_killed_launcher(fake):
    proc = _launch(fake, trainer="forever", wait=False)
    try:
        assert wait_until(lambda: len(_pids(fake)) == 4)
        proc.kill()  # SIGKILL: no cleanup code runs in the launcher itself
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert _all_gone(fake)


# Stand-ins that go through run_main, as the real scripts do: a UserError exits 2 with
# one line, Ctrl-C exits 130 with (outside the launcher) the 'interrupted' line.
FAKE_MAIN = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, os.environ["FAKE_ROOT"])
    from utils.cli import run_main
    from utils.errors import UserError
    role, d = sys.argv[1], os.environ["FAKE_DIR"]
    mode = os.environ.get("FAKE_" + role.upper(), "forever")

    def main():
        with open(os.path.join(d, role + ".starts"), "a") as f:
            f.write(" ".join(sys.argv[2:]) + "\\n")
        with open(os.path.join(d, "pids"), "a") as f:
            f.write(f"{os.getpid()}\\n")
        if mode == "user_error":
            raise UserError("[train] N = 10000 but the training set has 400 images; set N = 0.")
        if mode == "save_epoch":  # epoch 0 complete, as train.py leaves it, then training epoch 1
            epoch = os.path.join(os.environ["FAKE_RUNS"], "r", "0")
            os.makedirs(os.path.join(epoch, "saved_model"))
            os.makedirs(os.path.join(epoch, "checkpoint"))
            open(os.path.join(epoch, "checkpoint", "ckpt.index"), "w").close()
            open(os.path.join(epoch, "config.txt"), "w").close()
        while True:
            time.sleep(0.05)

    run_main(main)
''')


@pytest.fixture
def fake_main(fake):
    (fake / "fake.py").write_text(FAKE_MAIN)
    (fake / "runs").mkdir()
    (fake / "demo.txt").write_text((fake / "demo.txt").read_text().replace("../demo_runs", str(fake / "runs")))
    os.environ["FAKE_ROOT"], os.environ["FAKE_RUNS"] = ROOT, str(fake / "runs")
    yield fake
    del os.environ["FAKE_ROOT"], os.environ["FAKE_RUNS"]


def test_a_producer_refusing_its_config_is_not_restarted(fake_main):
    code, _, err = _launch(fake_main, producer="user_error", trainer="forever")
    assert code == 2, err
    assert len((fake_main / "producer.starts").read_text().splitlines()) == 1
    assert err.count("set N = 0.") == 1  # the producer's own line, not repeated by restarts or a tail
    assert "which a restart would not fix" in err and "rerun with --epoch_start=auto" in err
    assert _all_gone(fake_main)


def test_ctrl_c_under_the_launcher_prints_one_line_pointing_to_auto_once_an_epoch_is_saved(fake_main):
    proc = _launch(fake_main, trainer="save_epoch", wait=False)
    try:
        assert wait_until(lambda: (fake_main / "runs" / "r" / "0" / "config.txt").exists())
        assert wait_until(lambda: len(_pids(fake_main)) == 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [f"interrupted; nothing half-written was kept. Epoch 0 is saved in {fake_main / 'runs' / 'r'}: "
                     f"rerun with --epoch_start=auto to continue from epoch 1."]
    assert _all_gone(fake_main)


def test_demo_prunes_only_its_own_older_runs(tmp_path, capsys):
    from tools import demo
    names = ["demo-20260101-000000", "demo-20260102-000000", "demo-20260103-000000", "myrun", ".tmp-demo-x"]
    for name in names:
        (tmp_path / name).mkdir()
    demo.prune_old_runs(str(tmp_path), keep=1)
    assert sorted(os.listdir(tmp_path)) == [".tmp-demo-x", "demo-20260103-000000", "myrun"]
    assert "removed the old demo run demo-20260101-000000" in capsys.readouterr().out


def test_the_demo_driver_runs_end_to_end_at_reduced_size(tmp_path):
    """`make demo`'s real driver (tools/demo.py main and every script it runs) on 4 x 40 images, 2 epochs,
    32-pixel crops and a 1/16-wide network: the table, the plot and both epoch folders come out.
    Measured 122 s at a load average of 10 on the 2 shared cores: 90 s of it is launch.py (TensorFlow
    tracing the step and two SavedModel exports), 24 s check_accuracy.py, 7 s the data steps."""
    from engine import accuracy_log, run_folder
    from tests.helpers import write_config_file, write_train_config
    data, runs = tmp_path / "data", tmp_path / "runs"
    small = write_train_config(str(tmp_path / "small"), str(data / "imagenet"))  # crop 32, width 0.0625
    config = write_config_file(str(tmp_path), small, {
        "preprocess_val": {"ImageNet_folder": data / "imagenet", "path_to_save": data / "val_views"},
        "get_mu_sigma": {"path_to_save": data / "stats"},
        "utils": {f"{name}_{c}": "auto" for name in ("mu", "sigma") for c in range(3)},
        "train": {"path_for_saving": runs, "deterministic": "false"},
        "schedule": {"type": "cosine", "base_lr": "0.1", "warmup_epochs": "1"}}, name="demo.txt")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), f"--config={config}",
                             "--epochs=2", "--batch_size=16", "--classes=4", "--train_per_class=40",
                             "--val_per_class=4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run,) = os.listdir(runs)
    run_path = str(runs / run)
    assert run.startswith("demo-") and run_folder.complete_epochs(run_path) == [0, 1]
    rows = accuracy_log.read_rows(os.path.join(run_path, accuracy_log.CSV_NAME))
    assert [(r["epoch"], r["protocol"], r["images"]) for r in rows] == [(0, 10, 16), (1, 10, 16)]
    table = result.stdout.split("==> Results", 1)[1]
    for r in rows:
        assert f"{r['top1']:8.2f}  {r['top5']:8.2f}" in table
    assert f"plot:           {os.path.join(run_path, accuracy_log.PNG_NAME)}" in table
    with open(os.path.join(run_path, accuracy_log.PNG_NAME), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(data / "stats" / "mu_sigma.json")
