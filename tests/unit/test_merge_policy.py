"""The dominant-adapter merge policy: hysteresis in both directions, idle steps, refused and virtual adapters."""

import pytest

from server.engine.engine import EngineConfig
from server.engine.merge_policy import MergePolicy, MergePolicyConfig


def policy(patience: int = 3) -> MergePolicy:
    return MergePolicy(MergePolicyConfig(merge_share=0.75, unmerge_share=0.5, patience=patience))


def run(p: MergePolicy, steps: list[dict[str | None, int]], merged: str | None = None) -> list[str | None]:
    """Feed steps, following the policy's decisions as the controller does; the decision after each step."""
    out = []
    for rows in steps:
        merged = p.observe(rows, merged)
        out.append(merged)
    return out


def test_merges_after_patience_steps_of_a_dominant_adapter_and_not_before() -> None:
    dominant = {"m": 8, "j": 1, None: 1}
    assert run(policy(), [dominant] * 4) == [None, None, "m", "m"]


def test_a_step_below_the_merge_share_restarts_the_count() -> None:
    weak = {"m": 7, "j": 2, None: 1}  # 70% < 75%
    dominant = {"m": 3, "j": 1}  # exactly 75% counts
    assert run(policy(), [dominant, dominant, weak, dominant, dominant, dominant]) == [None] * 5 + ["m"]


def test_another_dominant_adapter_restarts_the_count() -> None:
    assert run(policy(), [{"m": 9}, {"m": 9}, {"k": 9}, {"k": 9}, {"k": 9}]) == [None, None, None, None, "k"]


def test_unmerges_after_patience_steps_below_the_unmerge_share_and_a_step_above_resets() -> None:
    low = {"m": 4, "j": 5}  # 44%
    mid = {"m": 6, "j": 4}  # 60%: neither merges anew nor counts towards unmerging
    assert run(policy(), [low, low, mid, low, low, low], merged="m") == ["m"] * 5 + [None]


def test_a_step_without_the_merged_adapter_counts_as_share_zero_and_idle_steps_count_for_nothing() -> None:
    assert run(policy(), [{"j": 2}, {}, {None: 1}, {}, {"j": 1}], merged="m") == ["m", "m", "m", "m", None]


def test_a_refused_adapter_is_never_merged_and_unmerges_at_once_when_it_runs() -> None:
    p = policy(patience=1)
    p.refuse("dora")
    assert run(p, [{"dora": 9}, {"dora": 9, "m": 1}]) == [None, None]
    assert run(p, [{"m": 9, "dora": 1}], merged="m") == [None]
    p.forget("dora")
    assert run(p, [{"dora": 9}]) == ["dora"]


def test_virtual_adapters_are_never_merged_but_count_as_rows() -> None:
    p = policy(patience=1)
    assert run(p, [{"mix:a*0.5+b*0.5": 9, "m": 1}]) == [None]
    assert run(p, [{"mix:a*0.5+b*0.5": 2, "m": 8}]) == ["m"]


def test_ties_are_broken_by_name_so_runs_are_deterministic() -> None:
    p = MergePolicy(MergePolicyConfig(merge_share=0.5, unmerge_share=0.5, patience=1))
    assert run(p, [{"a": 5, "b": 5}]) == ["b"]


def test_a_merge_that_has_to_wait_is_asked_for_again_next_step() -> None:
    p = policy(patience=2)
    assert [p.observe({"m": 9}, None) for _ in range(4)] == [None, "m", "m", "m"]


@pytest.mark.parametrize(
    ("merge_share", "unmerge_share", "patience"), [(0.5, 0.6, 3), (1.2, 0.5, 3), (0.75, 0.0, 3), (0.75, 0.5, 0)]
)
def test_inconsistent_settings_are_refused(merge_share: float, unmerge_share: float, patience: int) -> None:
    with pytest.raises(ValueError):
        MergePolicyConfig(merge_share=merge_share, unmerge_share=unmerge_share, patience=patience)


def test_the_flag_is_off_by_default_and_refused_with_a_quantized_base(monkeypatch) -> None:
    from server.config import Settings

    assert Settings().merge_dominant is False and EngineConfig().merge_dominant is False
    assert Settings(_cli_parse_args=["--merge-dominant"]).merge_dominant is True
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # as if the quantization library were here
    with pytest.raises(ValueError, match="merge_dominant needs a dense base"):
        Settings(merge_dominant=True, quantize="int8")
