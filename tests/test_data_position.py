"""The data position (data/position.py) as pure values: slot arithmetic, advancing, the checkpoint
round trip, and a resume under another data-parallel size, checked against brute-force counts.
No loaders, no processes: each test takes milliseconds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO
from vlm_train.data.position import (
    DataLayout,
    Position,
    SourceShape,
    Transition,
    batches_done,
    ceil_div,
    resume,
    slot_share,
    worker_start,
)
from vlm_train.errors import DataError


def test_the_position_module_is_pure_python():
    # no torch, no loader: the position can be reasoned about (and tested) without either
    probe = "import sys, vlm_train.data.position; print(sorted({'torch', 'webdataset'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def layout(dp_size: int, workers: int, batch_size: int, *samples: int) -> DataLayout:
    return DataLayout(dp_size, workers, batch_size, tuple(SourceShape(3, n, 1.0) for n in samples or (160,)))


def walk(position: Position, shape: DataLayout, batches: int) -> Position:
    """`batches` batches taken, each worker's hint naming the batch it came in."""
    for _ in range(batches):
        position = position.after_batch(shape, [("shard.tar", position.batch, 512, f"key{position.batch}")])
    return position


def test_ceil_div_rounds_up_for_every_sign():
    assert [ceil_div(n, 4) for n in (-5, -4, -1, 0, 1, 4, 5, 8, 9)] == [-1, -1, 0, 0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_each_worker_start_counts_the_batches_its_slot_gave(workers):
    # rank batch b comes from logical worker b % workers: count them one by one
    for start in range(13):
        given = [sum(1 for b in range(start) if b % workers == w) for w in range(workers)]
        assert [batches_done(start, w, workers) for w in range(workers)] == given
        starts = [worker_start(2, workers, start, loader) for loader in range(workers)]
        assert starts[0].worker == start % workers  # the DataLoader asks its worker 0 first
        assert sorted(s.slot for s in starts) == [2 * workers + w for w in range(workers)]
        assert sum(s.done for s in starts) == start


def test_slot_shares_and_batches_per_epoch():
    assert slot_share(160, 4, 4) == slot_share(163, 4, 4)  # 40 each, all of them whole batches
    assert (slot_share(150, 4, 4).per_slot, slot_share(150, 4, 4).used) == (37, 36)
    mixture = layout(2, 2, 4, 160, 70)  # 40 + 16 (of 17) samples per slot: 14 batches
    assert mixture.batches_per_slot() == 14
    assert Position().batches_per_epoch(mixture) == 28


def test_advancing_rolls_over_at_the_epoch_end_and_keeps_each_workers_hints():
    shape = layout(2, 2, 4)  # 160 samples: 40 per slot, 10 batches per slot, 20 per rank and epoch
    position = walk(Position(), shape, 3)
    assert (position.epoch, position.batch) == (0, 3)
    assert position.hints == {0: [("shard.tar", 2, 512, "key2")], 1: [("shard.tar", 1, 512, "key1")]}
    position = walk(position, shape, 17)
    assert (position.epoch, position.batch) == (1, 0)
    assert walk(position, shape, 20).epoch == 2


def test_state_dict_round_trip_keeps_the_checkpoint_format():
    shape = layout(2, 2, 4)
    position = walk(Position(), shape, 7)
    state = position.state_dict(shape)
    assert state == {
        "epoch": 0,
        "batch": 7,
        "hints": [["shard.tar", 6, 512, "key6"], ["shard.tar", 5, 512, "key5"]],
        "transition": None,
        "world": 2,  # the data-parallel size, under its stored name
        "workers": 2,
        "batch_size": 4,
        "sources": [[3, 160, 1.0]],
    }
    resumed = resume(state, shape)
    assert resumed.redistributed is None
    assert (resumed.position.epoch, resumed.position.batch) == (0, 7)
    assert resumed.position.flat_hints() == [tuple(h) for h in state["hints"]]
    assert resume({**state, "batch": 0}, shape).position.hints == {}  # an epoch start seeks nowhere


def served_by_new_slots(transition: Transition, new: DataLayout) -> list[tuple[int, int]]:
    """(old slot, sample position) of everything the new slots read of the redistributed epoch."""
    return [
        (old_slot, index)
        for slot in range(new.slots)
        for old_slot, first, stop in transition.pieces(new, slot)
        for index in range(first, stop)
    ]


@pytest.mark.parametrize("dp_size, workers, batch_size", [(1, 1, 4), (3, 2, 3), (4, 1, 2), (8, 2, 1)])
def test_resume_on_another_dp_size_redistributes_the_rest_of_the_epoch_exactly(dp_size, workers, batch_size):
    old, new = layout(2, 2, 4), layout(dp_size, workers, batch_size)
    state = walk(Position(), old, 7).state_dict(old)  # every rank saved (epoch 0, batch 7)
    resumed = resume(state, new)
    transition = resumed.position.transition
    assert transition == Transition(epoch=0, dp_size=2, workers=2, batch_size=4, batch=7)
    assert (resumed.position.epoch, resumed.position.batch) == (0, 0)
    # brute force: old slot s gave batches_done(7, s % 2, 2) batches of 4; the rest of its 40 is left
    left = [(s, i) for s in range(4) for i in range(batches_done(7, s % 2, 2) * 4, 40)]
    assert len(left) == 160 - 7 * 2 * 4
    served = served_by_new_slots(transition, new)
    assert len(served) == len(set(served))  # nothing repeated
    assert served == left[: len(served)]  # old-slot order, each old slot from where it stopped
    moved = resumed.redistributed
    assert moved is not None and (moved.epoch, moved.left, moved.slots) == (0, len(left), new.slots)
    assert moved.left_out == len(left) - len(served) < new.slots * batch_size  # less than a batch per slot
    share = transition.share(new)
    assert share % batch_size == 0 and resumed.position.batches_per_epoch(new) == share // batch_size * workers
    # the redistributed epoch's position survives a checkpoint; the next epoch is split for `new`
    again = resume(walk(resumed.position, new, 1).state_dict(new), new).position
    assert again.transition == transition and again.in_transition()
    after = walk(resumed.position, new, resumed.position.batches_per_epoch(new))
    assert (after.epoch, after.in_transition()) == (1, False)
    assert after.batches_per_epoch(new) == new.batches_per_slot() * workers
    assert after.state_dict(new)["transition"] is None


def test_resume_at_an_epoch_boundary_simply_splits_the_next_epoch():
    old, new = layout(2, 2, 4), layout(3, 1, 5)
    resumed = resume(walk(Position(), old, 20).state_dict(old), new)
    assert resumed.redistributed is None and resumed.position == Position(epoch=1)


def test_transitions_of_older_checkpoints_and_dp_size_keys_load():
    shape = layout(1, 1, 2)
    saved = {"epoch": 0, "world": 2, "workers": 2, "batch_size": 4, "batch": 7}
    state = {"epoch": 0, "batch": 1, "hints": [], "transition": saved, **shape.to_state()}
    assert resume(state, shape).position.transition == Transition(0, 2, 2, 4, 7)
    renamed = {**state, "transition": {**saved, "dp_size": 2}}
    del renamed["transition"]["world"]
    assert resume(renamed, shape).position.transition == Transition(0, 2, 2, 4, 7)
    before_mixtures = {k: v for k, v in state.items() if k != "sources"}
    assert resume(before_mixtures, shape).position.transition == Transition(0, 2, 2, 4, 7)


def test_what_cannot_be_redistributed_is_refused_in_one_line():
    old = layout(2, 2, 4)
    state = walk(Position(), old, 7).state_dict(old)
    with pytest.raises(
        DataError, match=r"is for 2 data-parallel ranks x 2 workers x micro-batch 4, 1 source\(s\), 160"
    ):
        resume(state, layout(2, 2, 4, 128))  # other data: refused, never guessed
    with pytest.raises(DataError, match="this run has 1 data-parallel ranks x 1 workers x micro-batch 4, 2 source"):
        resume({**state, "sources": [[3, 160, 1.0], [3, 64, 1.0]]}, layout(1, 1, 4, 160, 64))  # a mixture
    moved = resume(state, layout(1, 1, 2)).position
    second = walk(moved, layout(1, 1, 2), 3).state_dict(layout(1, 1, 2))
    with pytest.raises(DataError, match=r"data position \(epoch 0, batch 3\) is for 1 data-parallel ranks"):
        resume(second, layout(1, 2, 2))  # a second change before the redistributed epoch ends
    ancient = {"epoch": 0, "batch": 7, "hints": []}  # a checkpoint that does not say its layout
    with pytest.raises(DataError, match="is for a layout it does not record"):
        resume(ancient, old)
