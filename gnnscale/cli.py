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
                            balance_tol=None if args.balance_tol < 0 else args.balance_tol,
                            force=args.force, progress=None if not args.no_progress else False)
    log.info("loading %s", args.spec)
    meta = partition_spec(args.spec, args.out, opts, add_self_loops=args.add_self_loops)
    peak = psutil.Process().memory_info().rss
    t = meta["timings"]
    print(format_table(meta))
    print(f"wrote {args.out} in {t['load_s'] + t['total_s']:.1f} s (load {t['load_s']:.1f} s, "
          f"assign {t['assign_s']:.1f} s, cover {t['cover_s']:.1f} s); resident memory "
          f"{peak / 2**30:.2f} GiB")
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


def _cmd_plan(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .errors import UsageError
    from .launch.cluster import parse_rate
    from .partition import read_meta
    from .plan import LinkModel, make_plan, trace_model
    from .plan.architectures import build
    from .plan.planner import allowed_signatures, load_traffic

    meta = read_meta(args.parts)
    k = int(meta["num_parts"])
    feat = meta.get("node_fields", {}).get("feat")
    if not feat or len(feat["shape"]) != 1:
        raise UsageError(f"{args.parts}: the partition has no 1-D 'feat' node field to size the "
                         "model's input; partition a graph with features")
    rate = parse_rate(args.link_rate)
    if rate is None:
        raise UsageError(f"--link-rate {args.link_rate!r}: the planner needs a rate such as "
                         "1gbit")
    allowed_signatures(args.mode)
    servers = args.servers
    procs = args.procs if args.procs is not None else max(1, k // max(1, servers))
    if servers < 1 or procs < 1 or servers * procs != k:
        raise UsageError(f"--servers {servers} x --procs {procs} = {servers * procs} ranks, but "
                         f"{args.parts} has {k} parts; give servers x procs = {k}")
    dtype = torch.from_numpy(np.zeros(0, dtype=feat["dtype"])).dtype
    model = build(args.model, int(feat["shape"][0]), args.hidden,
                  max(1, int(meta.get("num_classes", 0))), args.layers, args.input_dropout)
    aggregations = trace_model(model.to(dtype), int(feat["shape"][0]), dtype)
    log.info("reading the cut edges of %s and covering them", args.parts)
    traffic = load_traffic(args.parts, servers, procs)
    plan = make_plan(aggregations, traffic, LinkModel.from_rate(rate),
                     list(model.parameters()), mode=args.mode)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import dgl
    import torch

    from . import __version__
    from .comm import executor_name
    from .parallel.devices import default_backend, dgl_cuda_available

    print(f"gnnscale {__version__}, torch {torch.__version__}, dgl {dgl.__version__}")
    print(f"distributed backends: gloo={torch.distributed.is_gloo_available()} "
          f"nccl={torch.distributed.is_nccl_available()} cuda={torch.cuda.is_available()}")
    print(f"init() picks: {default_backend()} (DGL can run on CUDA here: "
          f"{'yes' if dgl_cuda_available() else 'no'})")
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
    part.add_argument("--balance-tol", type=float, default=0.005, metavar="FRACTION",
                      help="after METIS, move boundary nodes until every part's load (nodes and "
                           "in-edges) is within FRACTION of the mean; METIS alone allows 3 %% "
                           "(default: 0.005; negative: keep METIS's parts)")
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

    plan = sub.add_parser(
        "plan", help="price every way to exchange a model's aggregations on a partition",
        description="For a model on a partition folder: every aggregation of one training "
                    "iteration, every exact exchange signature (pull = today's halo exchange, "
                    "push = partial sums to the owner, cover = per edge the cheaper end "
                    "(minimum vertex cover), broadcast-once = static inputs fetched once; each "
                    "flat or routed through the servers), its bytes per iteration and predicted "
                    "time under an alpha-beta model, why a signature is ruled out, and the "
                    "choice; then gradient buckets and per-iteration totals per mode.")
    plan.add_argument("parts", metavar="PARTS", help="partition folder")
    plan.add_argument("--model", choices=["gcn", "sage", "gin"], default="gcn",
                      help="GraphConv, SAGEConv(mean) or GINConv(sum) layers (default: gcn)")
    plan.add_argument("--hidden", type=int, default=64, metavar="H",
                      help="hidden width (default: 64)")
    plan.add_argument("--layers", type=int, default=2, metavar="L",
                      help="message-passing layers (default: 2)")
    plan.add_argument("--input-dropout", type=float, default=0.0, metavar="P",
                      help="dropout on the input features (default: 0; > 0 makes the first "
                           "layer's input change every iteration)")
    plan.add_argument("--servers", type=int, default=1, metavar="S",
                      help="servers the ranks run on (default: 1)")
    plan.add_argument("--procs", type=int, metavar="G",
                      help="processes per server (default: parts / servers)")
    plan.add_argument("--link-rate", default="1gbit", metavar="RATE",
                      help="bandwidth of each server's link (tc units as for gnnscale launch: "
                           "100mbit, 1gbit, 10gbit; default 1gbit)")
    plan.add_argument("--mode", default="auto", metavar="MODE",
                      help="what may be chosen: auto (default), pull, push or cover, optionally "
                           "+once to allow broadcast-once (e.g. cover+once)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.set_defaults(func=_cmd_plan)

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
