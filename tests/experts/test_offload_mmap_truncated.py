"""host_memory=mmap reads cold experts from the memory-mapped checkpoint: a file truncated after loading
must give a clear error naming it and both sizes, never a SIGBUS that kills the process.

Each scenario runs in a child process (the old code died there with SIGBUS, which would have taken
pytest down with it) on a real checkpoint directory written by the test: the tiny Mixtral resharded
into a dense file and an experts file (with model.safetensors.index.json, as the Hub's are), so that
truncating the experts file leaves the dense weights readable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ENGINE = r"""
import json, os, sys
from moe_serve import LLM, SamplingParams
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
results = []
for path, cpu_experts, admission in json.loads(sys.argv[1]):  # each on a checkpoint copy of its own
    experts_file = os.path.join(path, "experts.safetensors")
    llm = LLM(model=path, dtype="float32", kv_cache_gb=0.01, expert_cache_slots=4, cache_policy="lru", cpu_threads=1,
              host_memory="mmap", cpu_experts=cpu_experts, cache_admission=admission)
    before = [o.finish_reason for o in llm.generate([[5, 17, 3, 99, 42]], params)]
    size = os.path.getsize(experts_file)
    os.truncate(experts_file, size // 2)
    after = [[(o.finish_reason, o.error) for o in llm.generate([[7, 64, 12], [5, 17, 3]], params)] for _ in range(2)]
    results.append(dict(before=before, size=size, after=after))
    llm.close()
print(json.dumps(results))
"""

QUEUED = r"""
import json, os, sys
import torch
from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.copier import CopyError
from moe_serve.experts.factory import expert_store_factory
from moe_serve.models import load_model
from moe_serve.models.checkpoint import CheckpointError
path, experts_file = sys.argv[1:3]
cfg = ExpertCacheConfig(expert_cache_slots=4, cache_policy="lru", host_memory="mmap", cpu_experts="off",
                        cache_admission="always")
store = load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg)).store
x = torch.randn(2, 64)
out = {}
with store.copier._cv:  # the copy thread is held: both copies are queued, their views taken, nothing read
    store.begin_layer(0, [0, 1])
    os.truncate(experts_file, os.path.getsize(experts_file) // 2)
try:
    store.compute_expert(0, 0, x)
except CopyError as exc:
    out["copy"] = str(exc)
store.end_layer(0)
out["resident"] = bool(store.cache.resident(0))
try:
    store.begin_layer(0, [0])
except CheckpointError as exc:
    out["next"] = str(exc)
store.close()
print(json.dumps(out))
"""


def split_checkpoint(src: Path, to: Path) -> Path:
    """`src` rewritten as dense.safetensors + experts.safetensors with an index: the experts file to truncate."""
    from safetensors.torch import load_file, save_file

    to.mkdir()
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    weight_map = {}
    for name, keep in (("dense.safetensors", False), ("experts.safetensors", True)):
        part = {k: t for k, t in tensors.items() if (".experts." in k) == keep}
        save_file(part, to / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (to / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            (to / f.name).write_bytes(f.read_bytes())
    return to


def child(script: str, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"child exited with {proc.returncode} (-7: SIGBUS)\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_truncated_checkpoint_fails_its_requests_with_the_file_and_both_sizes(tiny_checkpoint, tmp_path):
    """Copied into slots, streamed through the staging buffers, or computed where they lie: after the
    experts file is cut to half, every request that needs a cold expert ends with finish_reason error
    naming the file and both sizes, and the engine serves on (a second round gets the same answer)."""
    configs = [("off", "always"), ("off", "reuse"), ("on", "auto")]
    paths = [split_checkpoint(tiny_checkpoint("mixtral"), tmp_path / f"ckpt{i}") for i in range(len(configs))]
    outs = child(ENGINE, json.dumps([(str(p), *cfg) for p, cfg in zip(paths, configs)]))
    for path, cfg, out in zip(paths, configs, outs):
        experts = path / "experts.safetensors"
        assert out["before"] == ["length"], cfg
        size = out["size"]
        for round_ in out["after"]:
            assert [reason for reason, _ in round_] == ["error", "error"], (cfg, round_)
            for _, error in round_:
                assert str(experts) in error and f"{size // 2} bytes now, {size} bytes when loaded" in error, (cfg, error)


def test_a_copy_queued_before_the_truncation_checks_the_file_before_reading(tiny_checkpoint, tmp_path):
    """The copy's host views were taken (the file still whole) and the copy queued; the file is cut
    before the copy runs: the copy checks again right before reading, so it fails as a CopyError
    naming the file (the store forgets the slot), and the next use of the expert is refused at once."""
    path = split_checkpoint(tiny_checkpoint("mixtral"), tmp_path / "ckpt")
    experts = path / "experts.safetensors"
    out = child(QUEUED, path, experts)
    assert "copy" in out and str(experts) in out["copy"] and "bytes when loaded" in out["copy"], out
    assert not out["resident"]
    assert str(experts) in out.get("next", ""), out
