"""The scale model's arithmetic (bench/scale_model.py): each phase is bytes over its bound, the slowest
streamed phase sets the pace, and the bound named is the one that binds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.scale_model import GIB, Fleet, Rate, Rates, _depth, predict


def rates(**changes: float) -> Rates:
    """Round numbers: 1 CPU second per GiB to send, 2 to receive, 4 to exchange, free encode, perfect links."""
    values = {
        "encode_cpu": 0.0,
        "send_cpu": 1.0,
        "exchange_cpu": 4.0,
        "receive_cpu": 2.0,
        "swap_s": 0.0,
        "link_efficiency": 1.0,
        "relay_hop_s": 0.5,
        "delta_ratio": 0.01,
        "diff_cpu": 0.25,
        "apply_cpu": 0.5,
        "h2d_gbps": 1e9,
        "handoff_gbps": 1e9,
        "fixed_s": 0.0,
    } | changes
    return Rates(**{k: Rate(v, "test") for k, v in values.items()})


def test_one_rank_to_one_rollout_is_bound_by_the_receiving_core() -> None:
    p = predict(Fleet(model_bytes=4 * GIB, trainer_ranks=1, gpu=False), rates())
    assert p.bound == "rollout CPU per byte"
    assert p.seconds == pytest.approx(8.0)  # 4 GiB x 2 s/GiB, on one core


def test_fan_out_makes_the_trainer_core_bind_and_ranks_share_it() -> None:
    one = predict(Fleet(model_bytes=4 * GIB, trainer_ranks=1, rollouts=4, rollout_hosts=4, gpu=False), rates())
    assert one.bound.startswith("trainer CPU") and one.seconds == pytest.approx(16.0)  # 4 GiB x 4 destinations
    two = predict(replace(one.fleet, trainer_ranks=2), rates())
    assert two.seconds == pytest.approx(8.0)  # each rank sends half; the receivers' 8 s ties it


def test_a_slow_nic_binds_and_its_time_is_bytes_over_goodput() -> None:
    f = Fleet(model_bytes=10e9, trainer_ranks=8, trainer_hosts=1, rollouts=2, rollout_hosts=2, nic_gbit=8.0)
    p = predict(replace(f, gpu=False), rates(link_efficiency=0.5))
    assert p.bound == "trainer NIC"
    assert p.seconds == pytest.approx(10e9 * 2 / (1e9 * 0.5))  # two copies leave one host at 0.5 GB/s goodput


def test_shared_cores_add_every_process_cpu() -> None:
    f = Fleet(model_bytes=GIB, trainer_ranks=2, rollouts=2, rollout_hosts=2, shared_cores=2, gpu=False)
    p = predict(f, rates())
    # trainers 2 x (0.5 GiB x 2 destinations x 1 s) + rollouts 2 x (1 GiB x 2 s) = 6 CPU s on 2 cores
    assert p.bound == "2 shared cores" and p.seconds == pytest.approx(3.0)


def test_bytes_the_ranks_exchange_cost_their_cores_beside_the_send() -> None:
    f = Fleet(model_bytes=4 * GIB, trainer_ranks=2, rollouts=4, rollout_hosts=4, gpu=False)
    assert predict(f, rates()).seconds == pytest.approx(8.0)  # each rank: 2 GiB x 4 destinations x 1 s
    p = predict(replace(f, exchanged=0.5), rates())
    # and 1 GiB of its 2 passed between ranks at 4 s/GiB
    assert p.bound.startswith("trainer CPU") and p.seconds == pytest.approx(12.0)


def test_exchanged_fraction_follows_the_shards_against_the_chunk() -> None:
    from bench.scale import exchanged_fraction

    shapes = [(1024, 1024)]  # 2 MiB in bf16: two 1 MiB chunks
    assert exchanged_fraction(shapes, 1) == 0.0
    assert exchanged_fraction(shapes, 2) == 0.0  # a rank's rows are exactly one chunk
    assert exchanged_fraction(shapes, 4) == pytest.approx(0.5)  # each chunk: one rank's 512 KiB, the next's
    assert exchanged_fraction(shapes, 256) > 0.99  # each chunk gathers 128 ranks' rows


def test_per_worker_receive_splits_the_bytes_over_the_workers() -> None:
    f = Fleet(model_bytes=8 * GIB, trainer_ranks=64, rollouts=1, gpus_per_rollout=8, gpu=False)
    process, worker = predict(f, rates()), predict(replace(f, design="worker"), rates())
    assert process.bound == worker.bound == "rollout CPU per byte"
    assert process.seconds == pytest.approx(16.0) and worker.seconds == pytest.approx(2.0)


def test_a_relay_chain_sends_once_and_adds_a_hop_each() -> None:
    f = Fleet(model_bytes=GIB, trainer_ranks=1, rollouts=4, rollout_hosts=4, relay_fanout=1, gpu=False)
    p = predict(f, rates())
    drain = next(x for x in p.phases if x.name == "relay drain")
    assert drain.seconds == pytest.approx(3 * 0.5)  # three hops below the root
    assert p.bound == "rollout CPU per byte"  # each relay receives (2 s) and forwards (1 s) on one core
    assert p.seconds == pytest.approx(3.0 + 1.5)


def test_each_relay_hop_waits_for_its_parent_to_commit() -> None:
    """A relay passes Commit on once its own commit is done: a chain's drain adds every hop's swap (and its
    last chunk's store and forward); the update's fixed cost is paid once, not per hop."""
    f = Fleet(model_bytes=GIB, trainer_ranks=1, rollouts=4, rollout_hosts=4, relay_fanout=1, gpu=False)
    p = predict(f, rates(relay_hop_s=0.0, swap_s=0.25, fixed_s=0.05))
    swap = next(x for x in p.phases if x.name == "swap")
    assert swap.seconds == pytest.approx(0.3)  # 1 GiB x 0.25 s/GiB + 0.05 s
    assert next(x for x in p.phases if x.name == "relay drain").seconds == pytest.approx(3 * 0.25)


def test_a_link_passes_its_burst_before_its_rate_applies() -> None:
    """The simulated cluster's token bucket: a small delta crosses a hop faster than its bytes / rate."""
    gbit = 8e-3  # 1 MB/s
    f = Fleet(model_bytes=GIB, trainer_ranks=1, rollouts=2, rollout_hosts=2, relay_fanout=1, nic_gbit=gbit, gpu=False)
    rated = rates(relay_hop_s=0.0, delta_ratio=1e-3)
    drain = [
        next(x for x in predict(replace(f, link_burst_bytes=burst), rated, "delta").phases if x.name == "relay drain")
        for burst in (0, 250_000)
    ]
    chunk = 1 << 20  # the delta (1 GiB x 1e-3) spans more than one chunk: a hop forwards one
    assert drain[0].seconds == pytest.approx(chunk / 1e6 + 0.5)  # its last chunk at 1 MB/s, then its patches
    assert drain[0].seconds - drain[1].seconds == pytest.approx(0.25)  # 250 kB passed at once


def test_a_delta_sends_its_ratio_and_diffs_and_applies_the_whole_model() -> None:
    f = Fleet(model_bytes=100 * GIB, trainer_ranks=1, gpu=False)
    p = predict(f, rates(), "delta")
    phases = {x.name: x for x in p.phases}
    assert phases["trainer encode + send"].seconds == pytest.approx(1.0)  # 1 GiB sent
    # Every tensor is diffed before the first patch goes out: 100 GiB diffed, before the stream, not beside it.
    assert phases["trainer diff"].seconds == pytest.approx(25.0)
    assert not phases["trainer diff"].streamed
    assert next(x for x in p.phases if x.name == "apply patches").seconds == pytest.approx(50.0)


def test_an_adapter_is_a_small_full_update() -> None:
    f = Fleet(model_bytes=100 * GIB, trainer_ranks=1, adapter_ratio=0.01, gpu=False)
    assert predict(f, rates(), "adapter").seconds == pytest.approx(
        predict(replace(f, model_bytes=GIB), rates()).seconds
    )


@pytest.mark.parametrize(("followers", "fanout", "depth"), [(1, 1, 1), (3, 1, 3), (2, 2, 1), (6, 2, 2), (7, 2, 3)])
def test_relay_depth(followers: int, fanout: int, depth: int) -> None:
    assert _depth(followers, fanout) == depth


def test_validate_says_why_and_exits_2_where_namespaces_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import scale, scale_validate

    monkeypatch.setattr(scale_validate, "unavailable_reason", lambda: "creating network namespaces needs root")
    assert scale.main(["--validate"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_the_table_is_generated_from_the_committed_results() -> None:
    from bench import scale

    text, rows = scale.table(scale.measured_rates(gpu=True))
    assert len(rows) == len(scale.MODELS) * len(scale.FLEETS) * len(scale.NICS)
    assert all(f"| {r['model']} |" in text for r in rows)
    # per-worker receive never loses to one process per rollout: it splits the same bytes over more cores
    assert all(r["worker_full"]["seconds"] <= r["process_full"]["seconds"] * 1.0001 for r in rows)
