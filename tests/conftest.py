"""Fixtures shared by the package tests."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "The test models are tiny: one thread is fastest, and far faster when other processes share the CPU."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
