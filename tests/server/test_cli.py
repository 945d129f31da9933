"""`moe-serve serve` flags: one per config field of every section, server section included."""
from __future__ import annotations

from moe_serve.cli.flags import config_kwargs
from moe_serve.cli.main import build_parser
from moe_serve.cli.serve import section_classes
from moe_serve.config import EngineConfig


def test_serve_flags_build_the_config_tree():
    args = build_parser().parse_args(["serve", "--model", "/m", "--port", "9001", "--max-num-seqs", "3",
                                      "--max-pending-requests", "7", "--request-timeout-s", "2.5",
                                      "--api-key", "k", "--no-expert-load-stats"])
    cfg = EngineConfig.from_flat(**config_kwargs(args, *section_classes()))
    assert cfg.model.model == "/m" and cfg.kv_cache.max_num_seqs == 3
    assert (cfg.server.port, cfg.server.max_pending_requests, cfg.server.request_timeout_s, cfg.server.api_key) == (
        9001, 7, 2.5, "k")
    assert cfg.trace.expert_load_stats is False
    assert cfg.server.host == "127.0.0.1"  # loopback unless told otherwise


def test_every_config_section_has_flags():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest for a in serve._actions}
    for cls in section_classes():
        for name in cls.__dataclass_fields__:
            assert name in dests, f"{cls.__name__}.{name} has no serve flag"
