"""``optim.lr=auto``'s trials (issue 26): the candidates the curve gives, the held-out slice, successive
halving, and the settings that configure them. The whole run (trials, then training bit-identical to the
chosen rate given by hand, resume without a search) is in ``test_lr_find_run.py``."""

from __future__ import annotations

import math

import pytest

from conftest import compose_config
from finetune.config import check_config, check_overrides_take_effect
from finetune.errors import UserError
from finetune.lr_find import (LRFind, candidate_rates, final_rung_updates, first_rung_updates, fold_count,
                              frozen_candidate_rates, further_folds, holdout_split, nearest, select,
                              successive_halving)


def curve(rates, losses, chosen=None):
    smoothed = [v if math.isfinite(v) else None for v in losses]
    return LRFind(list(rates), list(losses), smoothed, "valley", chosen=chosen, reason="",
                  chosen_index=None if chosen is None else list(rates).index(chosen))


def test_candidates_span_the_valley_its_multiples_and_the_usual_rate_below_the_blow_up():
    rates = [10 ** (-6 + i * 0.25) for i in range(25)]  # 1e-6 .. 1
    losses = [2.0 - 0.05 * i for i in range(20)] + [1.5, 3.0, 6.0, 12.0, math.nan]
    valley = rates[8]
    got = candidate_rates(curve(rates, losses, chosen=valley), fallback=1e-3)
    assert got == sorted(got)
    for wanted in (valley, 3 * valley, 10 * valley, 1e-3, 3e-3):
        assert any(abs(math.log(r / wanted)) < math.log(1.5) for r in got), (wanted, got)
    assert all(b >= 1.5 * a for a, b in zip(got, got[1:], strict=False))  # near ones merged
    assert max(got) < rates[-1]  # never at the rate where the loss was no longer finite


def test_without_a_curve_the_trials_compare_the_usual_rate_and_three_times_it():
    flat = curve([1e-7 * 10 ** (i / 10) for i in range(20)], [2.0] * 20)
    assert candidate_rates(flat, fallback=3e-4) == pytest.approx([3e-4, 9e-4])


def test_successive_halving_keeps_the_best_third_gives_it_three_times_the_updates_and_ends_with_one():
    calls = []

    def score(rate, updates):  # held-out loss: best at 1e-3, the longer trained the better; 1e-1 diverges
        calls.append((rate, updates))
        return math.inf if rate >= 1e-1 else abs(math.log10(rate) + 3) + 1 / updates

    rates = [1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-1]
    rungs = successive_halving(rates, score, first_updates=4)
    assert [r["updates"] for r in rungs] == [4, 12]
    assert [len(r["scores"]) for r in rungs] == [6, 2]
    assert rungs[0]["kept"] == [1e-3, 3e-3] and rungs[-1]["kept"] == [1e-3]
    assert [1e-1, None] in rungs[0]["scores"]  # a diverged trial is recorded, never kept
    assert calls == [(r, 4) for r in rates] + [(1e-3, 12), (3e-3, 12)]


def test_rates_and_freezings_halve_together_and_a_tie_goes_to_the_earlier_candidate():
    candidates = [(1e-3, "none"), (3e-3, "none"), (1e-3, "head_only"), (1e-2, "head_only")]
    losses = {(1e-3, "none"): 0.5, (3e-3, "none"): 0.4, (1e-3, "head_only"): 0.9, (1e-2, "head_only"): 0.4}
    rungs = successive_halving(candidates, lambda c, n: losses[c], first_updates=2)
    assert rungs[0]["kept"] == [[3e-3, "none"], [1e-2, "head_only"]]  # as the record keeps them: lists
    assert rungs[-1]["kept"] == [[3e-3, "none"]] and [[1e-2, "head_only"], 0.4] in rungs[-1]["scores"]
    assert frozen_candidate_rates(fallback=1e-3) == pytest.approx([1e-3, 3e-3, 1e-2])


def test_each_freeze_option_halves_on_its_own_then_the_winners_and_the_usual_rate_train_as_long_as_the_run():
    """Short trials lead with the fast rates; the final rung, as long as the run, judges what the run delivers."""
    calls = []
    early = {(1e-3, "none"): 0.9, (3e-3, "none"): 0.5, (1e-2, "none"): 0.6, (1e-3, "head_only"): 1.2,
             (3e-3, "head_only"): 1.0}
    late = {(3e-3, "none"): 0.7, (1e-3, "none"): 0.4, (3e-3, "head_only"): 0.5}

    def score(candidate, updates):
        calls.append((candidate, updates))
        return late[candidate] if updates == 100 else early[candidate]

    candidates = [*early]
    rungs = select(candidates, score, first_updates=4, final_updates=100, family=lambda c: c[1], usual=[(1e-3, "none")])
    assert [(r.get("family"), r["updates"], len(r["scores"])) for r in rungs] == [
        ("none", 4, 3), ("head_only", 4, 2), (None, 100, 3)]
    assert rungs[0]["kept"] == [[3e-3, "none"]]  # 3 candidates or fewer: the best one goes on
    final = rungs[-1]
    assert final["final"] is True and [s[0] for s in final["scores"]] == [[1e-3, "none"], [3e-3, "none"],
                                                                           [3e-3, "head_only"]]
    assert final["kept"] == [[1e-3, "none"]]  # the usual rate, last in its family's short trials, won at full length
    assert calls[-3:] == [((1e-3, "none"), 100), ((3e-3, "none"), 100), ((3e-3, "head_only"), 100)]
    assert select(candidates, score, first_updates=4, final_updates=None) == successive_halving(
        candidates, score, first_updates=4)  # final_share=0: the selection as it was


def test_each_freeze_options_usual_rate_is_a_finalist_though_a_faster_rate_led_its_short_trials():
    """Short trials lean to fast rates (a head alone leads early at 1e-2): the usual rate of every freeze option still
    trains as long as the run, and wins when it is better there."""
    early = {(1e-3, "none"): 0.9, (3e-3, "none"): 0.5, (1e-3, "head_only"): 1.2, (3e-3, "head_only"): 1.0,
             (1e-2, "head_only"): 0.7}
    late = {(1e-3, "none"): 0.6, (3e-3, "none"): 0.7, (1e-3, "head_only"): 0.4, (1e-2, "head_only"): 0.5}
    usual = [(1e-3, "none"), (1e-3, "head_only")]
    rungs = select([*early], lambda c, n: late[c] if n == 100 else early[c], first_updates=4, final_updates=100,
                   family=lambda c: c[1], usual=usual)
    assert rungs[1]["family"] == "head_only" and rungs[1]["kept"] == [[1e-2, "head_only"]]
    final = rungs[-1]
    assert [c for c, _ in final["scores"]] == [[1e-3, "none"], [3e-3, "none"], [1e-3, "head_only"],
                                               [1e-2, "head_only"]]
    assert final["kept"] == [[1e-3, "head_only"]]
    same = select([*early], lambda c, n: late[c] if n == 100 else early[c], first_updates=4, final_updates=100,
                  family=lambda c: c[1], usual=[*usual, (1e-3, "none")])
    assert same == rungs  # a usual recipe named twice, or already a winner, is one finalist


def test_the_final_rung_goes_by_the_runs_monitored_metric_then_by_the_loss():
    """As long as the run, the trials are judged as the run picks its best epoch (val/acc1 by default): a lower loss
    with fewer images right loses; the loss breaks a tie; a diverged finalist never wins."""
    pairs = [(1e-3, "none"), (1e-2, "none"), (1e-3, "head_only"), (3e-3, "head_only")]
    final = {(1e-3, "none"): (0.90, -0.55), (1e-3, "head_only"): (0.95, -0.60), (3e-3, "head_only"): (0.80, -0.60),
             (1e-2, "none"): (float("inf"), float("inf"))}
    rungs = select(pairs, lambda c, n: {(1e-2, "none"): 0.1, (3e-3, "head_only"): 0.2}.get(c, 1.0), first_updates=2,
                   final_updates=30, family=lambda c: c[1], usual=[(1e-3, "none")], judge=lambda c, n: final[c])
    last = rungs[-1]
    assert [c for c, _ in last["scores"]] == [[1e-3, "none"], [1e-2, "none"], [3e-3, "head_only"]]
    assert last["kept"] == [[3e-3, "head_only"]]  # 0.60 right, and the lower loss of the two at 0.60
    assert last["values"] == [[[1e-3, "none"], -0.55], [[1e-2, "none"], float("inf")], [[3e-3, "head_only"], -0.60]]
    assert [[1e-2, "none"], None] in last["scores"]


def test_the_final_rung_is_a_share_of_the_run_and_the_usual_rate_the_nearest_candidate():
    assert final_rung_updates(120, 1.0) == 120 and final_rung_updates(120, 0.1) == 12
    assert final_rung_updates(3, 0.01) == 1 and final_rung_updates(120, 0.0) is None
    assert nearest([2e-4, 8e-4, 3e-3], 1e-3) == 8e-4 and nearest([2e-4, 3e-3], 1e-3) == 3e-3
    assert nearest([(1e-4, "none"), (1.2e-3, "none")], 1e-3, rate_of=lambda c: c[0]) == (1.2e-3, "none")


def test_a_single_family_whose_winner_is_the_usual_rate_needs_no_final_rung():
    rungs = select([1e-4, 1e-3, 1e-2], lambda rate, n: abs(rate - 1e-3), first_updates=2, final_updates=50, usual=[1e-3])
    assert [r["updates"] for r in rungs] == [2] and rungs[-1]["kept"] == [1e-3] and "final" not in rungs[-1]


def test_the_held_out_slice_is_stratified_reproducible_and_leaves_every_class_an_image():
    samples = [(f"{c}/{i}.png", c) for c in range(3) for i in range((2, 5, 10)[c])]
    rest, held = holdout_split(samples, fraction=0.2, seed=7)
    assert sorted(rest + held) == sorted(samples) and not set(rest) & set(held)
    assert sorted(label for _, label in held) == [0, 1, 2, 2]  # 1 of 2, 1 of 5, 2 of 10
    assert {label for _, label in rest} == {0, 1, 2}
    assert holdout_split(samples, fraction=0.2, seed=7) == (rest, held)
    assert holdout_split(samples, fraction=0.2, seed=8)[1] != held
    assert holdout_split([("a", 0), ("b", 1)], fraction=0.5, seed=0) == ([("a", 0), ("b", 1)], [])


def test_further_slices_are_disjoint_stratified_reproducible_and_with_the_first_judge_every_image_once():
    samples = [(f"{c}/{i}.png", c) for c in range(4) for i in range((1, 3, 5, 10)[c])]
    rest, held = holdout_split(samples, fraction=0.2, seed=7)
    further = further_folds(samples, held, fraction=0.2, seed=7, folds=5)
    slices = [held] + [h for _, h in further]
    for r, h in further:
        assert sorted(r + h) == sorted(samples) and not set(r) & set(h) and {label for _, label in r} == {0, 1, 2, 3}
    assert sorted(s for h in slices for s in h) == sorted(s for s in samples if s[1] != 0)  # each judged once
    assert [sorted(label for _, label in h) for h in slices] == [  # as many of each class as the first slice holds,
        [1, 2, 3, 3]] * 3 + [[2, 3, 3]] * 2                        # until a class runs out; a class of 1: never
    assert further_folds(samples, held, fraction=0.2, seed=7, folds=5) == further
    assert further_folds(samples, held, fraction=0.2, seed=7, folds=3) == further[:2]
    assert further_folds(samples, held, fraction=0.2, seed=7, folds=1) == []


def test_the_final_rung_is_judged_on_200_images_as_far_as_the_pool_has_them():
    assert fold_count(4, fraction=0.2, configured=None) == 5  # 20 images in the pool: each judged once
    assert fold_count(50, fraction=0.2, configured=None) == 4  # 200
    assert fold_count(199, fraction=0.2, configured=None) == 2 and fold_count(200, fraction=0.2, configured=None) == 1
    assert fold_count(4, fraction=0.4, configured=None) == 2  # two slices of 40% fit, not three
    assert fold_count(4, fraction=0.2, configured=3) == 3 and fold_count(900, fraction=0.2, configured=2) == 2


def test_the_first_rung_is_an_eighth_of_the_run_at_least_six_updates_unless_configured():
    assert first_rung_updates(800, None) == 100 and first_rung_updates(10, None) == 6
    assert first_rung_updates(800, 2) == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.lr_find.select=best"], "optim.lr_find.select must be one of trials, curve; got 'best'"),
    (["optim.lr_find.holdout=1.0"], "optim.lr_find.holdout must be between 0 and 1, got '1.0'"),
    (["optim.lr_find.trial_updates=0"], "optim.lr_find.trial_updates must be positive or null, got '0'"),
    (["optim.lr_find.final_share=1.5"], "optim.lr_find.final_share must be between 0 and 1 (0: no final rung), "
                                        "got '1.5'"),
    (["optim.lr_find.final_folds=6"], "optim.lr_find.final_folds must be null or a whole number from 1 to 5 (the "
                                      "disjoint slices of optim.lr_find.holdout=0.2 that fit in the training pool), "
                                      "got '6'"),
    (["optim.lr_find.final_folds=0"], "optim.lr_find.final_folds must be null or a whole number from 1 to 5"),
    (["optim.lr_find.holdout=0.5", "optim.lr_find.final_folds=3"], "a whole number from 1 to 2 (the disjoint slices "
                                                                    "of optim.lr_find.holdout=0.5"),
    (["optim.lr_find.freeze_candidates=[until]"], "optim.lr_find.freeze_candidates: 'until' is not a freeze option "
                                                  "the trials can try: use head_only, or [] for the rate alone"),
])
def test_bad_trial_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as err:
        check_config(compose_config(["optim.lr=auto", *overrides]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_trial_settings_without_trials_are_refused():
    overrides = ["optim.lr=auto", "optim.lr_find.select=curve", "optim.lr_find.holdout=0.3"]
    with pytest.raises(UserError, match="optim.lr_find.holdout is set but has no effect with optim.lr_find.select="
                                        "curve: only optim.lr_find.select=trials runs trials"):
        check_overrides_take_effect(compose_config(overrides), overrides)
    check_overrides_take_effect(compose_config(overrides[:1] + overrides[2:]), overrides[:1] + overrides[2:])
    final = ["optim.lr=auto", "optim.lr_find.select=curve", "optim.lr_find.final_share=0"]
    with pytest.raises(UserError, match="optim.lr_find.final_share is set but has no effect"):
        check_overrides_take_effect(compose_config(final), final)
    folds = ["optim.lr=auto", "optim.lr_find.final_share=0", "optim.lr_find.final_folds=3"]
    with pytest.raises(UserError, match="optim.lr_find.final_folds is set but has no effect with optim.lr_find."
                                        "final_share=0.0: it sets the held-out slices of the final rung"):
        check_overrides_take_effect(compose_config(folds), folds)
    check_overrides_take_effect(compose_config(folds[:1] + folds[2:]), folds[:1] + folds[2:])
