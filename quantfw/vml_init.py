"""Initialise MKL's vector math library (VML) on the importing thread, before any tensor math.

torch's CPU wheel computes exp, log, sqrt, tanh, erf, cos, atan and more with MKL VML, which sets
itself up on first use. Measured with torch 2.13: when a process's first VML call is split over
the intra-op threads, in 10-35% of processes the worker thread's share of that one call comes out
up to 1.5e-4 relative off (thousands of ulps); later calls are exact. The same input then gave
different quantized bytes or eval numbers from one run to the next. One tiny call here, on one
thread, sets VML up for every function (tests/test_vml_init.py).
"""

from __future__ import annotations

import torch

torch.exp(torch.ones(8))
