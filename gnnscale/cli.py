"""The ``gnnscale`` command (also ``python -m gnnscale``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import GnnscaleError

__all__ = ["main", "build_parser"]

log = logging.getLogger("gnnscale")


def _cmd_partition(args: argparse.Namespace) -> int:
    import psutil

    from .partition import PartitionOptions, format_table, partition_spec

    opts = PartitionOptions(parts=args.parts, method=args.method, objective=args.objective,
                            balance_train=not args.no_balance_train,
                            balance_edges=not args.no_balance_edges, seed=args.seed,
                            force=args.force, progress=None if not args.no_progress else False)
    log.info("loading %s", args.spec)
    meta = partition_spec(args.spec, args.out, opts, add_self_loops=args.add_self_loops)
    peak = psutil.Process().memory_info().rss
    t = meta["timings"]
    print(format_table(meta))
    print(f"wrote {args.out} in {t['load_s'] + t['total_s']:.1f} s (load {t['load_s']:.1f} s, "
          f"assign {t['assign_s']:.1f} s); resident memory {peak / 2**30:.2f} GiB")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .partition import format_table, part_stats, plot_report, read_meta

    meta = read_meta(args.dir)
    if args.json:
        print(json.dumps({"num_parts": meta["num_parts"], "num_nodes": meta["num_nodes"],
                          "num_edges": meta["num_edges"], "method": meta["method"],
                          "objective": meta["objective"], "parts": part_stats(meta),
                          "totals": meta["stats"]}, indent=1))
    else:
        print(format_table(meta))
    if args.plot:
        if not args.plot.lower().endswith(".png"):
            raise GnnscaleError(f"--plot {args.plot}: give a .png file name")
        plot_report(meta, args.plot)
        log.info("wrote %s", args.plot)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import dgl
    import torch

    from . import __version__
    from .comm import executor_name

    print(f"gnnscale {__version__}, torch {torch.__version__}, dgl {dgl.__version__}")
    print(f"distributed backends: gloo={torch.distributed.is_gloo_available()} "
          f"nccl={torch.distributed.is_nccl_available()} cuda={torch.cuda.is_available()}")
    print(f"2D allreduce executor: {executor_name()}")
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from .launch import launch

    return launch(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gnnscale",
        description="Partition large graphs and train unchanged DGL models on them across "
                    "servers, exactly as on one machine.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    part = sub.add_parser(
        "partition", help="split a graph into per-server parts with halo information",
        description="Split a graph into K parts. Part r owns a set of nodes and stores every "
                    "in-edge of them, the halo (their remote sources), global degrees and the "
                    "owned nodes' data. SPEC: planetoid:DIR/NAME, FILE.dgl, FILE.npz, "
                    "FILE.csv|tsv or synthetic:NAME?key=value&... (presets: tiny, demo, sbm, "
                    "2m, 5m, 50m).")
    part.add_argument("spec", metavar="SPEC", help="the graph to partition")
    part.add_argument("--parts", "-k", type=int, required=True, help="number of parts (K >= 1)")
    part.add_argument("--out", "-o", required=True, help="output partition folder")
    part.add_argument("--method", choices=["metis", "random"], default="metis",
                      help="assignment method (default: metis)")
    part.add_argument("--objective", choices=["cut", "vol"], default="cut",
                      help="METIS objective: edge cut or communication volume (default: cut)")
    part.add_argument("--no-balance-train", action="store_true",
                      help="do not balance training nodes across parts")
    part.add_argument("--no-balance-edges", action="store_true",
                      help="do not balance edges across parts")
    part.add_argument("--add-self-loops", action="store_true",
                      help="give every node exactly one self-loop first (as GCN scripts do with "
                           "dgl.add_self_loop(dgl.remove_self_loop(g)))")
    part.add_argument("--seed", type=int, default=0, help="seed of the random method")
    part.add_argument("--force", action="store_true",
                      help="replace an existing partition folder")
    part.add_argument("--no-progress", action="store_true", help="hide progress bars")
    part.set_defaults(func=_cmd_partition)

    ins = sub.add_parser("inspect", help="print the quality report of a partition folder",
                         description="Per-part table (owned nodes, local edges, halo nodes, "
                                     "halo/owned ratio, training nodes) and totals (edge cut, "
                                     "replication factor, balance).")
    ins.add_argument("dir", metavar="DIR", help="partition folder")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.add_argument("--plot", metavar="FILE.png", help="also draw the report into a PNG")
    ins.set_defaults(func=_cmd_inspect)

    info = sub.add_parser("info", help="versions and available backends",
                          description="Print gnnscale, torch and DGL versions and which "
                                      "communication backends are available.")
    info.set_defaults(func=_cmd_info)

    from .launch import add_arguments as add_launch_arguments

    launch = sub.add_parser(
        "launch", help="start a job: one torchrun agent per host, all stopped if one fails",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start CMD on every rank: one torchrun agent per host, G worker processes "
                    "each,\nc10d rendezvous on the first host.\n\n"
                    "where:    --hosts/--hostfile: over ssh (hosts share this machine's paths: "
                    "python, gnnscale,\n"
                    "          working directory); --simulate-servers S: S network namespaces "
                    "here, joined by\n"
                    "          tbf-shaped links (root and iproute2); otherwise this machine.\n"
                    "output:   lines are prefixed [HOST rank R] (agent lines [HOST]); per-host "
                    "states (starting,\n"
                    "          rendezvous, running, restarting, exited) go to stderr.\n"
                    "failure:  when any process dies, or on Ctrl-C, every agent on every host "
                    "is stopped, no\n"
                    "          worker is left behind, and the launcher exits non-zero naming "
                    "host, rank and\n"
                    "          signal or exit code (1: the job failed, 2: bad input, "
                    "130: interrupted).\n"
                    "restart:  with --max-restarts R failed workers are restarted; a script "
                    "using\n"
                    "          gnnscale.Checkpointer resumes from its last checkpoint.",
        epilog="examples:\n"
               "  gnnscale launch -G 2 -- examples/train_dist.py --parts parts\n"
               "  gnnscale launch --hosts node1,node2 -G 4 -- examples/train_dist.py --parts parts\n"
               "  gnnscale launch --simulate-servers 2 -G 2 --link-rate 1gbit -- \\\n"
               "      examples/train_dist.py --parts parts --dropout 0\n"
               "  gnnscale launch --hosts node1,node2 -G 4 --dry-run -- train.py   # print commands")
    add_launch_arguments(launch)
    launch.set_defaults(func=_cmd_launch)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="gnnscale: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except GnnscaleError as e:
        print(f"gnnscale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gnnscale: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except MemoryError:
        print("gnnscale: error: out of memory; try a machine with more memory", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permission denied, ...: the scratch folder is already gone
        print(f"gnnscale: error: {e.strerror or e} ({e.filename or 'I/O'}); nothing was left "
              "half-written", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
