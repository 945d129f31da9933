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
    (dict(shutdown_grace_s=0), "parallel.shutdown_grace_s"),
    # with ep=1 (one process, or TP ranks holding every expert) these were silently ignored
    (dict(placement="plan.json"), "parallel.placement must be unset unless ep > 1"),
    (dict(tp=2, rebalance_every=8), "parallel.rebalance_every must be 0 unless ep > 1"),
    (dict(redundant_experts=4), "parallel.redundant_experts must be 0 unless ep > 1"),
])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ParallelConfig(**kw)


@pytest.mark.parametrize("kw,top", [(dict(ep=2, worker_endpoint="tcp://127.0.0.1:0"), 65533),
                                    (dict(worker_endpoint="tcp://127.0.0.1:99999"), 65534),
                                    (dict(tp=2, worker_endpoint="tcp://127.0.0.1:65534"), 65533)])
def test_worker_endpoint_ports_past_the_limit_are_refused(kw, top):
    """ZeroMQ bound port 0 as any free port and 99999 as 34463, silently; 65534 left no port for rank 1 (+1 + r)."""
    with pytest.raises(ValueError, match=rf"^parallel\.worker_endpoint must be tcp://host:port with 1 <= port <= "
                                         rf"{top} \(it binds port and port\+1\+r for each of the max\(tp, ep\)="):
        ParallelConfig(**kw)
    ParallelConfig(**(kw | dict(worker_endpoint=f"tcp://127.0.0.1:{top}")))  # the limit itself is taken


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


def _config_dir(path, family: str, **edits):
    """A checkpoint directory holding only a tiny `family` config.json with `edits` applied: all the frontend
    reads before it would start the ranks (no weights to write, so each case costs milliseconds)."""
    import json

    from tests.models.tiny_checkpoints import hf_config

    hf_config(family).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **edits}))
    return str(path)


# (id, family, config.json edits, parallel options, text the error names)
UNSPLITTABLE = [
    ("gqa-heads", "mixtral", dict(num_attention_heads=3, num_key_value_heads=1), dict(tp=2),
     "num_attention_heads=3 must be divisible by parallel.tp=2"),
    ("kv-heads", "qwen3_moe", dict(num_attention_heads=6, num_key_value_heads=3), dict(tp=2),
     "num_key_value_heads=3 and parallel.tp=2 must divide one another"),
    ("olmoe-full-qk-norm-kv", "olmoe", dict(num_key_value_heads=1), dict(tp=2),
     "num_key_value_heads=1 must be divisible by parallel.tp=2 (the q/k norm over the whole projection"),
    ("dense-mlp", "qwen2_moe", dict(intermediate_size=97), dict(tp=2, ep=2),  # layer 1 is a dense MLP
     "intermediate_size=97 must be divisible by parallel.tp=2"),
    ("shared-expert", "qwen2_moe", dict(shared_expert_intermediate_size=81), dict(tp=2, ep=2),
     "shared_expert_intermediate_size=81 must be divisible by parallel.tp=2"),
    # tp=2, ep=1: both ranks share every expert
    ("mixtral-expert", "mixtral", dict(intermediate_size=47), dict(tp=2),
     "intermediate_size=47 must be divisible by the 2 ranks sharing each expert (parallel.tp=2, parallel.ep=1)"),
    ("qwen3-expert", "qwen3_moe", dict(moe_intermediate_size=33), dict(tp=2),
     "moe_intermediate_size=33 must be divisible by the 2 ranks sharing each expert"),
    ("mla-heads", "deepseek_v2", dict(num_attention_heads=3, num_key_value_heads=3), dict(tp=2, ep=2),  # MLA
     "num_attention_heads=3 must be divisible by parallel.tp=2"),
    # tp=2, ep=2: routed experts stay whole, the one shared expert (1 x moe_intermediate_size) is split
    ("deepseek-shared-expert", "deepseek_v3", dict(moe_intermediate_size=33), dict(tp=2, ep=2),
     "n_shared_experts x moe_intermediate_size=33 must be divisible by parallel.tp=2"),
]


def _no_ranks(monkeypatch):
    import moe_serve.distributed.executor as executor

    def started(*a, **k):
        raise AssertionError("worker ranks were started for a checkpoint the layout cannot split")

    monkeypatch.setattr(executor, "WorkerGroup", started)


@pytest.mark.parametrize("family,edits,opts,message", [c[1:] for c in UNSPLITTABLE], ids=[c[0] for c in UNSPLITTABLE])
def test_unsplittable_sizes_are_refused_before_any_rank_starts(tmp_path, monkeypatch, family, edits, opts, message):
    # the ranks refuse these sizes when they shard; the frontend checks the same spec first, so the user gets
    # a ValueError naming the config.json field and the parallel option instead of a WorkerFailure
    import time

    from moe_serve.engine import LLM

    ckpt = _config_dir(tmp_path, family, **edits)
    _no_ranks(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        LLM(model=ckpt, threads_per_rank=1, **opts)
    assert message in str(err.value) and time.perf_counter() - t0 < 1.0, str(err.value)


def test_unsplittable_sizes_cli_one_line(tmp_path, monkeypatch, capsys):
    from moe_serve.cli.main import main

    _no_ranks(monkeypatch)
    for family, edits, flags, message in [
            ("mixtral", dict(num_attention_heads=3, num_key_value_heads=1), ["--tp", "2"], "num_attention_heads=3"),
            ("olmoe", dict(num_key_value_heads=1), ["--tp", "2"], "num_key_value_heads=1"),
            ("deepseek_v2", dict(intermediate_size=97), ["--tp", "2", "--ep", "2"], "intermediate_size=97")]:
        ckpt = _config_dir(tmp_path / family, family, **edits)
        rc = main(["generate", "--model", ckpt, "--prompt", "hi", "--max-tokens", "1", "--threads-per-rank", "1",
                   *flags])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err and "parallel.tp=2" in err, err


def test_check_shardable_agrees_with_the_shard_code():
    # one pure function decides for the frontend and the ranks: every stock tiny checkpoint (the equivalence
    # tests run them under these layouts) passes; sizes only the dense layers use are checked only when there are some
    from moe_serve.distributed.sizes import check_shardable, kv_heads_split
    from moe_serve.models.families import parse_spec
    from tests.models.tiny_checkpoints import FAMILIES, hf_config

    for family in FAMILIES:
        _, spec = parse_spec(hf_config(family).to_dict())
        for tp, ep in ((2, 1), (2, 2), (1, 2)):
            check_shardable(spec, ParallelLayout(tp, ep))
    _, spec = parse_spec(hf_config("qwen2_moe", intermediate_size=97, mlp_only_layers=[]).to_dict())
    check_shardable(spec, ParallelLayout(2, 1))  # no dense layer: intermediate_size is never split
    _, spec = parse_spec(hf_config("qwen3_moe", num_key_value_heads=1).to_dict())
    check_shardable(spec, ParallelLayout(2, 2))  # fewer KV heads than ranks: each rank keeps its one
    assert kv_heads_split(4, 2, 2, "head") and not kv_heads_split(4, 1, 2, "head")
    every = r"num_key_value_heads=3 .*; expert parallelism: moe_intermediate_size=33"  # every problem, one line
    with pytest.raises(ValueError, match=every):
        _, spec = parse_spec(hf_config("qwen3_moe", moe_intermediate_size=33, num_attention_heads=6,
                                       num_key_value_heads=3).to_dict())
        check_shardable(spec, ParallelLayout(2, 1))


def test_more_ranks_or_threads_than_cores_are_refused_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    # accepted before, and served: ranks beyond the cores take turns on them inside every collective, so each
    # step waits on the slowest (and threads_per_rank=0 split os.cpu_count(), not the cores this process may use)
    from moe_serve.cli.main import main
    from moe_serve.distributed.sizes import threads_per_rank, usable_cores
    from moe_serve.engine import LLM

    cores = usable_cores()
    ckpt = _config_dir(tmp_path, "mixtral", num_local_experts=cores + 1)  # ep=cores+1 splits the experts
    _no_ranks(monkeypatch)
    for opts, message in [
            (dict(ep=cores + 1), f"parallel.tp=1, parallel.ep={cores + 1}: {cores + 1} CPU ranks need one core each "
                                 f"at least; this process may use {cores}"),
            (dict(tp=2, ep=2, threads_per_rank=cores), f"parallel.threads_per_rank={cores}: 2 ranks x {cores} threads "
                                                       f"exceed the {cores} cores this process may use; at most {cores // 2}")]:
        with pytest.raises(ValueError) as err:
            LLM(model=ckpt, **opts)
        assert message in str(err.value), str(err.value)
    rc = main(["generate", "--model", ckpt, "--prompt", "hi", "--ep", "2", "--threads-per-rank", str(cores)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and f"parallel.threads_per_rank={cores}" in err, err
    assert threads_per_rank(1, 2, 0, "cpu", cores=6) == 3  # 0: the usable cores split evenly
    assert threads_per_rank(1, 8, 0, "cuda", cores=4) == 1  # GPU ranks: their cores are not the compute


def test_a_closed_model_is_not_kept_alive(tmp_path):
    # every DistributedModel registers close() to run at exit; the registry kept each one (its plan, its
    # engine's hooks) alive after close, for the life of the process: one per engine a server or notebook made
    import gc
    import weakref

    from moe_serve.config import ModelConfig
    from moe_serve.distributed.executor import DistributedModel

    ckpt = _config_dir(tmp_path, "mixtral")
    dm = DistributedModel(ModelConfig(model=ckpt), ParallelConfig(ep=2, threads_per_rank=1))
    dm.close()
    dm.close()
    ref = weakref.ref(dm)
    del dm
    gc.collect()
    assert ref() is None


def test_ranks_started_here_on_cuda_take_one_gpu_each(tmp_path):
    """Every rank this machine started on model.device=cuda was given "cuda" itself, so all went to GPU 0: NCCL
    refuses two ranks on one GPU (and with one GPU the failure came from each rank at start-up). Rank r now takes
    cuda:r (from the index given on), and too few GPUs are refused before any rank starts."""
    import torch

    from moe_serve.config import ModelConfig
    from moe_serve.distributed.executor import DistributedModel
    from moe_serve.distributed.sizes import check_rank_devices, rank_device
    from tests.models.tiny_checkpoints import make_tiny_checkpoint

    assert [rank_device("cuda", r) for r in range(2)] == ["cuda:0", "cuda:1"]
    assert [rank_device("cuda:2", r) for r in range(2)] == ["cuda:2", "cuda:3"]
    assert rank_device("cpu", 1) == "cpu"
    check_rank_devices("cuda:2", 1, 2, gpus=4)
    with pytest.raises(ValueError, match=r"^model\.device=cuda:3 with parallel\.tp=1, parallel\.ep=2: the 2 ranks take "
                                         r"one GPU each, cuda:3 to cuda:4; this machine has 4$"):
        check_rank_devices("cuda:3", 1, 2, gpus=4)
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        pytest.skip(f"{gpus} GPUs: 2 ranks fit")
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    with pytest.raises(ValueError, match=rf"the 2 ranks take one GPU each, cuda:0 to cuda:1; this machine has {gpus}$"):
        DistributedModel(ModelConfig(model=str(ckpt), device="cuda"), ParallelConfig(tp=2, allreduce="gloo"))


def test_a_bad_preplan_predictor_is_refused_before_any_rank_starts(tmp_path, capsys):
    """A missing or unreadable --preplan-predictor file failed every rank's start-up: exit 1 and a traceback (each
    rank's FileNotFoundError wrapped in WorkerFailure). Now the frontend loads it first: one line naming the option."""
    from moe_serve.cli.main import main
    from tests.models.tiny_checkpoints import make_tiny_checkpoint

    ckpt = str(make_tiny_checkpoint("mixtral", tmp_path / "mixtral"))
    garbage = tmp_path / "p.safetensors"
    garbage.write_bytes(b"not a predictor")
    capsys.readouterr()  # the checkpoint writer's progress bar
    for path, message in [(tmp_path / "none.safetensors", "does not exist"), (garbage, "not a readable safetensors")]:
        rc = main(["generate", "--model", ckpt, "--prompt", "hi", "--max-tokens", "1", "--ep", "2",
                   "--threads-per-rank", "1", "--preplan", "--preplan-predictor", str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"moe-serve generate: error: parallel.preplan_predictor: predictor file "
                                          f"{path}") and message in err and "Traceback" not in err, err
