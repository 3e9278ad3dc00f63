"""Seconds of one batched inversion call (``inversion.invert_batch``) on random-weight MnistNets,
and how much of it the requests' own passes take (the rest: Adam and the bookkeeping on the
caller's thread, and the call's set-up).

    OMP_NUM_THREADS=2 python bench/solver_time.py                            # ten requests of 4-48 images, 60 steps
    OMP_NUM_THREADS=2 python bench/solver_time.py --images 22 --requests 10 --steps 100

A microbenchmark for work on the kernel: a round's inversions are such calls, with one request
per client (bench/round_time.py times a whole round). Prints one JSON line: the median of
``--repeats`` timed calls after one warm-up call, and the share of it inside the requests' passes.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import invert  # noqa: E402
import inversion  # noqa: E402
from defenses.flip import resolve_settings as resolve_flip_params  # noqa: E402
from models import build_model  # noqa: E402


def timed_passes(solver_class, seconds):
    """Wrap the Solver's per-request map so that its wall time accumulates in ``seconds[0]``."""
    backward = solver_class.backward

    def timed(self, *args):
        inner = self.map_requests

        def mapped(*map_args):
            start = time.perf_counter()
            out = list(inner(*map_args))
            seconds[0] += time.perf_counter() - start
            return out
        self.map_requests = mapped
        try:
            return backward(self, *args)
        finally:
            self.map_requests = inner
    return timed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="4,7,8,8,12,16,20,24,32,48", help="images per request, comma-separated")
    p.add_argument("--requests", type=int, help="repeat a single --images value this many times")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sizes = [int(s) for s in args.images.split(",")] * (args.requests or 1)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = build_model("MnistNet", shape, 10).eval()
    fp = resolve_flip_params({}, "fashion_mnist")
    x = torch.rand(max(sizes), *shape)
    requests = [inversion.Invert(x[:n], torch.full((n,), 2), torch.zeros(n, dtype=torch.long), 1, args.steps,
                                 fp["init_cost"], [None]) for n in sizes]
    models = invert.ClientModels(model, model.state_dict(), len(requests), fp["harden_lr"])
    with torch.no_grad():
        for i, client in enumerate(models.models):
            for param in client.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    params, buffers = models.frozen_stack(list(range(len(requests))))
    passes = [0.0]
    inversion.Solver.backward = timed_passes(inversion.Solver, passes)
    totals, shares = [], []
    for repeat in range(args.repeats + 1):
        passes[0] = 0.0
        start = time.perf_counter()
        inversion.invert_batch(model, params, buffers, requests, fp, shape,
                               [torch.Generator().manual_seed(i) for i in range(len(requests))], per_request=True)
        if repeat:
            totals.append(time.perf_counter() - start)
            shares.append(passes[0] / totals[-1])
    print(json.dumps({"seconds": round(statistics.median(totals), 3), "runs": [round(t, 3) for t in totals],
                      "share_in_request_passes": round(statistics.median(shares), 3), "images": sizes,
                      "steps": args.steps, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
