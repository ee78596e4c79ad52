"""functrain.rng: explicit keys are deterministic values; seeded() leaves the global RNG alone."""

import pytest
import torch

from functrain import rng


def as_tuple(k):
    return tuple(k.tolist())


def test_keys_are_deterministic_values():
    assert torch.equal(rng.key(7), rng.key(7))
    assert not torch.equal(rng.key(7), rng.key(8))
    k = rng.key(-3)  # negative and huge seeds are valid
    assert k.dtype == torch.int64 and k.shape == (2,) and k.device.type == "cpu"
    assert as_tuple(rng.key(2**64 - 1)) == as_tuple(rng.key(-1))


def test_split_gives_distinct_reproducible_keys_and_keeps_the_parent():
    k = rng.key(0)
    before = k.clone()
    children = rng.split(k, 16)
    assert len({as_tuple(c) for c in children} | {as_tuple(k)}) == 17
    assert [as_tuple(c) for c in children] == [as_tuple(c) for c in rng.split(rng.key(0), 16)]
    assert torch.equal(k, before)
    # Different parents give different children.
    assert as_tuple(rng.split(rng.key(1), 1)[0]) != as_tuple(children[0])


def test_fold_in_next_key_and_seed_of_are_pure_and_distinct():
    k = rng.key(5)
    assert torch.equal(rng.fold_in(k, 3), rng.fold_in(k, 3))
    assert len({as_tuple(rng.fold_in(k, i)) for i in range(100)}) == 100
    nk = rng.next_key(k)
    assert as_tuple(nk) == (5, 1) and as_tuple(k) == (5, 0)
    seeds = {rng.seed_of(k)}
    for _ in range(50):
        k = rng.next_key(k)
        seeds.add(rng.seed_of(k))
    assert len(seeds) == 51 and all(0 <= s < 2**63 for s in seeds)


def test_seeded_makes_draws_a_function_of_the_key():
    k = rng.key(11)
    with rng.seeded(k):
        a = torch.rand(5)
        mask_a = torch.nn.functional.dropout(torch.ones(20), p=0.5)
    torch.rand(3)  # move the global generator in between
    with rng.seeded(k):
        b = torch.rand(5)
        mask_b = torch.nn.functional.dropout(torch.ones(20), p=0.5)
    with rng.seeded(rng.next_key(k)):
        c = torch.rand(5)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(a, c)


def test_seeded_restores_the_global_rng_state_even_on_error():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    with rng.seeded(rng.key(0)):
        torch.rand(100)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(RuntimeError, match="boom"):
        with rng.seeded(rng.key(1)):
            torch.rand(10)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), state)
    expected = torch.rand(4)
    torch.set_rng_state(state)
    with rng.seeded(rng.key(2)):
        torch.randn(7)
    assert torch.equal(torch.rand(4), expected)


def test_bad_keys_and_seeds_are_rejected():
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="seed must be an int"):
            rng.key(bad)
    for bad in (torch.zeros(2), torch.zeros(3, dtype=torch.int64), [0, 0]):
        with pytest.raises(TypeError, match=r"int64 tensor of shape \(2,\)"):
            rng.fold_in(bad, 0)
        with pytest.raises(TypeError, match="expected a key"):
            rng.seed_of(bad)


def test_next_key_advances_each_stacked_key_like_a_single_one():
    keys = torch.stack([rng.key(1), rng.fold_in(rng.key(2), 5)])
    stacked = rng.next_key(keys)
    assert torch.equal(stacked[0], rng.next_key(keys[0])) and torch.equal(stacked[1], rng.next_key(keys[1]))
    with pytest.raises(TypeError, match="shape"):
        rng.next_key(torch.zeros(3, dtype=torch.int64))
