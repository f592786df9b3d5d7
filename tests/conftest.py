"""One torch thread per test process. pytest-xdist runs a process per core, and torch's default of
one thread per core in each of them oversubscribes the machine: on a 2-core box a model test ran
several times slower with two workers of two threads each than with one thread each."""

import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The slow tests first. xdist workers take tests in collection order: with the end-to-end
    sweeps (a minute or more each) at the start, the short tests fill the gaps between them
    instead of a few long ones trailing at the end on one worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
