"""The quality report of a partition folder: per-part table, totals, JSON and a PNG figure."""

from __future__ import annotations

from typing import Any

__all__ = ["part_stats", "summary", "format_table", "plot_report"]


def part_stats(meta: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r, p in enumerate(meta["parts"]):
        owned = int(p["num_owned"])
        rows.append({"part": r, "owned": owned, "edges": int(p["num_edges"]),
                     "halo": int(p["num_halo"]),
                     "halo_ratio": round(p["num_halo"] / owned, 4) if owned else 0.0,
                     "train": int(p["num_train"]),
                     "remote_edges": int(p.get("num_remote_edges", 0))})
    return rows


def _imbalance(values: list[int]) -> float:
    mean = sum(values) / len(values)
    return round(max(values) / mean, 4) if mean else 1.0


def summary(rows: list[dict[str, Any]], num_nodes: int) -> dict[str, Any]:
    """Totals: edge cut (directed edges whose endpoints live in different parts), replication
    factor (stored node copies per node) and balance (max/mean) of nodes, edges, train nodes."""
    return {
        "edge_cut": sum(r["remote_edges"] for r in rows),
        "replication_factor": round(sum(r["owned"] + r["halo"] for r in rows) / num_nodes, 4),
        "largest_halo": max(r["halo"] for r in rows),
        "node_balance": _imbalance([r["owned"] for r in rows]),
        "edge_balance": _imbalance([r["edges"] for r in rows]),
        "train_balance": _imbalance([r["train"] for r in rows]),
    }


def format_table(meta: dict[str, Any]) -> str:
    rows = part_stats(meta)
    head = f"{'part':>4} {'owned':>10} {'edges':>12} {'halo':>10} {'halo/owned':>10} {'train':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['part']:>4} {r['owned']:>10,} {r['edges']:>12,} {r['halo']:>10,} "
                     f"{r['halo_ratio']:>10.3f} {r['train']:>8,}")
    s = meta["stats"]
    e = max(int(meta["num_edges"]), 1)
    lines += [
        "-" * len(head),
        f"{'all':>4} {meta['num_nodes']:>10,} {meta['num_edges']:>12,}",
        f"edge cut {s['edge_cut']:,} ({100 * s['edge_cut'] / e:.2f}% of edges), replication "
        f"factor {s['replication_factor']:.3f}, largest halo {s['largest_halo']:,}",
        f"balance (max/mean): nodes {s['node_balance']:.3f}, edges {s['edge_balance']:.3f}, "
        f"train {s['train_balance']:.3f}   [{meta['method']}, objective {meta['objective']}]",
    ]
    c = meta.get("cover")
    if c and c["pull_rows"]:
        cover = c["cover_pull_rows"] + c["cover_push_rows"]
        lines.append(f"rows per exchange: pull {c['pull_rows']:,}, push {c['push_rows']:,}, "
                     f"cover {cover:,} ({c['cover_pull_rows']:,} pulled + "
                     f"{c['cover_push_rows']:,} pushed; cover/pull {cover / c['pull_rows']:.3f})")
    return "\n".join(lines)


def plot_report(meta: dict[str, Any], path: str) -> None:
    """Bar charts of owned/halo nodes, local edges and training nodes per part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = part_stats(meta)
    parts = [r["part"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(parts, [r["owned"] for r in rows], label="owned")
    axes[0].bar(parts, [r["halo"] for r in rows], bottom=[r["owned"] for r in rows],
                label="halo", color="tab:orange")
    axes[0].set_title("nodes per part")
    axes[0].legend()
    axes[1].bar(parts, [r["edges"] - r["remote_edges"] for r in rows], label="internal")
    axes[1].bar(parts, [r["remote_edges"] for r in rows],
                bottom=[r["edges"] - r["remote_edges"] for r in rows], label="from halo",
                color="tab:red")
    axes[1].set_title("in-edges per part")
    axes[1].legend()
    axes[2].bar(parts, [r["train"] for r in rows], color="tab:green")
    axes[2].set_title("training nodes per part")
    s = meta["stats"]
    fig.suptitle(f"{meta['num_parts']} parts, {meta['method']}: edge cut {s['edge_cut']:,}, "
                 f"replication {s['replication_factor']:.2f}")
    for ax in axes:
        ax.set_xlabel("part")
        ax.set_xticks(parts)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
