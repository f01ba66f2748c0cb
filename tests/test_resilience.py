"""StopOnSignal's agreement between processes, in one process (the 2-process run is in test_faults)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from hf_medbeit.resilience import StopOnSignal


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def agree_twice(stop: StopOnSignal, args) -> None:
    assert stop.agree(args) is None
    stop.received = signal.SIGTERM
    assert stop.agree(args) == signal.SIGTERM and stop.exit_code == 143


def test_one_gpu_machine_agrees_on_the_host_through_a_gloo_group(one_process_group, monkeypatch):
    # With NCCL as the world's backend, on one machine, the flag travels through a separate gloo
    # group, so the per-step check never waits for the GPU. Here the world is gloo, told to look
    # like NCCL; the arguments take the multi-process path (the group itself has one rank).
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    stop = StopOnSignal()
    args = SimpleNamespace(world_size=2, device=torch.device("cpu"))
    group, device = stop._channel(args)
    assert group is not dist.group.WORLD and device.type == "cpu"
    assert stop._channel(args) == (group, device)  # chosen once
    agree_twice(stop, args)


def test_several_machines_agree_through_the_world_group_on_the_training_device(one_process_group, monkeypatch):
    # Across machines gloo may choose another network interface than NCCL: the world group is used.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    stop = StopOnSignal()
    args = SimpleNamespace(world_size=2, device=torch.device("cpu"))  # stands in for cuda:N
    assert stop._channel(args) == (dist.group.WORLD, args.device)
    agree_twice(stop, args)


def test_a_single_process_stops_for_its_own_signal_without_collectives():
    stop = StopOnSignal()
    args = SimpleNamespace(world_size=1)
    assert stop.agree(args) is None and stop.exit_code == 0
    stop.received = signal.SIGINT
    assert stop.agree(args) == signal.SIGINT and stop.exit_code == 130
