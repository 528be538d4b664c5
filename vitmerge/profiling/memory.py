"""Peak memory of running one ONNX file, measured in a fresh process (as it would run deployed).

The process builds an ONNX Runtime CPU session with default options, records its resident set, resets
the high-water mark (``/proc/self/clear_refs``), runs the file twice at the batch size and reads the
high-water mark (``VmHWM``): the peak minus the resident set before the runs is what inference needs
on top of the loaded model. One process per file, so no other session's arena or threads count.
Linux only (``/proc``); elsewhere the figure is reported as not measured, with the reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

_CHILD = r"""
import json, sys
import numpy as np
from vitmerge.backends.ort import session

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

sess = session(sys.argv[1])
inp = sess.get_inputs()[0]
shape = [int(sys.argv[2])] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
before = status('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')
for _ in range(2):
    sess.run(None, {inp.name: x})
print(json.dumps({"before": before, "peak": status('VmHWM:')}))
"""


def peak_memory_mb(path: Union[str, Path], batch: int = 1, timeout: float = 600.0) -> Tuple[Optional[float], str]:
    """(MB that inference at ``batch`` needs above the loaded session, or None; how it was measured or why not)."""
    if not Path("/proc/self/clear_refs").exists():
        return None, "not measured: needs Linux's /proc/self/clear_refs"
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(int(batch))], capture_output=True,
                             text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"not measured: the run took over {timeout:.0f} s"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return None, f"not measured: the measuring process failed ({last})"
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return (d["peak"] - d["before"]) / 2 ** 20, ("resident-set high-water mark over 2 runs minus the resident set "
                                                 "before them, own process, ONNX Runtime CPU default session options")


__all__ = ["peak_memory_mb"]
