"""A torchrun rank that built transformers model code leaves no gloo threads behind after closing
its group: threads left to interpreter exit abort the process (SIGABRT) after the work is done."""

import os
import subprocess
import sys
import textwrap

import pytest
from checkpoint_helpers import ROOT
from test_distributed_calibration import free_port

SCRIPT = textwrap.dedent(
    """
    import os
    from quantfw.parallel.dist import Dist

    def threads():
        return len(os.listdir("/proc/self/task"))

    before = threads()
    d = Dist.from_env()
    d.barrier()
    # transformers' model code imports torch.distributed.fsdp, which binds dist.group.WORLD
    import transformers.models.deepseek_v3.modeling_deepseek_v3  # noqa: F401
    d.barrier()
    d.close()
    # one write: the ranks share the pipe, and print's separate newline lets lines run together
    os.write(1, f"rank {os.environ['RANK']}: threads {before} -> {threads()}\\n".encode())
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_closing_the_group_joins_gloo_threads(tmp_path):
    script = tmp_path / "teardown.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), str(script)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("rank "))
    assert len(lines) == 2, r.stdout
    for ln in lines:
        before, after = ln.split("threads ")[1].split(" -> ")
        assert after == before, ln
