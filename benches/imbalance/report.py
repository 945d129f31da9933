"""Markdown report and PNG plots for the imbalance suite's results (see run.py)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"contiguous": "#9e9e9e", "round_robin": "#bdbdbd", "eplb": "#e07b39", "affinity": "#2b7bba",
          "eplb+online": "#f2b27e", "affinity+online": "#1b4f8a"}
ABOUT = """
- **contiguous** (vLLM's default), **round_robin**: logical experts by id; spare slots hold replicas of the
  busiest experts. **eplb**: DeepSeek's EPLB (numpy re-implementation, one node -> global policy), the baseline.
  **affinity** (ours): replication + balanced start + swap search minimizing fan-out and cross-layer rank
  changes on the fitted tokens, explore under a loose cap then tighten to 2% (placement/algorithms/affinity.py).
- **X+online**: plan X as the starting point, then our online re-placement (placement/online.py) after every
  batch, from the last 1024 tokens, rewriting at most 4 slots per layer per step (at most 2 of them re-pointing
  replicas, the rest swaps weighted 20x towards balance); scored over the whole stream, including the batches
  served before it adapted. "moved" = slots rewritten in all (weights copied).
- Static cross-domain: the two domains' per-expert loads correlate weakly, so every static plan fitted on one
  domain, load-agnostic ones (contiguous, round_robin) included, lands far above 1.10 on the other (table
  below); robust variants of `affinity` (uniform prior blend, in-order window scenarios, no co-location
  exploring) did not close that gap either. The cross-domain target is for re-placement online.
- Replicas split tokens by `placement.replica.choose_replica` in every row: least-loaded quotas per batch,
  same-rank-first inside them.
- Batches: B tokens dealt in a seeded random order (a decode batch mixes many requests). Imbalance (max/mean
  rank load per layer) is averaged over (batch, layer); `trace` is the same on whole-trace loads (no
  sampling noise). Fan-out = distinct ranks a token's top-k experts live on.
"""

ORDER = ["contiguous", "round_robin", "eplb", "eplb+online", "affinity", "affinity+online"]


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _f(x, nd=3):
    return "" if x is None else f"{x:.{nd}f}"


def _layers_summed(rows) -> str:
    """The MoE layers the rows scored (their 'layers'); results written before rows kept it: the full suite's 26."""
    counts = sorted({r.get("layers", 26) for r in rows})
    return f"{counts[0]} MoE layers" if len(counts) == 1 else f"{'/'.join(map(str, counts))} MoE layers"


def _sweep_layers(rows) -> str:
    """Which layers the sweep ran ('every 3rd layer' in results written before rows kept layer_ids)."""
    ids = rows[0].get("layer_ids") if rows else None
    return "every 3rd layer" if ids is None else f"{len(ids)} MoE layers: {', '.join(map(str, ids))}"


def _real_tables(rows):
    lines = []
    scen = sorted({(r["fit"], r["eval"]) for r in rows}, key=lambda fe: (fe[0] != fe[1], fe))
    b0 = min(r["batch_size"] for r in rows)
    by = {(r["fit"], r["eval"], r["algorithm"], r["batch_size"]): r for r in rows}
    body, checks = [], []
    for f, e in scen:
        eplb = by.get((f, e, "eplb", b0))
        for a in ORDER:
            r = by.get((f, e, a, b0))
            if r is None:
                continue
            r512 = by.get((f, e, a, 512))
            d = 100 * (r["fanout_mean"] / eplb["fanout_mean"] - 1) if eplb else float("nan")
            moved = r.get("experts_moved_total")
            body.append([f"{f} -> {e}", a, _f(r["imbalance_mean"]), _f(r["imbalance_p99"]),
                         _f(r512["imbalance_mean"]) if r512 else "", _f(r["imbalance_trace"]),
                         _f(r["fanout_mean"]), f"{d:+.1f}%", _f(r["rank_changes_mean"], 2),
                         f"{r['dispatch_bytes_per_token'] / 1024:.0f}", _f(r.get("solver_cpu_seconds"), 1),
                         "" if moved is None else f"{moved} ({r['experts_moved_per_layer_step_mean']:.1f})"])
        cross = f != e
        tgt_imb, tgt_fan = (1.10, 0.85) if cross else (1.03, 0.80)
        for a in ("affinity", "affinity+online", "eplb+online"):
            r = by.get((f, e, a, b0))
            if r and eplb:
                ratio = r["fanout_mean"] / eplb["fanout_mean"]
                checks.append([f"{f} -> {e}", a, f"<= {tgt_imb:.2f}", _f(r["imbalance_mean"]),
                               _f(by[(f, e, a, 512)]["imbalance_mean"]) if (f, e, a, 512) in by else "",
                               _f(r["imbalance_trace"]), _f(eplb["imbalance_trace"]), f"<= {tgt_fan:.2f}",
                               _f(ratio), _f(r["fanout_mean"]), _f(eplb["fanout_mean"])])
    lines.append(f"Imbalance = max/mean rank load per layer; per-batch over batches of B={b0} tokens (seeded random "
                 "order) unless marked B=512; `trace` = whole-trace loads. Fan-out = distinct ranks per token and "
                 f"layer. Dispatch KB = fan-out x 2048 x 2 B summed over {_layers_summed(rows)}. CPU s = solver CPU time. "
                 "Moved = experts rewritten in all (mean per layer per step).\n")
    lines.append(_table(["fit -> eval", "algorithm", f"imb B={b0}", "p99", "imb B=512", "imb trace", "fan-out",
                         "vs EPLB", "rank chg", "dispatch KB", "CPU s", "moved"], body))
    lines.append("\n### Targets (EP=8, 1 redundant slot per rank)\n")
    lines.append(_table(["fit -> eval", "ours", "imb target", f"imb B={b0}", "imb B=512", "imb trace",
                         "EPLB imb trace", "fan-out / EPLB target", "fan-out / EPLB", "fan-out", "EPLB fan-out"],
                        checks))
    return "\n".join(lines)


def _plot_real(rows, path):
    b0 = min(r["batch_size"] for r in rows)
    rows = [r for r in rows if r["batch_size"] == b0]
    scen = sorted({(r["fit"], r["eval"]) for r in rows}, key=lambda fe: (fe[0] != fe[1], fe))
    algos = [a for a in ORDER if any(r["algorithm"] == a for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(algos)
    for ax, key, title, ylim in ((axes[0], "imbalance_mean", f"imbalance (max/mean, batches of {b0})", None),
                                 (axes[1], "fanout_mean", "fan-out (ranks per token per layer)", None)):
        for i, a in enumerate(algos):
            vals = [next((r[key] for r in rows if r["algorithm"] == a and (r["fit"], r["eval"]) == s), np.nan)
                    for s in scen]
            ax.bar(np.arange(len(scen)) + i * width, vals, width, label=a, color=COLORS.get(a))
        ax.set_xticks(np.arange(len(scen)) + 0.4 - width / 2)
        ax.set_xticklabels([f"fit {f}\nscore {e}" for f, e in scen])
        ax.set_title(title + " - lower is better")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(1.0, None)
    axes[1].set_ylim(1.0, None)
    axes[0].axhline(1.10, ls="--", c="k", lw=0.8)
    axes[0].text(len(scen) - 0.5, 1.105, "cross-domain target 1.10", fontsize=8, ha="right")
    axes[0].legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle("DeepSeek-V2-Lite traces, EP=8, 1 redundant slot per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_online(rows, path):
    cross = [r for r in rows if r["fit"] != r["eval"] and "imbalance_series" in r and r["batch_size"] == 256]
    scen = sorted({(r["fit"], r["eval"]) for r in cross})
    fig, axes = plt.subplots(1, len(scen), figsize=(6.5 * len(scen), 3.8), squeeze=False)
    for ax, (f, e) in zip(axes[0], scen):
        for a in ("eplb", "affinity", "eplb+online", "affinity+online"):
            r = next((r for r in cross if r["algorithm"] == a and (r["fit"], r["eval"]) == (f, e)), None)
            if r:
                ax.plot(r["imbalance_series"], label=a, color=COLORS[a], lw=2 if "online" in a else 1.2)
        ax.axhline(1.10, ls="--", c="k", lw=0.8)
        ax.set_title(f"fit {f}, stream {e}: per-batch imbalance (mean over layers)")
        ax.set_xlabel("batch of 256 tokens, in stream order")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(rows, path):
    cross = [r for r in rows if r["eval"] != r["fit"]]
    reds = sorted({r["redundant_per_rank"] for r in cross})
    fig, axes = plt.subplots(2, len(reds), figsize=(4.6 * len(reds), 6.5), squeeze=False, sharey="row")
    for j, red in enumerate(reds):
        for a in [a for a in ORDER if any(r["algorithm"] == a for r in cross)]:
            pts = sorted((r["ep"], r["imbalance_mean"], r["fanout_mean"]) for r in cross
                         if r["algorithm"] == a and r["redundant_per_rank"] == red)
            if pts:
                ep, imb, fan = zip(*pts)
                axes[0, j].plot(ep, imb, "o-", label=a, color=COLORS.get(a))
                axes[1, j].plot(ep, fan, "o-", label=a, color=COLORS.get(a))
        axes[0, j].set_title(f"{red} redundant slot(s) per rank")
        axes[1, j].set_xlabel("EP ranks")
        for i in range(2):
            axes[i, j].set_xscale("log", base=2)
            axes[i, j].set_xticks([2, 4, 8, 16], ["2", "4", "8", "16"])
            axes[i, j].grid(alpha=0.3)
    axes[0, 0].set_ylabel("imbalance (cross-domain)")
    axes[1, 0].set_ylabel("fan-out (cross-domain)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Sweep: fitted on intent, scored on summary ({_sweep_layers(rows)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_synth(rows, path):
    wl = list(dict.fromkeys(r["workload"] for r in rows))
    algos = [a for a in ORDER if any(r["algorithm"] == a for r in rows)]
    fig, axes = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True)
    width = 0.8 / len(algos)
    for ax, key, lab in ((axes[0], "imbalance_mean", "imbalance (B=256)"), (axes[1], "fanout_mean", "fan-out")):
        for i, a in enumerate(algos):
            vals = [next((r[key] for r in rows if r["workload"] == w and r["algorithm"] == a), np.nan) for w in wl]
            ax.bar(np.arange(len(wl)) + i * width, vals, width, label=a, color=COLORS.get(a))
        ax.set_ylabel(lab + " - lower is better")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(1.0, None)
    axes[1].set_ylim(1.0, None)
    axes[1].set_xticks(np.arange(len(wl)) + 0.4 - width / 2)
    axes[1].set_xticklabels(wl)
    axes[0].legend(fontsize=8, ncol=len(algos))
    fig.suptitle("Synthetic workloads (64 experts, top-6, EP=8, 1 redundant slot per rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path) -> str:
    s = results["sections"]
    parts = [f"# Load-imbalance suite\n\nMachine: {results['machine']}. Suite time: "
             f"{results['suite_seconds']:.0f} s{' (smoke configuration)' if results['smoke'] else ''}. "
             "Regenerate: `python benches/imbalance/run.py --out benches/results/imbalance`.\n", ABOUT]
    if "real" in s:
        parts += ["## DeepSeek-V2-Lite traces, EP=8, 1 redundant slot per rank\n", _real_tables(s["real"]),
                  "\n![real](real.png)\n\n![online](online.png)\n"]
        _plot_real(s["real"], out / "real.png")
        _plot_online(s["real"], out / "online.png")
    if "sweep" in s:
        rows = sorted(s["sweep"], key=lambda r: (r["eval"] == r["fit"], r["ep"], r["redundant_per_rank"]))
        body = [[f"{r['fit']} -> {r['eval']}", r["ep"], r["redundant_per_rank"], r["algorithm"],
                 _f(r["imbalance_mean"]), _f(r["imbalance_trace"]), _f(r["fanout_mean"]),
                 _f(r["solver_cpu_seconds"], 1)] for r in rows]
        parts += [f"## Sweep over EP size and redundant slots ({_sweep_layers(rows)})\n",
                  _table(["fit -> eval", "EP", "red/rank", "algorithm", "imb B=256", "imb trace", "fan-out",
                          "CPU s"], body), "\n![sweep](sweep.png)\n"]
        _plot_sweep(s["sweep"], out / "sweep.png")
    if "synth" in s:
        body = [[r["workload"], r["algorithm"], _f(r["imbalance_mean"]), _f(r["imbalance_p99"]),
                 _f(r["imbalance_trace"]), _f(r["fanout_mean"]),
                 r.get("experts_moved_total", "")] for r in s["synth"]]
        parts += ["## Synthetic workloads (EP=8, 1 redundant slot per rank, B=256)\n",
                  _table(["workload", "algorithm", "imb", "p99", "imb trace", "fan-out", "moved"], body),
                  "\n![synth](synth.png)\n"]
        _plot_synth(s["synth"], out / "synth.png")
    if "stats" in s:
        body = [[r["model"], r["ep"], r["redundant_per_rank"], r["algorithm"], _f(r["imbalance_in_domain"]),
                 _f(r["imbalance_cross_mean"]), _f(r["imbalance_cross_max"])] for r in s["stats"]]
        parts += ["## OLMoE / Mixtral per-domain loads (fit on one domain, score on each other; load only)\n",
                  _table(["model", "EP", "red/rank", "algorithm", "imb in-domain", "imb cross mean",
                          "imb cross max"], body)]
    text = "\n".join(parts) + "\n"
    (out / "report.md").write_text(text)
    return text
