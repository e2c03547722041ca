"""Small helpers shared by the test modules."""
import configparser
import os
import signal
import subprocess
import time


def write_config_file(folder, base, values, name="config.txt"):
    """Write config `base` with `values` ({section: {key: value}}) applied, as <folder>/<name>."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive: ImageNet_folder, N
    parser.read(base)
    for section, keys in values.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in keys.items():
            parser[section][key] = str(value)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        parser.write(f)
    return path


def merge_sections(defaults, overrides):
    """defaults updated section by section with overrides (both {section: {key: value}})."""
    merged = {name: dict(keys) for name, keys in defaults.items()}
    for name, keys in overrides.items():
        merged.setdefault(name, {}).update(keys)
    return merged


def stop_process(proc, sig=signal.SIGINT, timeout=20):
    """Ask a child to stop with `sig`; SIGKILL it if it has not exited after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate, timeout=20.0, poll=0.02):
    """True as soon as predicate() is, False if it is not within `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return False
