"""lmstack.io.atomic_dir's temporary siblings: a killed writer's are removed by the next write to
the same folder; a live writer's, and another host's, are left alone."""

import os
import signal
import socket
import subprocess
import sys

from lmstack.io import atomic_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_write_removes_only_a_dead_writers_leftovers(tmp_path):
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        names = {
            f".ckpt.tmp-{host}-{dead}-abc123": False,  # killed mid-write: removed
            f".ckpt.old-{host}-{dead}": False,  # killed between its two renames: removed
            f".ckpt.tmp-{host}-{live.pid}-xyz": True,  # still writing: kept
            f".ckpt.tmp-other-host-{dead}-q1": True,  # another machine on a shared disk: kept
            f".ckpt.tmp-{host}-{dead}-{dead}-q3": True,  # a machine named "{host}-{dead}": kept
            f".ckpt.old-{host}-{dead}-{dead}": True,
            f".ckpt2.tmp-{host}-{dead}-q2": True,  # another folder's: kept
            "ckpt.tmp-notes": True,
        }
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights").write_bytes(b"x")
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "config.json").write_text("{}")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"ckpt", *(n for n, keep in names.items() if keep)}
    finally:
        live.kill()
        live.wait()


def test_sigkilled_writer_leaves_nothing_after_the_next_write(tmp_path):
    script = ("import os, signal, sys\nfrom lmstack.io import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'big').write_bytes(b'0' * 4096)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".out.tmp-")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
