"""Seconds of one batched inversion call (``inversion.invert_batch``) on random-weight MnistNets,
and how much of it the requests' own passes take (the rest: Adam and the bookkeeping on the
caller's thread, and the call's set-up).

    OMP_NUM_THREADS=2 python bench/solver_time.py                            # ten requests of 4-48 images, 60 steps
    OMP_NUM_THREADS=2 python bench/solver_time.py --images 22 --requests 10 --steps 100
    python bench/solver_time.py --device cuda --images 17 --requests 10 --steps 200 --profile
    OMP_NUM_THREADS=1 python bench/solver_time.py --path vmapped --images 1 --requests 10 --steps 200 --profile

A microbenchmark for work on the kernel: a round's inversions are such calls, with one request
per client (bench/round_time.py times a whole round). Prints one JSON line: the median of
``--repeats`` timed calls after one warm-up call, the milliseconds per Adam step, and the share
inside the requests' passes (the per-request path, a CPU's default; the vmapped path, an
accelerator's default, has none). ``--path`` picks either on any device, and
``--cudnn-benchmark`` lets cuDNN time its convolution algorithms first (the vmapped pass turns the
clients' convolutions into grouped ones).
``--profile`` adds one more call under torch.profiler: operator calls per step and, on CUDA,
kernel launches per step, the kernels' own time per step and the host synchronisations of the call
counted by ``torch.cuda.set_sync_debug_mode`` (the results' reads at its end are a handful; the
step itself is meant to have none, so a count near the step count means it waits on the GPU).
Per-step time far above the kernel time per step means the host (dispatch, launches) bounds it.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

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


def profile_call(call, device, steps):
    """Operator and kernel counts of one call of ``call``, per Adam step, and on CUDA the host
    synchronisations inside it."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    events = prof.key_averages()
    out = {"aten_calls_per_step": round(sum(e.count for e in events if e.key.startswith("aten::")) / steps, 1)}
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        out["kernels_per_step"] = round(sum(e.count for e in kernels) / steps, 1)
        out["kernel_ms_per_step"] = round(sum(e.self_device_time_total for e in kernels) / 1000 / steps, 3)
        out["host_syncs"] = sum("synchronizing" in str(w.message) for w in caught)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="4,7,8,8,12,16,20,24,32,48", help="images per request, comma-separated")
    p.add_argument("--requests", type=int, help="repeat a single --images value this many times")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--profile", action="store_true", help="operator, kernel and host-sync counts of one more call")
    p.add_argument("--path", choices=["default", "per_request", "vmapped"], default="default",
                   help="the Solver's pass (default: per_request on a CPU, vmapped on an accelerator)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    args = p.parse_args()
    device = torch.device(args.device)
    path = args.path if args.path != "default" else "per_request" if device.type == "cpu" else "vmapped"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    sizes = [int(s) for s in args.images.split(",")] * (args.requests or 1)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = build_model("MnistNet", shape, 10).eval().to(device)
    fp = resolve_flip_params({}, "fashion_mnist")
    x = torch.rand(max(sizes), *shape)
    requests = [inversion.Invert(x[:n].to(device), torch.full((n,), 2, device=device),
                                 torch.zeros(n, dtype=torch.long, device=device), 1, args.steps,
                                 fp["init_cost"], [None]) for n in sizes]
    models = invert.ClientModels(model, model.state_dict(), len(requests), fp["harden_lr"])
    with torch.no_grad():
        for i, client in enumerate(models.models):
            for param in client.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)).to(device))
    params, buffers = models.frozen_stack(list(range(len(requests))))
    passes = [0.0]
    inversion.Solver.backward = timed_passes(inversion.Solver, passes)

    def call():
        inversion.invert_batch(model, params, buffers, requests, fp, shape,
                               [torch.Generator(device=device).manual_seed(i) for i in range(len(requests))],
                               per_request=path == "per_request")
        if device.type == "cuda":
            torch.cuda.synchronize()

    totals, shares = [], []
    for repeat in range(args.repeats + 1):
        passes[0] = 0.0
        start = time.perf_counter()
        call()
        if repeat:
            totals.append(time.perf_counter() - start)
            shares.append(passes[0] / totals[-1])
    seconds = statistics.median(totals)
    report = {"seconds": round(seconds, 3), "runs": [round(t, 3) for t in totals],
              "ms_per_step": round(1000 * seconds / args.steps, 2),
              "share_in_request_passes": round(statistics.median(shares), 3), "images": sizes,
              "steps": args.steps, "device": args.device,
              "path": path, "cudnn_benchmark": args.cudnn_benchmark,
              "threads": torch.get_num_threads()}
    if args.profile:
        report.update(profile_call(call, device, args.steps))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
