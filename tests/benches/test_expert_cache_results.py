"""benches/expert_cache.py keeps its results across partial reruns: a rerun of some budgets replaces
those (JSON and text table) and leaves the others and the other variants' tables as they were."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("expert_cache_bench", ROOT / "benches" / "expert_cache.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_rerun_of_one_budget_and_policy_keeps_the_others():
    bench = load_bench()
    old = {"intent": {"0.125": {"lru": 1}, "0.5": {"lru": 2, "belady": 3}}, "summary": {"0.5": {"lru": 4}}}
    new = {"intent": {"0.5": {"lru": 5}}, "summary": {"0.25": {"lru": 6}}}
    merged = bench.merge_capacities(old, new)
    assert merged == {"intent": {"0.125": {"lru": 1}, "0.5": {"lru": 5, "belady": 3}},
                      "summary": {"0.25": {"lru": 6}, "0.5": {"lru": 4}}}
    assert list(merged["summary"]) == ["0.25", "0.5"]  # budgets in order
    assert old["intent"]["0.5"] == {"lru": 2, "belady": 3}  # the input is not modified
    assert bench.merge_capacities(None, new) == {"intent": {"0.5": {"lru": 5}}, "summary": {"0.25": {"lru": 6}}}


def test_a_section_is_replaced_by_its_header_and_new_ones_appended(tmp_path):
    bench = load_bench()
    txt = tmp_path / "sim.txt"
    bench.write_section(txt, "default", "table A", first=True)
    bench.write_section(txt, "variant x", "table B", first=False)
    bench.write_section(txt, "variant y", "table C", first=False)
    assert txt.read_text() == "default\ntable A\n\nvariant x\ntable B\n\nvariant y\ntable C\n"
    bench.write_section(txt, "variant x", "table B2", first=False)
    bench.write_section(txt, "default, renamed", "table A2", first=True)  # the default run is always first
    assert txt.read_text() == "default, renamed\ntable A2\n\nvariant x\ntable B2\n\nvariant y\ntable C\n"
