"""`wrap`: make an unchanged DGL model distributed over graph partitions, in place.

The model is called exactly as on one machine, ``model(part.graph, part.ndata["feat"])``, and
returns rows for the owned nodes. Hooks on each outermost DGL message-passing module (the model
class is not edited):

- before it runs: node-feature inputs with ``num_owned`` rows get ``num_halo`` placeholder rows
  (the halo rows are filled from their owners by :class:`HaloGraph` before each aggregation);
- after it runs: its output is cut back to the owned rows;
- on the model's output: the backward pass weights the gradient of every output tensor by
  ``K * n_r / sum(n)`` (K ranks, ``n_r`` = ``num_samples`` of this rank), and
  :func:`sync_gradients` *averages* over the ranks (DDP's convention). The average of the weighted
  gradients is the gradient of the single-machine mean loss, and a loss term that every rank adds
  identically (``lambda * sum ||W||^2``, a penalty on parameters) is averaged back to itself
  instead of being counted K times. The weight must act *before* halo gradients cross ranks,
  which is why it sits in the backward pass rather than in ``sync_gradients``.

At construction every rank takes rank 0's parameters and buffers (a broadcast, as DDP does), so
a script that seeds per rank, or not at all, still trains one model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from dgl.nn import GATConv, GINConv, GraphConv, SAGEConv

from ..errors import UsageError
from ..partition.format import Partition
from .collectives import broadcast_parameters, global_sum, sample_share, sync_parameters_grads
from .devices import check_inputs_device, check_model_device
from .dropout import DropoutState, install_global_dropout
from .gradsync import GradSync
from .graph import HaloBlock, HaloGraph, mark_fresh
from .halo import ExchangePlan, build_plan, halo_refresh
from .halo_hier import HierHaloPlan, build_hier_plan
from .serving import Exchanges
from .topology import current

__all__ = ["wrap", "sync", "sync_gradients", "set_num_samples", "plan_of", "WrapState", "halo_summary",
           "exchanged_mib", "dropout_state", "node_rows", "grad_scale"]

log = logging.getLogger(__name__)
_LAST_PLAN: ExchangePlan | None = None


# DGL modules that take a block (sources = owned + halo, destinations = owned) and are tested
# exact on one (tests/test_equivalence.py); other modules (APPNPConv, SGConv, ...) aggregate
# several times per call over all nodes and get the part's homogeneous HaloGraph instead.
BLOCK_MODULES: tuple[type[torch.nn.Module], ...] = (GraphConv, SAGEConv, GATConv, GINConv)


@dataclass
class WrapState:
    part: Partition
    graph: HaloGraph
    plan: ExchangePlan
    num_samples: int | None
    block: HaloBlock | None = None
    grads: GradSync | None = None
    exchanges: Exchanges | None = None
    planner: Any = None  # gnnscale.plan.observe.RuntimePlanner
    loss_weight: float = 1.0
    depth: int = 0
    hooks: list[Any] = field(default_factory=list)
    dropout: DropoutState | None = None  # global dropout's seed and call counters


def _is_message_passing(m: torch.nn.Module) -> bool:
    return type(m).__module__.startswith("dgl.nn")


def _outermost(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """DGL message-passing modules not nested inside another one."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, m in model.named_modules():
        if _is_message_passing(m) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name or type(m).__name__, m))
    return found


def as_halo_graph(part: Partition) -> HaloGraph:
    if isinstance(part.graph, HaloGraph):
        return part.graph
    part.graph = HaloGraph.from_graph(part.graph, part.num_owned, part.in_degrees,
                                      part.out_degrees)
    return part.graph


def _count_samples(part: Partition, num_samples: int | str | None) -> int | None:
    if num_samples == "train":
        mask = part.ndata.get("train_mask")
        if mask is None:
            raise UsageError(
                "wrap(..., num_samples='train') needs part.ndata['train_mask'], which this "
                f"partition lacks (node data: {sorted(part.ndata) or 'none'}); pass the number of "
                "samples this rank's mean loss is over (num_samples=N), or None when the loss is "
                "already a sum over all ranks' samples")
        return int(mask.sum())
    if num_samples is None or (isinstance(num_samples, int) and not isinstance(num_samples, bool)
                               and num_samples >= 0):
        return num_samples
    raise UsageError(f"num_samples must be 'train', a count >= 0 or None, got {num_samples!r}")


def _set_weight(state: WrapState, n: int | None) -> None:
    """Collective: the output-gradient weight ``K * n / sum(n)`` (``K`` with ``n`` None: the
    loss is a global sum, and sync_gradients' average must not shrink it)."""
    state.num_samples = n
    world = current().world_size
    state.loss_weight = float(world) if n is None else world * sample_share(n)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: float) -> torch.Tensor:
        ctx.w = w
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g * ctx.w, None


def _weigh_outputs(out: Any, w: float) -> Any:
    """``out`` with the backward weight ``w`` on every tensor that needs a gradient, inside
    tuples, lists and dicts too (a loss may use any of them)."""
    if isinstance(out, torch.Tensor):
        return _ScaleGrad.apply(out, w) if out.requires_grad else out
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a NamedTuple
        return type(out)(*(_weigh_outputs(o, w) for o in out))
    if isinstance(out, tuple | list):
        return type(out)(_weigh_outputs(o, w) for o in out)
    if isinstance(out, dict):
        return type(out)({k: _weigh_outputs(v, w) for k, v in out.items()})
    return out


def _pad(x: Any, state: WrapState, where: str) -> Any:
    if isinstance(x, tuple):
        return tuple(_pad(t, state, where) for t in x)
    if not isinstance(x, torch.Tensor):
        return x
    n_own, n_loc = state.plan.num_owned, state.plan.num_local
    if x.shape[0] == n_loc:
        return x
    base = x._base
    if (base is not None and base.shape[0] == n_loc and base.shape[1:] == x.shape[1:]
            and x.data_ptr() == base.data_ptr() and base.is_contiguous()
            and not x.requires_grad and x.shape[0] == n_own):
        # part.ndata's features live in a buffer that already has (zero) halo rows.
        return base
    if x.shape[0] != n_own:
        raise _rows_error(x, state, where)
    return torch.cat([x, x.new_zeros((n_loc - n_own, *x.shape[1:]))])


def _owned_rows(x: Any, state: WrapState, where: str) -> Any:
    """Node features for a :class:`HaloBlock`: the owned rows (all local rows are cut)."""
    if isinstance(x, tuple):
        return tuple(_owned_rows(t, state, where) for t in x)
    if not isinstance(x, torch.Tensor):
        return x
    n_own, n_loc = state.plan.num_owned, state.plan.num_local
    if x.shape[0] == n_own:
        return x
    if x.shape[0] == n_loc:
        return x[:n_own]
    raise _rows_error(x, state, where)


def _rows_error(x: torch.Tensor, state: WrapState, where: str) -> UsageError:
    return UsageError(f"{where}: node features have {x.shape[0]} rows but this rank owns "
                      f"{state.plan.num_owned} nodes (and holds {state.plan.num_local} with the "
                      "halo); pass part.ndata[...] rows of the owned nodes")


def _cut(out: Any, state: WrapState) -> Any:
    if isinstance(out, torch.Tensor) and out.shape[0] == state.plan.num_local:
        return out[: state.plan.num_owned]
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (_cut(out[0], state), *out[1:])
    return out


def _install(model: torch.nn.Module, state: WrapState,
             modules: list[tuple[str, torch.nn.Module]]) -> None:
    for name, mod in modules:
        def pre(m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                name: str = name) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            state.depth += 1
            graph = args[0] if args else kwargs.get("graph")
            if state.depth > 1 or graph is not state.graph:
                return None
            state.plan.begin(name)
            # A block-capable module gets the part as a block whose source fields are owned
            # rows: no padding, no work on halo rows, its output already the owned rows (the
            # forward hook below then sees the block, not state.graph, and cuts nothing).
            block = state.block if isinstance(m, BLOCK_MODULES) else None
            fix = _owned_rows if block is not None else _pad
            if args:
                args = (block or args[0], *args[1:])
            else:
                kwargs = {**kwargs, "graph": block or kwargs["graph"]}
            if len(args) > 1:
                args = (args[0], fix(args[1], state, name), *args[2:])
            elif "feat" in kwargs:
                kwargs = {**kwargs, "feat": fix(kwargs["feat"], state, name)}
            return args, kwargs

        def post(m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 out: Any) -> Any:
            state.depth -= 1
            graph = args[0] if args else kwargs.get("graph")
            if state.depth > 0 or graph is not state.graph:
                return None
            return _cut(out, state)

        state.hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        state.hooks.append(mod.register_forward_hook(post, with_kwargs=True, always_call=True))

    def start(m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        check_inputs_device(args)
        if state.exchanges is not None:
            state.exchanges.begin_pass()
        if m.training and torch.is_grad_enabled():
            state.plan.stats.new_iteration()

    state.hooks.append(model.register_forward_pre_hook(start))

    def weigh(m: torch.nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if state.loss_weight == 1.0 or not torch.is_grad_enabled():
            return None
        return _weigh_outputs(out, state.loss_weight)

    state.hooks.append(model.register_forward_hook(weigh))


def wrap(model: torch.nn.Module, part: Partition, num_samples: int | str | None = "train",
         custom: bool = False, global_dropout: bool = True,
         hierarchical: bool | None = None, overlap: bool = True, plan: str = "auto",
         links: Any = None) -> torch.nn.Module:
    """Make ``model`` train on ``part`` exactly as on the whole graph; returns ``model``.

    Args:
        model: an unchanged DGL model; called as before with ``(part.graph, features)``.
        part: this rank's partition (:func:`gnnscale.load_partition`).
        num_samples: how many samples this rank's loss is averaged over: ``"train"`` (default:
            the owned training nodes, ``part.ndata["train_mask"].sum()``; a partition without a
            train mask raises), an int, or None when the loss is already this rank's part of a
            sum over all ranks' samples. Must match the count the script's loss uses.
        custom: allow a model without DGL message-passing modules (it then calls
            :func:`sync` itself before aggregating).
        global_dropout: make every ``nn.Dropout`` of the model draw its mask from global node
            / edge ids (seeded from torch's RNG, identical on all ranks), so that training
            with dropout is also exactly the same on any number of ranks.
        hierarchical: route the halo exchange through the servers (:mod:`.halo_hier`: a row
            crosses to a remote server once, however many of its processes need it). Default:
            when the job spans several servers with several processes each.
        overlap: aggregate over the edges from owned sources while the halo rows travel (in
            backward, while their gradients travel back), and sum gradient buckets while
            backward still runs. False waits for every exchange where it is needed (for
            comparison); results are the same either way (up to the order of float additions).
        plan: how each aggregation's rows are exchanged (:mod:`gnnscale.plan`): ``"auto"``
            (default) takes, per aggregation, the signature with the least predicted time
            among pull, push, cover and broadcast-once; ``"pull"``, ``"push"`` or ``"cover"``
            force that signature where it is valid (pull elsewhere), optionally with
            ``"+once"`` (fields that do not change are then sent once). Chosen during the first
            forward pass, as each aggregation starts; :func:`plan_of` shows the table.
            With probed links, ``"auto"`` tries each push or cover pick against pull on that
            aggregation and keeps the faster (:mod:`gnnscale.plan.trial`).
        links: the alpha-beta model the planner costs with (a ``gnnscale.plan.LinkModel``);
            default: probed once per job in ``"auto"`` mode (a few all-to-alls), typical values
            otherwise. Given links mean no trials: the model alone decides.

    Raises:
        UsageError: before :func:`gnnscale.init`, for a partition that does not match the
            launch, a model without message-passing modules (unless ``custom``), or a model on
            a device DGL cannot run on (CUDA with a CPU-only DGL) or off CUDA on NCCL; the
            forward pass raises it for such input tensors.
    """
    global _LAST_PLAN
    topo = current()
    if part.num_parts != topo.world_size or part.rank != topo.rank:
        raise UsageError(f"partition part {part.rank} of {part.num_parts} does not match rank "
                         f"{topo.rank} of {topo.world_size}; load it with "
                         "gnnscale.load_partition(DIR) after gnnscale.init()")
    if hasattr(model, "_gnnscale"):
        raise UsageError("this model is already wrapped")
    check_model_device(model, topo.backend)
    modules = _outermost(model)
    if not modules and not custom:
        raise UsageError(f"{type(model).__name__} has no DGL message-passing module (dgl.nn "
                         "...Conv); for a hand-written layer call gnnscale.sync(h) before it "
                         "aggregates and pass custom=True")
    from ..plan.observe import planner_for  # late: gnnscale.plan imports this package
    from ..plan.planner import allowed_signatures

    allowed_signatures(plan)  # raises on an unknown mode, before anything collective
    n_samples = _count_samples(part, num_samples)
    broadcast_parameters(model)
    graph = as_halo_graph(part)
    halo = _build_plan(part, hierarchical)
    planner = planner_for(model, part, isinstance(halo, HierHaloPlan), topo, plan, links)
    src, dst = part.graph.edges()
    exchanges = Exchanges(part, halo, default="pull", chooser=planner.choose,
                          trials=planner)
    graph.attach_plan(halo, exchanges, overlap)
    _LAST_PLAN = halo
    block = HaloBlock.of(src, dst, part.num_owned, part.num_local, part.in_degrees,
                         part.out_degrees, halo, exchanges, overlap)
    grads = GradSync(list(model.parameters()), topo, 1.0 / topo.world_size, overlap,
                     signature=partial(_bucket_signature, topo, planner.links)) \
        if topo.distributed and topo.world_size > 1 else None
    state = WrapState(part=part, graph=graph, plan=halo, num_samples=None, block=block,
                      grads=grads, exchanges=exchanges, planner=planner)
    _set_weight(state, n_samples)
    _install(model, state, modules)
    if global_dropout:
        state.dropout = install_global_dropout(model, part.global_ids, part.num_owned,
                                               part.edge_ids)
    setattr(model, "_gnnscale", state)  # noqa: B010 (nn.Module's typed __setattr__)
    log.debug("wrapped %d message-passing modules; halo %d rows, sends %d rows",
              len(modules), part.num_halo, halo.rows_sent)
    return model


def _bucket_signature(topo: Any, links: Any, nbytes: int) -> str:
    """The planner's signature for a gradient bucket: direct, gloo's ring or the 2D allreduce."""
    from ..plan.planner import bucket_plan  # late: gnnscale.plan imports this package

    return bucket_plan(nbytes, topo.servers, topo.procs_per_server, links, topo.grid).choice


def _build_plan(part: Partition, hierarchical: bool | None) -> ExchangePlan:
    """Collective: the flat or the server-routed halo plan of this rank."""
    topo = current()
    g = topo.procs_per_server
    if hierarchical is None:
        hierarchical = topo.servers > 1 and g > 1
    if not hierarchical or not topo.distributed:
        return build_plan(part.num_owned, part.halo_owner, part.halo_owner_local, topo.world_size,
                          procs_per_server=g)
    return build_hier_plan(part.num_owned, part.halo_owner, part.halo_owner_local, topo.rank,
                           topo.world_size, g, topo.groups().server,
                           halo_keys=part.global_ids[part.num_owned:])


def _state(model: torch.nn.Module) -> WrapState | None:
    st = getattr(model, "_gnnscale", None)
    return st if isinstance(st, WrapState) else None


def plan_of(model: torch.nn.Module) -> Any:
    """The model's distribution plan (a :class:`gnnscale.plan.Plan`): per aggregation of one
    iteration, every candidate signature with its bytes and predicted seconds and the choice
    (filled in during the first forward pass; ``plan_of(model).table()`` prints it), per
    gradient bucket the allreduce's; ``.stats`` holds the exchange statistics measured."""
    st = _require(model)
    from ..plan.planner import bucket_plans  # late: gnnscale.plan imports this package

    assert st.planner is not None
    topo = current()
    buckets = bucket_plans(list(model.parameters()), topo.servers, topo.procs_per_server,
                           st.planner.links, topo.grid)
    return st.planner.plan(buckets).with_stats(st.plan.stats)


def _require(model: torch.nn.Module) -> WrapState:
    st = _state(model)
    if st is None:
        raise UsageError("the model is not wrapped; call gnnscale.wrap(model, part) first")
    return st


def dropout_state(model: torch.nn.Module) -> DropoutState | None:
    """The global-dropout seed and call counters of a wrapped model (None when the model is
    not wrapped or was wrapped with ``global_dropout=False``); checkpoints carry them."""
    st = _state(model)
    return st.dropout if st is not None else None


def node_rows(model: torch.nn.Module) -> tuple[int, int] | None:
    """``(num_owned, num_local)`` of a wrapped model's part, None for an unwrapped model.

    Node tensors inside the model's modules hold the owned rows first: ``num_local`` rows (owned,
    then halo: the sources of an aggregation) or ``num_owned`` rows.
    """
    st = _state(model)
    return None if st is None else (st.part.num_owned, st.part.num_local)


def grad_scale(model: torch.nn.Module) -> float:
    """The factor by which a wrapped model's backward gradients on this rank (before
    :func:`sync_gradients`) exceed this rank's share of the single-process gradients of the mean
    loss; 1 for an unwrapped model.

    DDP's convention (see :func:`wrap`): the output-gradient weight ``K * n_r / sum(n)`` makes
    each rank's backward pass produce K times its share, and ``sync_gradients`` averages, so
    this is K, the number of ranks.
    """
    return 1.0 if _state(model) is None else float(current().world_size)


def set_num_samples(model: torch.nn.Module, num_samples: int | None) -> None:
    """Change the sample count the next backward passes weight by (collective)."""
    st = _state(model)
    if st is None:
        raise UsageError("the model is not wrapped; call gnnscale.wrap(model, part) first")
    _set_weight(st, num_samples)


def sync(h: torch.Tensor, graph: HaloGraph | None = None) -> torch.Tensor:
    """Explicit halo exchange for hand-written layers: owned rows in, owned + halo rows out
    (differentiable: halo gradients flow back to their owners)."""
    current()
    plan = graph._gs_plan if graph is not None else _LAST_PLAN
    if plan is None:
        raise UsageError("no halo plan: call gnnscale.wrap(model, part) first")
    return mark_fresh(halo_refresh(h, plan))


def sync_gradients(model: torch.nn.Module, num_samples: int | None = None) -> None:
    """Make every rank's parameter gradients the single-machine gradient.

    For a wrapped model: the average over ranks of the gradients its backward weighted (see
    :func:`wrap`); ``num_samples``, if given, is checked against the count the weight used. For
    a model that is not wrapped (plain data parallelism, no halo): with ``num_samples`` (the
    count behind this rank's mean loss) the count-weighted mean, without it the sum."""
    topo = current()
    st = _state(model)
    if st is not None:
        if num_samples is not None and num_samples != st.num_samples:
            raise UsageError(
                f"the backward pass weighted this rank's loss for {st.num_samples} samples, but "
                f"sync_gradients got num_samples={num_samples}; pass the same count to "
                "gnnscale.wrap(..., num_samples=N) or call gnnscale.set_num_samples(model, N) "
                "before the forward pass")
        if st.grads is not None:
            st.grads.finish()
        else:
            sync_parameters_grads(model.parameters(), 1.0 / topo.world_size)
        return
    scale = 1.0
    if num_samples is not None and topo.distributed:
        scale = sample_share(num_samples)
    sync_parameters_grads(model.parameters(), scale)


def exchanged_mib(model: torch.nn.Module, inter_server: bool = False) -> float:
    """Halo bytes (MiB) all ranks sent in the last training iteration, forward plus backward
    (collective); with ``inter_server``, only the bytes that crossed from one server to
    another."""
    st = _require(model).plan.stats
    mine = st.iteration_inter_server if inter_server else st.iteration_bytes()
    return float(global_sum(float(mine))) / 2**20


def halo_summary(model: torch.nn.Module) -> str:
    """``"halo X MiB/epoch"``, plus the part that crossed servers when there are several
    (collective: every rank must call it; print it on one)."""
    total = exchanged_mib(model)
    if current().servers <= 1:
        return f"halo {total:.2f} MiB/epoch"
    return f"halo {total:.2f} MiB/epoch ({exchanged_mib(model, inter_server=True):.2f} between servers)"
