"""Training throughput, the loader that feeds it, and the end-to-end demo pipeline.

    python benchmarks/train_step.py step                  # CPU: eager fp32, ours and HF
    python benchmarks/train_step.py step --device cuda    # the GPU targets: every setting
    python benchmarks/train_step.py loader                # examples/s the loader makes (CPU)
    python benchmarks/train_step.py demo                  # tiny model on the synthetic benchmark
    python benchmarks/train_step.py padding               # demo stages: data.pad_to's two values
    python benchmarks/train_step.py startup               # a stage's optimizer set-up, fresh process

``step``: the base model's pretraining step (all five tasks: forward, backward, gradient clipping,
BertAdam) run by the stages' own loop (``train.loop.train``: micro-batches, compile, no host sync
but on log steps), for each setting of ``--settings`` (eager fp32, eager bf16, compiled bf16,
compiled + CUDA graphs; on a CPU eager fp32 unless asked), ours and HF's
``LxmertForPreTraining`` (same weights, batch and loop) side by side: samples/s, MFU (FLOPs of
one forward + backward counted by ``torch.utils.flop_counter`` over the step time and the GPU's
dense peak) and the fraction of step time spent waiting for data (``data_wait_s`` in log.jsonl).

``loader``: examples/s the loader (``train.loop.iterate_batches``: examples built from the
memory-mapped feature store, masking, collation) produces for the base pretraining batch with
0..N worker processes, against a step's consumption rate (``--consume``, samples/s): the data
wait a step would see.

``demo``: the stages of ``ablations/pretraining.yaml`` under the ``demo`` profile, one seed, as
the planner makes them (the profile's synthetic design, model, per-task schedules and padding):
the synthetic benchmark, a pretraining (P10+QA10), then fine-tuning on VQA, GQA and NLVR2; and the
same fine-tunings from scratch (Table 3's "Train + scratch"), run one after another in this
process. Prints the dev metrics of both, the gain from pretraining and the wall time of each
stage. ``--pretrain-epochs``, ``--pretrain-lr``, ``--finetune-epochs`` and ``--finetune-lr`` (every
task's), ``--images`` and ``--seed`` override the profile.

``padding``: the demo profile's stages as its specs plan them (tiny model, compact synthetic
benchmark, one thread): a pretraining and the VQA, GQA and NLVR2 fine-tunings, each run for
``--steps`` steps (default 60) with ``data.pad_to: max_length`` and with ``longest``, alternated
over ``--rounds`` (default 2) in one process. Prints the training samples/s of each (the median
log window, from log.jsonl) and the ratio longest / max_length.

``startup``: what a stage's optimizer costs before its first step, in a fresh interpreter each
time (as every stage starts): ``BertAdam`` as the stages build it (torch.optim.Optimizer's
``add_param_group`` / ``zero_grad`` / ``state_dict`` / ``load_state_dict`` bound unwrapped) against
the same class with torch's ``_disable_dynamo`` wrappers, whose first call imports torch._dynamo.
Alternated over ``--rounds`` (default 2; 5 makes a steadier median); prints the median seconds of
building the optimizer, one update, zero_grad and a state-dict round trip, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_throughput import hf_loss, make_batch, ours_loss  # noqa: E402

from lxmert_bench.config import DataConfig, OptimConfig, PretrainConfig  # noqa: E402
from lxmert_bench.model import LxmertConfig, LxmertForPretraining, load_weights  # noqa: E402
from lxmert_bench.model.weights import hf_config  # noqa: E402
from lxmert_bench.train.loop import LoopSettings, select_device, train  # noqa: E402

# setting -> (precision, run.compile)
SETTINGS: dict[str, tuple[str, str]] = {
    "eager-fp32": ("fp32", "none"), "eager-bf16": ("bf16", "none"),
    "compiled-bf16": ("bf16", "default"), "compiled-cudagraphs": ("bf16", "reduce-overhead"),
    "compiled-fp32": ("fp32", "default"),  # the CPU's comparison (run.compile's default there)
}
GPU_SETTINGS = ("eager-fp32", "eager-bf16", "compiled-bf16", "compiled-cudagraphs")
# On a CPU: eager fp32. bf16 autocast runs there but at >100 s per base step on this project's
# 2-core VM (no bf16 matmul units), and compiling the base model takes many minutes; ask for them
# with --settings (compiled-fp32 on --preset test measures what run.compile does on a CPU).
CPU_SETTINGS = ("eager-fp32",)
# Dense peaks, TFLOP/s (vendor data sheets, SXM parts): bf16, TF32 and plain fp32 matmuls.
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
               "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}}


class RandomBatches:
    """``TrainData`` of ``n`` examples whose every batch is one random pretraining batch of the
    real shapes: what the step costs without the data pipeline (that is ``loader``'s)."""

    def __init__(self, batch: dict[str, Any], n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def example(self, index: int, epoch: int, rng: Any) -> int:
        return index

    def collate(self, rows: list[int]) -> dict[str, Any]:
        return self.batch  # the same rows each step (HF's QA loss is NaN on a batch without answers)


def count_flops(model: torch.nn.Module, loss_fn: Callable, b: dict, precision: str) -> int:
    """FLOPs of one forward + backward (matmuls and attention), under the step's precision."""
    counter = FlopCounterMode(display=False)
    cast = torch.autocast(b["input_ids"].device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with counter, cast:
        loss_fn(model, b).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None  # no peak to compare a CPU with
    name = torch.cuda.get_device_name(device)
    table = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if table is None:
        return None
    return table["tf32" if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 else precision]


def bench_setting(which: str, config: LxmertConfig, setting: str, batch: int, steps: int,
                  warmup: int, device: torch.device, workdir: Path) -> dict[str, Any]:
    """One (model, setting): ``warmup`` untimed steps (compilation happens there), then
    ``steps`` timed ones, through the stages' loop; figures from its log.jsonl."""
    precision, compile_mode = SETTINGS[setting]
    torch.manual_seed(0)
    if which == "hf":
        import transformers

        model: torch.nn.Module = transformers.LxmertForPreTraining(hf_config(config))
        loss_fn = hf_loss
    else:
        import transformers

        model = LxmertForPretraining(config)
        load_weights(model, transformers.LxmertForPreTraining(hf_config(config)).state_dict(),
                     strict=True)
        loss_fn = ours_loss
    b = make_batch(config, batch, 20, config.num_objects, torch.device("cpu"))
    if compile_mode != "none" and hasattr(model, "sparse_mlm"):
        model.sparse_mlm = False  # what the loop does when compiling: count those FLOPs
    flops = count_flops(model.to(device), loss_fn,
                        {k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)
                         for k, v in b.items()}, precision)
    run = workdir / f"{which}-{setting}"
    total = warmup + steps
    settings = LoopSettings(
        seed=0, optim=OptimConfig(lr=1e-4, batch_size=batch, epochs=1, max_steps=total),
        checkpoint_dir=run / "checkpoints", log_path=run / "log.jsonl", log_every=warmup,
        checkpoint_every=10**9, device=str(device), precision=precision, compile=compile_mode,
        num_workers=0, eval_every_epoch=False, desc=f"{which} {setting}")

    def step(m: torch.nn.Module, data: dict, epoch: int) -> dict:
        loss = loss_fn(m, data)
        return {"loss": loss, "losses": {}}

    t0 = time.perf_counter()
    summary = train(model, RandomBatches(b, batch * total), step, settings)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r and r["step"] > warmup]  # windows of `warmup` steps
    per_step = [batch / r["samples_per_s"] for r in timed]
    wait = sum(r["data_wait_s"] for r in timed)
    shutil.rmtree(run, ignore_errors=True)  # last.pt of the base model: gigabytes
    # the median window: a shared machine's other load shows up as outlier windows
    step_s = statistics.median(per_step)
    secs = sum(per_step)
    peak = peak_tflops(device, precision)
    tflops = flops / step_s / 1e12
    return {"model": which, "setting": setting, "precision": precision, "compile": compile_mode,
            "samples_per_s": round(batch / step_s, 2), "step_s": round(step_s, 4),
            "gflop_per_step": round(flops / 1e9, 1), "tflops": round(tflops, 4),
            "mfu": round(tflops / peak, 4) if peak else None,
            "data_wait_fraction": round(wait / secs, 4) if secs else None,
            "compile_status": summary.execution["compile"], "wall_s": round(wall, 1)}


def bench_step(preset: str, batch: int, steps: int, warmup: int, device_name: str,
               settings: list[str], models: list[str]) -> dict:
    device = select_device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # eager fp32 means fp32: TF32 is its own row
    config = LxmertConfig.preset(preset)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        for setting in settings:
            for which in models:
                row = bench_setting(which, config, setting, batch, steps, warmup, device, Path(tmp))
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    by = {(r["model"], r["setting"]): r["samples_per_s"] for r in rows}
    ratios = {s: round(by[("ours", s)] / by[("hf", s)], 3) for s in settings
              if ("ours", s) in by and ("hf", s) in by}
    if ("ours", "compiled-bf16") in by and ("hf", "eager-fp32") in by:
        ratios["ours compiled-bf16 / hf eager-fp32"] = round(
            by[("ours", "compiled-bf16")] / by[("hf", "eager-fp32")], 3)
    params = sum(p.numel() for p in LxmertForPretraining(config).parameters())
    return {"what": "pretraining step (all tasks) through train.loop", "preset": preset,
            "params": params, "device": str(device), "batch": batch, "steps": steps,
            "warmup": warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": None if device.type == "cuda" else (platform.processor() or platform.machine()),
            "rows": rows, "ours_over_hf": ratios}


def bench_loader(root: Path, images: int, batch: int, batches: int, workers: list[int],
                 consume: float | None) -> dict:
    """Examples/s of the pretraining loader for the base model's batch (36 boxes x 2048-d
    float32 features from the memory-mapped store, masking, collation)."""
    from lxmert_bench.data.root import ensure_data_root
    from lxmert_bench.data.tasks import PretrainCorpus
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.loop import epoch_batches, iterate_batches
    from lxmert_bench.train.pretrain import make_examples

    data = DataConfig(root=str(root), synthetic=True, synthetic_images=images)
    ensure_data_root(data)
    p = PretrainConfig()
    corpus = PretrainCorpus(data.root, p.train_splits, num_objects=36)
    examples = make_examples(p, corpus, load_tokenizer(data), 0)
    order = epoch_batches(len(examples), batch, 0, 0)
    if len(order) < batches:
        raise SystemExit(f"{root}: {len(examples)} examples make {len(order)} batches of {batch}; "
                         f"use more --images")
    rows = []
    for w in workers:
        it = iterate_batches(examples, order[:batches], 0, 0, num_workers=w)
        first = next(it)  # workers start, pages come in: not what the steady state costs
        t0 = time.perf_counter()
        n = sum(int(b["input_ids"].shape[0]) for b in it)
        dt = time.perf_counter() - t0
        rate = n / dt
        row = {"workers": w, "examples_per_s": round(rate, 1),
               "feats_shape": list(first["feats"].shape)}
        if consume:
            row["data_wait_fraction_at_consume"] = round(max(0.0, 1 - rate / consume), 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"what": "pretraining loader, base batch", "batch": batch, "batches_timed": batches - 1,
            "examples": len(examples), "consume_samples_per_s": consume, "rows": rows}


# ---------------------------------------------------------------------------------------------
# The demo profile's stages, as its specs plan them (profiles/demo.yaml: design, model, per-task
# schedules, padding), so these benchmarks time what `lxmert-bench run --profile demo` runs.
DEMO_SCHEDULE_KEYS = {  # the options of `demo` and the keys each sets (every task's, for fine-tuning)
    "images": ["data.synthetic_images"], "pretrain_epochs": ["pretrain.optim.epochs"],
    "pretrain_lr": ["pretrain.optim.lr"],
    "finetune_epochs": [f"finetune.{t}.optim.epochs" for t in ("vqa", "gqa", "nlvr2")],
    "finetune_lr": [f"finetune.{t}.optim.lr" for t in ("vqa", "gqa", "nlvr2")]}


def demo_plan(workdir: Path, spec_path: Path, sets: list[str] | None = None, seed: int = 0) -> Any:
    """The plan of the spec at ``spec_path`` under the demo profile and ``sets`` (``--set``
    strings), with one ``seed`` in place of the spec's seeds."""
    from lxmert_bench.plan import make_plan
    from lxmert_bench.spec import load_spec

    workdir.mkdir(parents=True, exist_ok=True)
    return make_plan(replace(load_spec(spec_path, "demo", sets or []), seeds=(seed,)), workdir)


def demo(workdir: Path, seed: int = 0, **schedule: float | None) -> dict:
    """``ablations/pretraining.yaml``'s two rows on the demo profile, one seed: pretraining
    (P10+QA10) then VQA / GQA / NLVR2 fine-tuning, and the same fine-tunings from scratch (Table
    3's "Train + scratch"), run in this process in dependency order; ``schedule`` overrides the
    profile."""
    from lxmert_bench.data.root import ensure_data_root
    from lxmert_bench.store import RunDir
    from lxmert_bench.train.stages import run_stage

    sets = [f"{key}={v}" for k, v in schedule.items() if v is not None for key in DEMO_SCHEDULE_KEYS[k]]
    plan = demo_plan(workdir, REPO / "ablations" / "pretraining.yaml", sets, seed)
    spec = plan.specs[0]
    pretrained = spec.reference_variant
    scratch = next(v.name for v in spec.variants if v.name != pretrained)
    timings: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    ensure_data_root(next(iter(plan.stages.values())).config.data)
    timings["data"] = time.perf_counter() - t0
    for st in plan.ordered():
        cfg = st.config
        variant = st.users[0][1]
        name = st.kind if st.kind == "pretrain" else f"{cfg.finetune.task} ({variant})"
        rd = RunDir(workdir, cfg.stage_id)
        rd.write_config(cfg)
        t = time.perf_counter()
        result = run_stage(rd)
        timings[name] = time.perf_counter() - t
        results[name] = {"steps": result["steps"], "metrics": result["metrics"]}
        print(f"{name}: {json.dumps(result['metrics'])} ({result['steps']} steps, "
              f"{timings[name]:.1f} s)", file=sys.stderr, flush=True)
    gains = {task: round(results[f"{task} ({pretrained})"]["metrics"]["accuracy"]
                         - results[f"{task} ({scratch})"]["metrics"]["accuracy"], 2)
             for task in spec.tasks}
    pipeline = timings["data"] + sum(v for k, v in timings.items()
                                     if k == "pretrain" or k.endswith(f"({pretrained})"))
    return {"what": "demo pipeline (the demo profile's stages, one seed, in one process)",
            "overrides": sets, "seed": seed, "results": results, "gain_from_pretraining": gains,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "pipeline_s": round(pipeline, 1), "threads": torch.get_num_threads()}


def bench_padding(workdir: Path, steps: int, rounds: int) -> dict:
    """Training samples/s of the demo profile's stages with either padding (see the docstring)."""
    from lxmert_bench.plan import apply
    from lxmert_bench.store import RunDir
    from lxmert_bench.train.stages import run_stage

    torch.set_num_threads(1)  # what a local stage gets with the demo's two at a time on 2 cores
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "padding.yaml"
    spec.write_text("name: padding\ntasks: [vqa, gqa, nlvr2]\nvariants:\n  Feat + Label: {}\n")
    plan = demo_plan(workdir, spec)
    stages = {(st.config.finetune.task if st.kind == "finetune" else st.kind): st.config
              for st in plan.stages.values() if st.kind in ("pretrain", "finetune")}
    rows: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for name, base in stages.items():
            for pad in ("max_length", "longest"):
                section = "finetune" if base.kind == "finetune" else "pretrain"
                cfg = apply(base, {"data.pad_to": pad, "init_from": None, "log_every": 10,
                                   "seed": 100 + r, f"{section}.optim.max_steps": steps})
                rd = RunDir(workdir, cfg.stage_id)
                rd.write_config(cfg)
                run_stage(rd)
                log = [json.loads(x) for x in rd.log_path.read_text().splitlines()]
                windows = [x["samples_per_s"] for x in log if "loss" in x and x["step"] > 10]
                rows.setdefault((name, pad), []).append(statistics.median(windows))
                shutil.rmtree(rd.path)
                print(f"round {r + 1} {name} pad_to={pad}: {rows[(name, pad)][-1]:.1f} samples/s",
                      file=sys.stderr, flush=True)
    out = []
    for name in stages:
        full, cut = (statistics.median(rows[(name, p)]) for p in ("max_length", "longest"))
        out.append({"stage": name, "max_length_samples_per_s": round(full, 1),
                    "longest_samples_per_s": round(cut, 1), "ratio": round(cut / full, 3)})
    return {"what": "demo stages' training step, data.pad_to max_length vs longest",
            "steps": steps, "rounds": rounds, "threads": torch.get_num_threads(), "rows": out}


STARTUP_SCRIPT = """
import sys, time, torch
from torch.optim import Optimizer
from lxmert_bench.train.optim import DYNAMO_GUARDED_METHODS, BertAdam

class Wrapped(BertAdam):  # torch's own methods, with their lazy torch._dynamo import
    pass

for name in DYNAMO_GUARDED_METHODS:
    setattr(Wrapped, name, getattr(Optimizer, name))

cls = {"bertadam": BertAdam, "wrapped": Wrapped}[sys.argv[1]]
model = torch.nn.Linear(128, 128)
model(torch.ones(2, 128)).sum().backward()
start = time.perf_counter()
opt = cls(model.parameters(), lr=1e-4)
opt.step()
opt.zero_grad()
opt.load_state_dict(opt.state_dict())
print(time.perf_counter() - start, "torch._dynamo" in sys.modules)
"""


def bench_startup(rounds: int) -> dict:
    """The optimizer's set-up in fresh interpreters, ours and torch's wrapped methods alternated."""
    import subprocess

    times: dict[str, list[float]] = {"bertadam": [], "wrapped": []}
    dynamo: dict[str, bool] = {}
    for _ in range(rounds):
        for which in times:
            out = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, which], check=True,
                                 capture_output=True, text=True).stdout.split()
            times[which].append(float(out[0]))
            dynamo[which] = out[1] == "True"
    ours, theirs = (statistics.median(times[k]) for k in ("bertadam", "wrapped"))
    return {"what": "optimizer set-up (build, step, zero_grad, state-dict round trip), fresh process",
            "rounds": rounds, "bertadam_s": round(ours, 4), "wrapped_s": round(theirs, 4),
            "saved_s": round(theirs - ours, 3), "ratio_wrapped_over_ours": round(theirs / ours, 1),
            "imports_torch_dynamo": dynamo}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["step", "loader", "demo", "padding", "startup"])
    ap.add_argument("--rounds", type=int, default=2,
                    help="padding, startup: alternations of the two")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, default=None,
                    help="step: default 4 on CPU, 128 on GPU; loader: default 256")
    ap.add_argument("--steps", type=int, default=None,
                    help="step: timed steps (default 3 on CPU, 30 on GPU); padding: default 60")
    ap.add_argument("--warmup", type=int, default=None, help="step: untimed steps first (default 3 on CPU, 10 on GPU)")
    ap.add_argument("--settings", default=None,
                    help=f"step: comma-separated, of {', '.join(SETTINGS)} (default: "
                         f"{', '.join(GPU_SETTINGS)} on CUDA, {', '.join(CPU_SETTINGS)} on CPU)")
    ap.add_argument("--models", default="ours,hf", help="step: ours, hf or both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="demo: overrides the demo profile's "
                    "value; loader: synthetic images (default 2000)")
    ap.add_argument("--batches", type=int, default=8, help="loader: batches read (the first untimed)")
    ap.add_argument("--workers", default="0,1,2", help="loader: worker counts to try")
    ap.add_argument("--consume", type=float, default=None, help="loader: a step's samples/s")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--workdir", default="benchmarks/.demo", help="demo: run directories and data; "
                    "loader: <workdir>/loader-data")
    ap.add_argument("--seed", type=int, default=0, help="demo: seed of every stage")
    for key, kind in (("pretrain_epochs", int), ("pretrain_lr", float),
                      ("finetune_epochs", int), ("finetune_lr", float)):
        ap.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None,
                        help="demo: overrides the demo profile's value")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    if args.what == "step":
        settings = args.settings.split(",") if args.settings else list(GPU_SETTINGS if gpu else CPU_SETTINGS)
        unknown = [s for s in settings if s not in SETTINGS]
        if unknown:
            ap.error(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
        out = bench_step(args.preset, args.batch or (128 if gpu else 4), args.steps or (30 if gpu else 3),
                         args.warmup or (10 if gpu else 3), args.device, settings,
                         args.models.split(","))
    elif args.what == "loader":
        out = bench_loader(Path(args.workdir) / "loader-data", args.images or 2000, args.batch or 256,
                           args.batches, [int(w) for w in args.workers.split(",")], args.consume)
    elif args.what == "startup":
        out = bench_startup(args.rounds)
    elif args.what == "padding":
        out = bench_padding(Path(args.workdir) / "padding", args.steps or 60, args.rounds)
    else:
        out = demo(Path(args.workdir), args.seed, images=args.images,
                   pretrain_epochs=args.pretrain_epochs, pretrain_lr=args.pretrain_lr,
                   finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
