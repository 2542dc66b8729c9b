"""Sampling and streaming text assembly, against hand-computed answers."""

from __future__ import annotations

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.runtime.generate import TextAssembler
from llmpress.runtime.sampling import (Sampler, SamplingConfig, apply_repeat_penalty,
                                       filter_candidates)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingConfig(temperature=0))(logits, []) == 1


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    ids, _ = filter_candidates(logits, SamplingConfig(top_k=2, top_p=1.0, min_p=0.0))
    assert ids.tolist() == [1, 3]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids, _ = filter_candidates(probs.log(), SamplingConfig(top_k=0, top_p=0.8, min_p=0.0))
    assert ids.tolist() == [0, 1]  # 0.5 + 0.3 reaches 0.8
    ids, _ = filter_candidates(probs.log(), SamplingConfig(top_k=0, top_p=0.81, min_p=0.0))
    assert ids.tolist() == [0, 1, 2]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    ids, _ = filter_candidates(probs.log(), SamplingConfig(top_k=0, top_p=1.0, min_p=0.2))
    assert ids.tolist() == [0, 1]  # 0.1 < 0.2 * 0.6


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.slow
def test_seed_makes_draws_reproducible_and_follow_the_distribution():
    logits = torch.tensor([0.0, 0.0, 1.0, 2.0])
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    first = [Sampler(cfg)(logits, []) for _ in range(3)]
    sampler_a, sampler_b = Sampler(cfg), Sampler(cfg)
    draws_a = [sampler_a(logits, []) for _ in range(2000)]
    assert draws_a == [sampler_b(logits, []) for _ in range(2000)]
    assert len(set(first)) == 1
    expected = torch.softmax(logits, 0)
    observed = torch.bincount(torch.tensor(draws_a), minlength=4).float() / 2000
    assert torch.allclose(observed, expected, atol=0.04)


def test_temperature_sharpens():
    logits = torch.tensor([0.0, 1.0])
    cold = Sampler(SamplingConfig(temperature=0.1, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    assert sum(cold(logits, []) for _ in range(500)) > 495


def test_extreme_temperatures_stay_distributions():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    tiny = Sampler(SamplingConfig(temperature=1e-300, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    assert {tiny(logits, []) for _ in range(50)} == {1}  # the limit of cooling: greedy
    hot = Sampler(SamplingConfig(temperature=1e300, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    assert {hot(logits, []) for _ in range(400)} == {0, 1, 2, 3}  # the limit: uniform


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(min_p=2), dict(top_k=-1), dict(repeat_penalty=0),
                                 dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(top_p=float("nan")), dict(repeat_penalty=1e-300),
                                 dict(repeat_penalty=float("inf")), dict(repeat_penalty=1e300)])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(LlmpressError):
        SamplingConfig(**bad)


def fake_decoder(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_assembler_waits_for_complete_utf8():
    euro = "€".encode()  # 3 bytes split over 3 tokens
    asm = TextAssembler(fake_decoder({1: euro[:1], 2: euro[1:2], 3: euro[2:], 4: b"!"}), ())
    assert [asm.push(i)[0] for i in (1, 2, 3, 4)] == ["", "", "€", "!"]


def test_assembler_holds_back_a_possible_stop_string_and_cuts_at_it():
    asm = TextAssembler(fake_decoder({1: b"Hello ", 2: b"##", 3: b"#", 4: b"END", 5: b"x"}),
                        ("###END",))
    assert asm.push(1) == ("Hello ", False)
    assert asm.push(2) == ("", False)  # "##" may start "###END"
    assert asm.push(3) == ("", False)
    assert asm.push(4) == ("", True)  # stop reached: the stop string itself is not emitted


def test_assembler_releases_held_text_when_it_cannot_be_a_stop():
    asm = TextAssembler(fake_decoder({1: b"a#", 2: b"b"}), ("#END",))
    assert asm.push(1) == ("a", False)
    assert asm.push(2) == ("#b", False)
