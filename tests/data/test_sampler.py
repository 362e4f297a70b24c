"""The resumable, deterministic, dp-disjoint sampler."""

from __future__ import annotations

import itertools

import pytest

from ringpatch.data.sampler import ResumableSampler

pytestmark = pytest.mark.unit


def test_sampler_is_deterministic_disjoint_and_resumable():
    n, dp = 23, 3
    shards = [list(itertools.islice(ResumableSampler(n, dp, r, seed=5), 7)) for r in range(dp)]
    assert shards == [list(itertools.islice(ResumableSampler(n, dp, r, seed=5), 7)) for r in range(dp)]
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    assert shards != [list(itertools.islice(ResumableSampler(n, dp, r, seed=6), 7)) for r in range(dp)]
    # resume: a new sampler from the state continues with the next unseen sample, across epochs
    full = list(itertools.islice(ResumableSampler(n, dp, 1, seed=5), 20))
    first = ResumableSampler(n, dp, 1, seed=5)
    head = list(itertools.islice(first, 9))
    resumed = ResumableSampler(n, dp, 1, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + list(itertools.islice(resumed, 11)) == full


def test_sampler_refuses_mismatches():
    with pytest.raises(ValueError, match=r"2 packed sequences cannot feed 4 data-parallel ranks"):
        ResumableSampler(2, 4, 0)
    state = ResumableSampler(10, 2, 0, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"does not match this run .*'seed': \(1, 2\)"):
        ResumableSampler(10, 2, 0, seed=2).load_state_dict(state)
