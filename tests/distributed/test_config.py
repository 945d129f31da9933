"""ParallelConfig: flags reach the Python API and the CLI; bad values name the field and the limit."""
import pytest

from moe_serve.cli.main import build_parser
from moe_serve.config import EngineConfig, ParallelConfig
from moe_serve.distributed.groups import ParallelLayout


def test_flat_options_and_cli_flags_reach_the_parallel_section():
    cfg = EngineConfig.from_flat(tp=2, ep=2, dispatch="allgather", redundant_experts=4, rebalance_every=8)
    assert (cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.world_size) == (2, 2, 2)
    args = build_parser().parse_args(["generate", "--tp", "2", "--ep", "2", "--dispatch", "alltoall",
                                      "--placement", "p.json", "--rebalance-every", "4", "--redundant-experts", "2"])
    assert (args.tp, args.ep, args.dispatch, args.placement, args.rebalance_every, args.redundant_experts) == \
        (2, 2, "alltoall", "p.json", 4, 2)


@pytest.mark.parametrize("kw,field", [
    (dict(tp=0), "parallel.tp"), (dict(tp=2, ep=3), "parallel.ep"), (dict(tp=2, ep=4), "parallel.tp"),
    (dict(dispatch="ring"), "parallel.dispatch"), (dict(tp=2, ep=2, dispatch="alltoall"), "parallel.dispatch"),
    (dict(allreduce="mpi"), "parallel.allreduce"), (dict(heartbeat_timeout_s=0.5), "parallel.heartbeat_timeout_s"),
    (dict(tp=2, ep=2, preplan=True), "parallel.preplan"), (dict(worker_endpoint="host:1"), "parallel.worker_endpoint"),
    (dict(ep=2, preplan_predictor="p.safetensors"), "parallel.preplan_predictor"),
])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ParallelConfig(**kw)


def test_layout_groups():
    lay = ParallelLayout(tp=2, ep=4, rank=3)  # W=4: two TP pairs, data parallel across them; EP over all 4
    assert lay.tp_groups() == [[0, 1], [2, 3]] and lay.ep_groups() == [[0, 1, 2, 3]]
    assert (lay.dp, lay.tp_rank, lay.dp_rank, lay.ep_rank, lay.output_ranks()) == (2, 1, 1, 3, [0, 2])
    lay = ParallelLayout(tp=4, ep=2, rank=3)  # experts shared by rank pairs that split their intermediate dim
    assert lay.ep_groups() == [[0, 2], [1, 3]] and lay.moe_tp_groups() == [[0, 1], [2, 3]]
    assert (lay.moe_tp, lay.ep_rank, lay.moe_tp_rank) == (2, 1, 1)


def test_plan_errors_are_refused_before_any_rank_starts(tmp_path, capsys):
    # what only the checkpoint can tell (8 experts, 3 MoE layers) is checked by the frontend: a plain CLI
    # error naming the flag, not a rank's traceback inside a WorkerFailure after starting the ranks
    import numpy as np

    from moe_serve.cli.main import main
    from placement.plan import PlacementPlan
    from tests.models.tiny_checkpoints import make_tiny_checkpoint

    ckpt = str(make_tiny_checkpoint("mixtral", tmp_path / "mixtral"))
    four_ranks = tmp_path / "plan4.json"
    PlacementPlan.from_phy2log(np.arange(8)[None].repeat(3, 0), 8, 4).save(four_ranks)
    cases = [(["--redundant-experts", "1"], r"parallel.redundant_experts=1: experts (8) + redundant experts must be "
                                            r"divisible by parallel.ep=2"),
             (["--placement", str(four_ranks)], "parallel.placement: plan has 3 layers x 8 experts on 4 ranks"),
             (["--placement", str(tmp_path / "none.json")], "does not exist")]
    for flags, message in cases:
        rc = main(["generate", "--model", ckpt, "--prompt", "hi", "--max-tokens", "1", "--ep", "2",
                   "--threads-per-rank", "1", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (flags, err)
