"""Full-graph node classification across partitions: the distributed twin of train.py.

    gnnscale partition planetoid:$GNNSCALE_DATASETS/planetoid/cora --parts 4 --out parts
    torchrun --nproc-per-node 4 examples/train_dist.py --parts parts --model gcn
    python examples/train_dist.py --parts parts1      # one process, on a 1-part folder

The model class is unchanged. Outside data loading, five lines differ from train.py: wrap,
accuracy, mean_loss, log and sync_gradients. Only rank 0 prints.
`--optimizer kfac` trains with K-FAC preconditioned SGD (gnnscale.KFAC) instead of Adam.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from models import MODELS, build
from optim import make_optimizer

import gnnscale


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--graph", default="synthetic:demo", help="graph SPEC (single process)")
    p.add_argument("--parts", help="partition folder (distributed twin)")
    p.add_argument("--model", choices=sorted(MODELS), default="gcn")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--dropout", type=float, default=None, help="default: the model's own")
    p.add_argument("--optimizer", choices=["adam", "kfac"], default="adam",
                   help="kfac: SGD with momentum on K-FAC preconditioned gradients")
    p.add_argument("--lr", type=float, help="default: the model's Adam rate; 0.1 with kfac")
    p.add_argument("--damping", type=float, default=0.01, help="K-FAC damping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # K-FAC's summary table
    torch.manual_seed(args.seed)
    # -- data loading ------------------------------------------------------------------------
    gnnscale.init()
    part = gnnscale.load_partition(args.parts)
    g, feat, label = part.graph, part.ndata["feat"], part.ndata["label"]
    train, val, test = (part.ndata[m].bool() for m in ("train_mask", "val_mask", "test_mask"))
    num_classes = part.meta["num_classes"]
    # -- model and training ------------------------------------------------------------------
    model = gnnscale.wrap(build(args.model, feat.shape[1], num_classes, args.dropout), part)
    lr = args.lr or (0.1 if args.optimizer == "kfac" else MODELS[args.model][2])
    opt, precond = make_optimizer(model, args.optimizer, lr, args.damping)

    def accuracy(logits: torch.Tensor, mask: torch.Tensor) -> float:
        return gnnscale.accuracy(logits, label, mask)

    def mean_loss(loss: torch.Tensor) -> float:
        return gnnscale.global_mean(loss, int(train.sum()))

    def log(msg: str) -> None:
        gnnscale.print0(f"{msg}  {gnnscale.halo_summary(model)}")

    times = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        logits = model(g, feat)
        loss = F.cross_entropy(logits[train], label[train])
        opt.zero_grad()
        loss.backward()
        gnnscale.sync_gradients(model, num_samples=int(train.sum()))
        if precond is not None:
            precond.step()
        opt.step()
        times.append(time.perf_counter() - t0)
        if (epoch + 1) % args.log_every == 0 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                logits = model(g, feat)
            log(f"epoch {epoch + 1:4d}  loss {mean_loss(loss):.4f}  train "
                f"{accuracy(logits, train):.3f}  val {accuracy(logits, val):.3f}  "
                f"{1000 * times[-1]:7.1f} ms/epoch")
    test_acc = accuracy(logits, test)
    log(f"test accuracy {test_acc:.4f}")


if __name__ == "__main__":
    main()
