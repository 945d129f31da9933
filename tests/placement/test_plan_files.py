"""Malformed plan files: every one is a ValueError naming the file and the field, never a bare
AttributeError / KeyError / TypeError / IndexError, and never silently truncated data."""
import json

import numpy as np
import pytest

from placement.plan import PlacementPlan


def _doc(tmp_path):
    plan = PlacementPlan.from_phy2log([[0, 2, 1, 2], [1, 0, 2, 1]], 3, 2)
    path = tmp_path / "good.json"
    plan.save(path)
    return json.loads(path.read_text())


def _bad_log2phy_slot(doc):
    doc["log2phy"][0][0][0] = 99  # a slot past P: was an IndexError inside validate
    return doc


CASES = {
    "not an object": (lambda d: [1, 2], "JSON object"),
    "no num_ranks": (lambda d: {k: v for k, v in d.items() if k != "num_ranks"}, "num_ranks"),
    "num_ranks 2.5": (lambda d: dict(d, num_ranks=2.5), "num_ranks"),
    "phy2log null": (lambda d: dict(d, phy2log=None), "phy2log"),
    "phy2log with null": (lambda d: dict(d, phy2log=[[None, 2, 1, 2], [1, 0, 2, 1]]), "phy2log"),
    "phy2log fractional": (lambda d: dict(d, phy2log=[[0.5, 2, 1, 2], [1, 0, 2, 1]]), "phy2log"),
    "phy2log ragged": (lambda d: dict(d, phy2log=[[0, 2, 1], [1, 0, 2, 1]]), "phy2log"),
    "phy2log 1-D": (lambda d: dict(d, phy2log=[0, 2, 1, 2]), "phy2log"),
    "phy2log huge id": (lambda d: dict(d, phy2log=[[0, 2, 1, 2 ** 70], [1, 0, 2, 1]]), "phy2log"),
    "log2phy slot past P": (_bad_log2phy_slot, "log2phy"),
    "meta a list": (lambda d: dict(d, meta=[1]), "meta"),
    "num_experts disagrees": (lambda d: dict(d, num_experts=64), "num_experts"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_json_plan_is_a_value_error_naming_file_and_field(tmp_path, case):
    change, field = CASES[case]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(change(_doc(tmp_path))))
    with pytest.raises(ValueError) as err:
        PlacementPlan.load(path)
    assert str(path) in str(err.value) and field in str(err.value), str(err.value)


def test_not_json_names_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="plan.json"):
        PlacementPlan.load(path)


def test_malformed_safetensors_plans(tmp_path):
    from safetensors.numpy import save_file

    plan = PlacementPlan.from_phy2log([[0, 2, 1, 2]], 3, 2)
    good = tmp_path / "good.safetensors"
    plan.save(good)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        PlacementPlan.load(garbage)
    from safetensors import safe_open

    with safe_open(str(good), framework="numpy") as f:
        meta = f.metadata()
    missing = tmp_path / "missing.safetensors"
    save_file({"phy2log": plan.phy2log}, str(missing), metadata=meta)
    with pytest.raises(ValueError, match="missing.safetensors.*log2phy"):
        PlacementPlan.load(missing)
    fractional = tmp_path / "fractional.safetensors"  # was truncated to [0, 2, 1, 2] and loaded
    save_file({"phy2log": plan.phy2log.astype(np.float32) + 0.5, "log2phy": plan.log2phy,
               "replica_count": plan.replica_count}, str(fractional), metadata=meta)
    with pytest.raises(ValueError, match="fractional.safetensors.*phy2log"):
        PlacementPlan.load(fractional)


def test_engine_refuses_a_plan_file_whose_replicas_disagree_with_redundant_experts(tmp_path):
    """parallel.redundant_experts=8 with a plan file of no replicas ran with none, silently."""
    from moe_serve.distributed.runner import default_plan

    path = tmp_path / "plan.json"
    PlacementPlan.from_phy2log([list(range(8))] * 2, 8, 2).save(path)
    assert default_plan(2, 8, 2, 0, str(path)).num_slots == 8
    with pytest.raises(ValueError, match=r"parallel.redundant_experts=4.*plan.json.*0 redundant"):
        default_plan(2, 8, 2, 4, str(path))
    replicated = tmp_path / "replicated.json"
    PlacementPlan.from_phy2log([list(range(8)) + [0, 1]] * 2, 8, 2).save(replicated)
    assert default_plan(2, 8, 2, 2, str(replicated)).num_slots == 10
    assert default_plan(2, 8, 2, 0, str(replicated)).num_slots == 10  # unset: the plan's own replicas
