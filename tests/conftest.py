"""One torch thread per test process. pytest-xdist runs a process per core, and torch's default of
one thread per core in each of them oversubscribes the machine: on a 2-core box a model test ran
several times slower with two workers of two threads each than with one thread each."""

import torch

torch.set_num_threads(1)
