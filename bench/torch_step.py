#!/usr/bin/env python3
"""The PyTorch reference for `contrastive bench train --reference`.

Times one training step of a method on the same network, batch, views and thread count as the
Rust trainer's benchmark, timed the same way: random images in [0, 1] (augmentation left out on
both sides), forward of every view, the loss, backward, the optimiser step and the method's own
after-step work; one warm-up step (three on a GPU, where cuDNN tries its algorithms first), then the median of
`--steps` steps. Prints one JSON line:
{"method": ..., "median_seconds": ..., "images_per_second": ..., "torch": VERSION}.

The networks follow the trainer: the canonical CIFAR-style ResNet (3x3 stride-1 stem, one basic
block per stage, widths 32/64/128, strides 1/2/2, global mean pooling), MLP projector
128 -> 128 (BN, ReLU) -> 64, and each method's heads, losses and optimiser.

    python3 bench/torch_step.py --method simclr --batch 256 --steps 5 --threads 2
    python3 bench/torch_step.py --method simclr --batch 256 --steps 20 --device cuda
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(c_in, c_out, kernel, stride):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.layer1 = conv_bn(c_in, c_out, 3, stride)
        self.layer2 = conv_bn(c_out, c_out, 3, 1)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        h = F.relu(self.layer1(x))
        h = self.layer2(h)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(h + identity)


class ResNet(nn.Module):
    def __init__(self, in_channels=1, widths=(32, 64, 128), strides=(1, 2, 2)):
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0], 3, 1)
        blocks, c = [], widths[0]
        for width, stride in zip(widths, strides):
            blocks.append(BasicBlock(c, width, stride))
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = c

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))
        return h.mean(dim=(2, 3))


def mlp(dims, hidden_bn=True, output_bn=False):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        with_bn = output_bn if last else hidden_bn
        layers.append(nn.Linear(a, b, bias=not with_bn))
        if with_bn:
            layers.append(nn.BatchNorm1d(b))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Branch(nn.Module):
    def __init__(self, projector):
        super().__init__()
        self.encoder = ResNet()
        self.projector = projector

    def forward(self, x):
        return self.projector(self.encoder(x))


def nt_xent(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.t() / tau
    logits.fill_diagonal_(-1e9)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def supcon(z1, z2, labels, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    labels = torch.cat([labels, labels])
    logits = z @ z.t() / tau
    eye = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(eye, -1e9)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    return -((log_prob * positives).sum(1) / positives.sum(1)).mean()


def info_nce_queue(q, k, queue, tau):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    positive = (q * k).sum(1, keepdim=True)
    negative = q @ queue.t()
    logits = torch.cat([positive, negative], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


class Method:
    """What the trainer's Method trait does: a loss, and work after the optimiser step."""

    def after_step(self):
        pass


class SimClr(Method):
    def __init__(self):
        self.branch = Branch(mlp([128, 128, 64]))
        self.params = list(self.branch.parameters())

    def loss(self, v1, v2, labels):
        z1, z2 = self.branch(torch.cat([v1, v2])).chunk(2)
        return nt_xent(z1, z2, 0.2)


class SupCon(SimClr):
    def loss(self, v1, v2, labels):
        z1, z2 = self.branch(torch.cat([v1, v2])).chunk(2)
        return supcon(z1, z2, labels, 0.1)


def momentum_copy(online):
    import copy

    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema(target, online, m):
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(m).add_(o.detach(), alpha=1 - m)


class MocoV2(Method):
    """Symmetrised, with shuffled batch norm in 4 groups per view, queue of 4096, m 0.99."""

    groups = 4

    def __init__(self):
        self.query = Branch(mlp([128, 128, 64], hidden_bn=False))
        self.key = momentum_copy(self.query)
        self.queue = F.normalize(torch.randn(4096, 64), dim=1)
        self.params = list(self.query.parameters())
        self.pending = None

    def grouped(self, branch, view, order=None):
        x = view if order is None else view[order]
        z = torch.cat([branch(part) for part in x.chunk(self.groups)])
        if order is not None:
            z = z[torch.argsort(order)]
        return z

    def loss(self, v1, v2, labels):
        n = len(v1)
        order = torch.arange(n).view(self.groups, -1).t().reshape(-1)
        q = [self.grouped(self.query, v) for v in (v1, v2)]
        with torch.no_grad():
            k = [self.grouped(self.key, v, order) for v in (v1, v2)]
        self.pending = torch.cat(k)
        return (info_nce_queue(q[0], k[1], self.queue, 0.2) + info_nce_queue(q[1], k[0], self.queue, 0.2)) / 2

    def after_step(self):
        ema(self.key, self.query, 0.99)
        keys = F.normalize(self.pending, dim=1)
        self.queue = torch.cat([keys, self.queue[: -len(keys)]])


def byol_loss(p, z):
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


class Byol(Method):
    def __init__(self):
        self.online = Branch(mlp([128, 128, 64]))
        self.predictor = mlp([64, 128, 64])
        self.target = momentum_copy(self.online)
        self.params = list(self.online.parameters()) + list(self.predictor.parameters())

    def loss(self, v1, v2, labels):
        z = self.online(torch.cat([v1, v2]))
        p1, p2 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target(torch.cat([v1, v2])).chunk(2)
        return (byol_loss(p1, t2) + byol_loss(p2, t1)) / 2

    def after_step(self):
        ema(self.target, self.online, 0.99)


class SimSiam(Method):
    def __init__(self):
        self.branch = Branch(mlp([128, 128, 64], output_bn=True))
        self.predictor = mlp([64, 32, 64])
        self.params = list(self.branch.parameters()) + list(self.predictor.parameters())

    def loss(self, v1, v2, labels):
        z = self.branch(torch.cat([v1, v2]))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        cos = lambda p, z: F.cosine_similarity(p, z.detach(), dim=1).mean()
        return -(cos(p1, z2) + cos(p2, z1)) / 2


@torch.no_grad()
def sinkhorn(scores, eps=0.05, iterations=3):
    q = torch.exp((scores - scores.max()) / eps).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= k * q.sum(dim=1, keepdim=True)
        q /= b * q.sum(dim=0, keepdim=True)
    return (q * b).t()


class Swav(Method):
    def __init__(self):
        self.branch = Branch(mlp([128, 128, 64]))
        self.prototypes = nn.Linear(64, 100, bias=False)
        self.params = list(self.branch.parameters()) + list(self.prototypes.parameters())

    def loss(self, v1, v2, labels):
        z = F.normalize(self.branch(torch.cat([v1, v2])), dim=1)
        s1, s2 = self.prototypes(z).chunk(2)
        q1, q2 = sinkhorn(s1), sinkhorn(s2)
        ce = lambda q, s: -(q * F.log_softmax(s / 0.1, dim=1)).sum(1).mean()
        return (ce(q2, s1) + ce(q1, s2)) / 2

    def after_step(self):
        with torch.no_grad():
            w = self.prototypes.weight
            w.copy_(F.normalize(w, dim=1))


class Lars(torch.optim.Optimizer):
    """SGD with momentum and LARS trust ratios (biases and batch norm excluded), as the trainer's."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=1.5e-6, trust=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = p.norm(), g.norm()
                    if w_norm > 0 and g_norm > 0:
                        g = g * (group["trust"] * w_norm / g_norm)
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])


METHODS = {
    "simclr": SimClr,
    "supcon": SupCon,
    "moco-v2": MocoV2,
    "byol": Byol,
    "simsiam": SimSiam,
    "swav": Swav,
}


def optimizer_for(name, params):
    if name == "byol":
        return Lars(params, lr=4.0)
    weight_decay = 5e-3 if name == "simsiam" else 5e-4
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=weight_decay)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="simclr", choices=sorted(METHODS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(1)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        # Every tensor and parameter the methods make is created on the GPU; cuDNN picks its
        # fastest algorithms during the warm-up steps, which the timing leaves out.
        torch.set_default_device(device)
        torch.backends.cudnn.benchmark = True
    warmup = 3 if cuda else 1
    torch.manual_seed(0)
    method = METHODS[args.method]()
    optimizer = optimizer_for(args.method, method.params)
    v1 = torch.rand(args.batch, 1, 28, 28)
    v2 = torch.rand(args.batch, 1, 28, 28)
    labels = torch.arange(args.batch) % 10
    times = []
    for step in range(args.steps + warmup):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = method.loss(v1, v2, labels)
        loss.backward()
        optimizer.step()
        method.after_step()
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        if step >= warmup:
            times.append(elapsed)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"the loss became {loss.item()}")
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "method": args.method,
                "median_seconds": median,
                "images_per_second": args.batch / median,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
