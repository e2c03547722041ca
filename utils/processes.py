"""Processes: the parent-death rule of worker processes, this machine's place in a multi-worker run
(TF_CONFIG, read without TensorFlow) and the code version recorded with a run.
"""
import ctypes
import json
import os
import subprocess
import sys

from utils.errors import UserError


def die_with_parent(sig, parent_pid):
    """Have Linux send `sig` to this process when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG).

    Called in a child (a producer worker, or a launcher's child before exec); if the parent
    `parent_pid` died before the request took effect, the child exits at once.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def git_hash():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def worker_info():
    """(task_index, num_workers) from TF_CONFIG, without importing TensorFlow; (0, 1) when unset.

    Here (not in engine/distribute.py) because the producer needs it too and data/ does not import engine/.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 0, 1
    try:
        config = json.loads(raw)
        workers = config["cluster"].get("worker", [])
        chiefs = config["cluster"].get("chief", [])
        task_type, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError("TF_CONFIG is not valid JSON of the form {\"cluster\": {\"worker\": [...]}, "
                        "\"task\": {\"type\": \"worker\", \"index\": i}}; fix or unset it.") from None
    # With an explicit chief task the chief is task 0 of the combined list.
    position = index if task_type == "chief" else index + len(chiefs)
    return position, len(chiefs) + len(workers)

