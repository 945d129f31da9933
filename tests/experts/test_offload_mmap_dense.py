"""A single-file checkpoint truncated after loading: the dense (non-expert) weights must not be read from the
checkpoint's mapping any more, or the first layer of the next request kills the process with SIGBUS before any
expert is read (the expert reads are checked, see test_offload_mmap_truncated.py). On a CPU in the checkpoint's
dtype `.to()` does not copy, so the dense weights were the mapping itself, with host_memory copy or mmap alike.

Runs in a child process (the old code died there with exit -7) on a copy of the tiny Mixtral (one file)."""
from __future__ import annotations

import json
import shutil

from tests.experts.test_offload_mmap_truncated import child

SCRIPT = r"""
import json, os, sys
from moe_serve import LLM, SamplingParams
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
results = []
for path, host in json.loads(sys.argv[1]):  # each on a checkpoint copy of its own
    llm = LLM(model=path, dtype="float32", kv_cache_gb=0.01, cpu_threads=1, expert_cache_slots=4, cache_policy="lru",
              host_memory=host, cpu_experts="on")
    prompts = [[7, 64, 12], [5, 17, 3]]
    before = [list(o.token_ids) for o in llm.generate(prompts, params)]
    (f,) = [os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors")]
    size = os.path.getsize(f)
    os.truncate(f, size // 2)
    after = [(o.finish_reason, o.error, list(o.token_ids)) for o in llm.generate(prompts, params)]
    results.append(dict(file=f, size=size, before=before, after=after))
    llm.close()
print(json.dumps(results))
"""


def test_a_truncated_single_file_checkpoint_does_not_kill_the_dense_layers(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    assert len(list(src.glob("*.safetensors"))) == 1
    hosts = ["mmap", "copy"]
    paths = [shutil.copytree(src, tmp_path / host) for host in hosts]
    mmap, copy = child(SCRIPT, json.dumps([(str(p), h) for p, h in zip(paths, hosts)]))
    # host=mmap: the experts are still read from the file, whose change is an error naming it (as with two files)
    for reason, error, _ in mmap["after"]:
        assert reason == "error" and mmap["file"] in error, mmap["after"]
        assert f"{mmap['size'] // 2} bytes now, {mmap['size']} bytes when loaded" in error, error
    # host=copy: every weight is in RAM: the file no longer matters, the same greedy tokens come
    assert [r for r, _, _ in copy["after"]] == ["length", "length"], copy["after"]
    assert [t for _, _, t in copy["after"]] == copy["before"]
