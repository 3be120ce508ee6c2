"""Importing quantfw sets MKL's vector math up first, so a process's first exp, erf or atan is as
exact as its later ones (quantfw/vml_init.py). Without it 10-35% of fresh processes differ."""

from __future__ import annotations

import subprocess
import sys

PROCESSES = 10

CHILD = """
import torch
import quantfw.io.reader  # what every command imports before tensor math
torch.manual_seed(0)
a = torch.randn(64, 256) * 3  # split over the intra-op threads
same = [torch.equal(f(a), f(a)) for f in (torch.exp, torch.erf, torch.atan)]
print(int(all(same)))
"""


def test_the_first_vml_call_of_a_process_equals_the_second():
    run = [sys.executable, "-c", CHILD]
    same = [
        subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(PROCESSES)
    ]
    assert same == ["1"] * PROCESSES
