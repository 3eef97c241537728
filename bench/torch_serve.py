#!/usr/bin/env python3
"""The PyTorch reference for serving on a GPU: inference throughput of the served encoder.

Runs the canonical ResNet of `bench/torch_step.py` (the architecture of the shipped
`fmnist-simclr` models; the weights do not change the speed) in inference mode on batches of
28x28 grayscale images that start and end in host memory, as ONNX Runtime's do in
`contrastive bench serve`: copy in, forward, copy out, per batch. Eager, and with
`--compile` through `torch.compile` too. Prints one JSON line per mode:
{"mode": ..., "batch": ..., "images_per_second": ..., "ms_per_batch": ..., "device": ...}.

    python3 bench/torch_serve.py --batch 64 --seconds 5 --device cuda --compile
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_step import ResNet  # noqa: E402


def measure(model, batch, seconds, device):
    images = [torch.rand(batch, 1, 28, 28) for _ in range(8)]
    with torch.inference_mode():
        for i in range(10):
            model(images[i % 8].to(device)).cpu()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(images[done % 8].to(device)).cpu()
            done += 1
        elapsed = time.perf_counter() - started
    return done * batch / elapsed, 1e3 * elapsed / done


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    # Full fp32, as the server runs ONNX Runtime (TF32 off, so answers match the CPU's).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = ResNet().to(device).eval()
    modes = [("eager", model)]
    if args.compile:
        modes.append(("compile", torch.compile(model)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for mode, runnable in modes:
        rate, ms = measure(runnable, args.batch, args.seconds, device)
        line = {"mode": mode, "batch": args.batch, "images_per_second": rate, "ms_per_batch": ms}
        print(json.dumps({**line, "device": name, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
