"""BEiT's relative position bias: its share of a training step, and the fast path vs transformers'.

    python benchmarks/relative_position_bias.py                       # CPU: tiny and base shapes
    python benchmarks/relative_position_bias.py --models base --device cuda --precision bf16 --batch_size 32

For each model shape, in one process: one model with random weights (and a random bias table, as
a trained checkpoint has; a fresh BEiT's is all zeros) and a deep copy of it given the fast path
(``hf_medbeit.relative_position``). Then:

1. identity: one training-mode forward + backward of each, same input and same RNG state: the
   logits and every parameter's ``.grad`` must be equal bit for bit (``torch.equal``), else exit 1;
2. profile (``torch.profiler``): what share of a forward + backward step the bias modules take,
   forward (everything under the modules' calls) and backward (the autograd nodes of those ops,
   matched by sequence number), for each variant;
3. the bias module alone: forward + backward of one call, as a layer makes it (the part the fast
   path changes, timed without the rest of the step's noise), alternated, ``--repeats`` rounds;
4. timing: forward + backward of the model alone (no optimizer, synthetic tensors already on the
   device), ``--repeats`` rounds that alternate the two variants so that load from other processes
   falls on both alike; per round ``--steps`` timed steps after ``--warmup`` untimed ones, the
   device synchronised at both ends. Reports the median step time of each and their ratio.

Writes JSON (default ``benchmarks/results_cpu/relative_position_bias.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import BeitConfig, BeitForImageClassification
from transformers.models.beit.modeling_beit import BeitRelativePositionBias

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_medbeit.relative_position import use_fast_relative_position_bias  # noqa: E402

from beit_shapes import MODELS  # noqa: E402  (the BEiT shapes; benchmarks/ is this script's folder)

TAG = "relative_position_bias"
RESULTS = Path(__file__).resolve().parent / "results_cpu"


def build_models(shape: str, device: str, image_size: int = 224, seed: int = 0, control: bool = False):
    torch.manual_seed(seed)
    model = BeitForImageClassification(BeitConfig(image_size=image_size, patch_size=16, num_labels=2, **MODELS[shape]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_(std=0.02)
    model.to(device).train()
    fast = copy.deepcopy(model)
    if control:  # an A/A run: the copy stays as transformers builds it, to see the bias of the set-up
        return model, fast
    if use_fast_relative_position_bias(fast) == 0:
        raise SystemExit("the fast path was not applied (see the warning above)")
    return model, fast


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model, pixel_values, precision: str, device: str) -> torch.Tensor:
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(pixel_values=pixel_values).logits
    logits.float().sum().backward()
    return logits


def check_identity(model, fast, pixel_values, precision: str, device: str) -> dict:
    results = []
    for candidate in (model, fast):
        candidate.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same drop-path draws in both
        logits = step(candidate, pixel_values, precision, device)
        results.append((logits.detach(), {name: p.grad for name, p in candidate.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    differing = [name for name in grads_a if not torch.equal(grads_a[name], grads_b[name])]
    return {"logits_equal": torch.equal(logits_a, logits_b), "grads_equal": not differing,
            "parameters_compared": len(grads_a), "differing_grads": differing[:5]}


def tag_bias_calls(model) -> list:
    """record_function around every call of the model's relative position bias modules."""
    handles = []
    for module in model.modules():
        if isinstance(module, BeitRelativePositionBias):
            def enter(module, args, kwargs):
                module._bench_record = record_function(TAG)
                module._bench_record.__enter__()

            def leave(module, args, kwargs, output):
                module._bench_record.__exit__(None, None, None)

            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(leave, with_kwargs=True))
    return handles


def profile_share(model, pixel_values, precision: str, device: str, steps: int) -> dict:
    handles = tag_bias_calls(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    try:
        step(model, pixel_values, precision, device)  # warm
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                with record_function("step"):
                    model.zero_grad(set_to_none=True)
                    step(model, pixel_values, precision, device)
                    sync(device)
    finally:
        for handle in handles:
            handle.remove()
    events = prof.events()
    forward = [event for event in events if event.name == TAG]
    sequence_numbers, stack = set(), list(forward)
    while stack:  # every op under a bias call; their autograd nodes share the op's sequence number
        event = stack.pop()
        if event.sequence_nr is not None and event.sequence_nr >= 0:
            sequence_numbers.add(event.sequence_nr)
        stack.extend(event.cpu_children)
    backward = [event for event in events if event.name.startswith("autograd::engine::evaluate_function:")
                and event.sequence_nr in sequence_numbers]
    step_us = sum(event.cpu_time_total for event in events if event.name == "step")
    forward_us = sum(event.cpu_time_total for event in forward)
    backward_us = sum(event.cpu_time_total for event in backward)
    by_op: dict[str, float] = {}
    for event in backward:
        name = event.name.split(": ", 1)[1]
        by_op[name] = by_op.get(name, 0.0) + event.cpu_time_total / 1000 / steps
    for event in forward:
        for child in event.cpu_children:
            by_op[child.name] = by_op.get(child.name, 0.0) + child.cpu_time_total / 1000 / steps
    return {
        "profiled_steps": steps,
        "bias_calls_per_step": len(forward) / steps,
        "step_ms": step_us / 1000 / steps,
        "bias_forward_ms": forward_us / 1000 / steps,
        "bias_backward_ms": backward_us / 1000 / steps,
        "bias_share": (forward_us + backward_us) / step_us,
        "bias_ms_by_op": dict(sorted(((k, round(v, 3)) for k, v in by_op.items()), key=lambda kv: -kv[1])),
    }


def time_steps(model, pixel_values, precision: str, device: str, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        model.zero_grad(set_to_none=True)
        step(model, pixel_values, precision, device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        step(model, pixel_values, precision, device)
    sync(device)
    return (time.perf_counter() - start) / steps


def time_bias_alone(model, device: str, calls: int, rounds: int) -> dict:
    """Forward + backward of the first bias module alone, as a layer calls it (native window,
    ``dim_size`` = tokens): the part of the step the fast path changes, without the model's noise."""
    module = next(m for m in model.modules() if isinstance(m, BeitRelativePositionBias))
    window, tokens = module.window_size, module.window_size[0] * module.window_size[1] + 1
    gradient = torch.randn(1, module.relative_position_bias_table.shape[1], tokens, tokens, device=device)
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            module(window, False, tokens).backward(gradient)
        sync(device)
        times.append((time.perf_counter() - start) / calls * 1000)
    return {"min_ms": min(times), "median_ms": statistics.median(times)}


def run_shape(shape: str, args) -> dict:
    batch_size = args.batch_size or (8 if shape == "tiny" else 2)
    model, fast = build_models(shape, args.device, control=args.control)
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device)
    row = {"model": shape, "batch_size": batch_size,
           "identity": check_identity(model, fast, pixel_values, args.precision, args.device)}
    print(f"[{shape}] identity: {row['identity']}", flush=True)
    if args.profile_steps:
        row["profile"] = {name: profile_share(candidate, pixel_values, args.precision, args.device, args.profile_steps)
                          for name, candidate in (("transformers", model), ("fast", fast))}
        for name, report in row["profile"].items():
            print(f"[{shape}] profile {name}: bias {report['bias_forward_ms']:.2f} ms fwd + "
                  f"{report['bias_backward_ms']:.2f} ms bwd of {report['step_ms']:.1f} ms per step "
                  f"({100 * report['bias_share']:.1f}%, {report['bias_calls_per_step']:.0f} calls)", flush=True)
    alone = {"transformers": [], "fast": []}
    for _ in range(args.repeats):  # alternated, as the model timings below
        for name, candidate in (("transformers", model), ("fast", fast)):
            alone[name].append(time_bias_alone(candidate, args.device, calls=20, rounds=3)["min_ms"])
    row["bias_module_alone_ms_per_call"] = {
        name: {"median_of_round_minima": statistics.median(values), "min": min(values)} for name, values in alone.items()}
    row["bias_module_alone_ratio"] = (row["bias_module_alone_ms_per_call"]["transformers"]["median_of_round_minima"]
                                      / row["bias_module_alone_ms_per_call"]["fast"]["median_of_round_minima"])
    print(f"[{shape}] bias module alone, forward + backward per call: transformers "
          f"{row['bias_module_alone_ms_per_call']['transformers']['median_of_round_minima']:.3f} ms, fast "
          f"{row['bias_module_alone_ms_per_call']['fast']['median_of_round_minima']:.3f} ms "
          f"({row['bias_module_alone_ratio']:.2f}x)", flush=True)
    rounds = []
    for repeat in range(args.repeats):
        order = (("transformers", model), ("fast", fast)) if repeat % 2 == 0 else (("fast", fast), ("transformers", model))
        times = {name: time_steps(candidate, pixel_values, args.precision, args.device, args.steps, args.warmup)
                 for name, candidate in order}
        rounds.append({"transformers_ms": 1000 * times["transformers"], "fast_ms": 1000 * times["fast"],
                       "ratio": times["transformers"] / times["fast"]})
        print(f"[{shape}] round {repeat + 1}: transformers {rounds[-1]['transformers_ms']:.1f} ms, fast "
              f"{rounds[-1]['fast_ms']:.1f} ms per step, ratio {rounds[-1]['ratio']:.3f}", flush=True)
    before = statistics.median(r["transformers_ms"] for r in rounds)
    after = statistics.median(r["fast_ms"] for r in rounds)
    row.update(rounds=rounds, transformers_median_ms=before, fast_median_ms=after,
               ratio_of_medians=before / after, median_round_ratio=statistics.median(r["ratio"] for r in rounds),
               transformers_images_per_s=batch_size / before * 1000, fast_images_per_s=batch_size / after * 1000)
    print(f"[{shape}] median: transformers {before:.1f} ms, fast {after:.1f} ms per step: "
          f"{before / after:.3f}x", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "base"])
    parser.add_argument("--batch_size", type=int, default=None, help="default: 8 (tiny), 2 (base, large)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--profile_steps", type=int, default=2, help="0: no profile")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--control", action="store_true",
                        help="A/A run: 'fast' is an unpatched copy (what the set-up alone does to the ratio)")
    parser.add_argument("--out", type=Path, default=RESULTS / "relative_position_bias.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "relative_position_bias", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else
        f"CPU, {torch.get_num_threads()} torch threads ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "precision": args.precision,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "control": args.control,
        "rows": [run_shape(shape, args) for shape in args.models],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    identical = all(row["identity"]["logits_equal"] and row["identity"]["grads_equal"] for row in report["rows"])
    if not identical:
        print("NOT bit-identical: see 'identity' in the JSON", file=sys.stderr)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
