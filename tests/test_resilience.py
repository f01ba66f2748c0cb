"""StopOnSignal's agreement between processes, in one process (the 2-process run is in test_faults)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from hf_medbeit.resilience import StopOnSignal


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_gpu_run_agrees_on_the_host_through_a_gloo_group(one_process_group, monkeypatch):
    # With NCCL as the world's backend the flag travels through a separate gloo group, so the
    # per-step check never waits for the GPU. Here the world is gloo, told to look like NCCL.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    stop = StopOnSignal()
    group = stop._cpu_group()
    assert group is not dist.group.WORLD and stop._cpu_group() is group  # made once
    args = SimpleNamespace(world_size=2)  # take the multi-process path; the group has 1 rank
    assert stop.agree(args) is None
    stop.received = signal.SIGTERM
    assert stop.agree(args) == signal.SIGTERM and stop.exit_code == 143


def test_a_single_process_stops_for_its_own_signal_without_collectives():
    stop = StopOnSignal()
    args = SimpleNamespace(world_size=1)
    assert stop.agree(args) is None and stop.exit_code == 0
    stop.received = signal.SIGINT
    assert stop.agree(args) == signal.SIGINT and stop.exit_code == 130
