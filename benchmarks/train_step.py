"""Whole training-step time, measured side by side in one run (interleaved, medians).

    python benchmarks/train_step.py [--models resnet18,resnet20] [--batch 128] [--reps 5]

Per model: FP32 eager; torch.autocast (bf16; on CUDA also fp16); the prepared model at the
``fp32`` level (the original forward); the ``emulate`` route at 8 bits (the paper's emulation);
the default route at 8, 12, 14 and 16 bits. ``--models transformer`` selects a small
transformer language model instead (:class:`TinyLM`; ``--batch`` counts sequences of 128
tokens), ``--models hf-gpt2,hf-bert,hf-llama`` Hugging Face models of that size (:class:`HubLM`;
needs ``transformers``), ``--models signal1d`` a 1-d convolutional network (:class:`Signal1d`) and
``--models r3d_18,mc3_18,r2plus1d_18`` torchvision's video networks (3-d convolutions; ``--batch``
counts clips of 8 frames of 56x56). Columns: seconds per step (forward, backward, SGD step), ratio to FP32 and to
autocast (higher is faster), the seconds of the untimed first step (kernels built, tuned and
cached: on CUDA the Triton kernels' compilation and autotuning per layer shape); with ``--saved``, the activation memory
autograd saves for backward (device-independent); with ``--memory``, peak memory of each
configuration (max RSS of a fresh process on the CPU; on CUDA ``max_memory_allocated`` over one
step in this process, the allocator's peak statistics being reset before it).
``--cuda-graphs`` adds, on CUDA, a CUDA-graph replay of autocast and of each level: the step's
device time without the host's Python and launches (host-side state, such as the precision
level, frozen at capture; the stochastic-rounding seeds are drawn on the device, so each replay
rounds afresh).
``--allocator reuse`` (the default) calls ``muppet_fx.reuse_cpu_memory()`` first, for every
configuration alike; ``--allocator default`` measures glibc's defaults.
"""
import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from cifar_models import build_model  # noqa: E402
from common import capture, import_transformers, interleaved  # noqa: E402

import muppet_fx  # noqa: E402


class TinyLM(torch.nn.Module):
    """A small transformer language model (``--models transformer``): token embedding, two
    pre-norm encoder layers (width 512, 8 heads, MLP 2048) and a 1000-word head, on sequences
    of 128 tokens; its products are linear layers and attention's batched matmuls."""

    def __init__(self, width: int = 512, layers: int = 2, vocab: int = 1000):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(
            width, 8, 4 * width, dropout=0.0, batch_first=True, norm_first=True) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class HubLM(torch.nn.Module):
    """A Hugging Face ``transformers`` language model of TinyLM's size (``--models hf-gpt2``,
    ``hf-bert``, ``hf-llama``): 2 layers, width 512, 8 heads, vocabulary 1000, built from a
    configuration (no download) with the library's default dropout; returns the logits."""

    def __init__(self, kind: str):
        super().__init__()
        try:
            T = import_transformers()
        except ImportError as err:
            raise SystemExit(f"--models hf-{kind} needs the transformers package: pip install transformers") from err
        common = dict(vocab_size=1000, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        configs = {
            "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=512, n_layer=2, n_head=8, n_positions=128,
                                                           use_cache=False, **common)),
            "bert": lambda: T.BertForMaskedLM(T.BertConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                                           intermediate_size=2048, **common)),
            "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(hidden_size=512, num_hidden_layers=2,
                                                              num_attention_heads=8, intermediate_size=1408,
                                                              use_cache=False, **common)),
        }
        if kind not in configs:
            raise SystemExit(f"unknown model hf-{kind}; choose from {', '.join('hf-' + k for k in configs)}")
        self.model = configs[kind]()

    def forward(self, tokens):
        return self.model(tokens).logits


class Signal1d(torch.nn.Module):
    """A 1-d convolutional classifier of 16-channel signals of 2048 samples (``--models
    signal1d``): three 9-tap convolutions (16 -> 64 -> 128 -> 128, the second strided) with
    batch norm and ReLU, average pooling and a 10-way linear layer."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(
            nn.Conv1d(16, 64, 9, padding=4), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Conv1d(64, 128, 9, stride=2, padding=4), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Conv1d(128, 128, 9, padding=4), nn.BatchNorm1d(128), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x):
        return self.body(x)


VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18")  # torchvision's video classifiers, on 8 frames of 56x56


class Cases(dict):
    """Configuration name -> step function, and the parameters they all train."""
    parameters: list


def make_cases(name: str, batch: int, device: str, compile_: bool = False, levels=(8, 12, 14, 16),
               master: bool = False, fp16_grad_weight: bool = False) -> dict:
    """Configuration name -> a function running one training step. ``master`` adds the 8-bit
    step as MuPPET trains it: ``MasterCopyOptimizer`` (gradients quantised, NaN steps skipped)
    around a fused SGD, whose NaN check stays on the device. ``fp16_grad_weight`` adds, on CUDA,
    the 8-bit step with the convolutions' weight gradients on FP16 MMA
    (``conv_triton.GRAD_WEIGHT_MMA = "fp16"``)."""
    torch.manual_seed(0)
    if name == "transformer" or name.startswith("hf-"):
        model = (TinyLM() if name == "transformer" else HubLM(name[3:])).to(device)
        x = torch.randint(0, 1000, (batch, 128), device=device)
        y = torch.randint(0, 1000, (batch * 128,), device=device)
    elif name == "signal1d" or name in VIDEO:
        import torchvision

        model = (Signal1d() if name == "signal1d" else torchvision.models.get_model(name, num_classes=10)).to(device)
        x = torch.randn((batch, 16, 2048) if name == "signal1d" else (batch, 3, 8, 56, 56), device=device)
        y = torch.randint(0, 10, (batch,), device=device)
    else:
        model = build_model(name).to(device)
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(net, autocast=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = net(x)
        F.cross_entropy(out.float().flatten(0, -2), y).backward()
        opt.step()

    cases = Cases({"fp32 eager": lambda: step(model), "autocast bf16": lambda: step(model, torch.bfloat16)})
    cases.parameters = list(model.parameters())  # shared by every configuration
    if device == "cuda":  # the usual GPU mixed precision (no loss scaling: it costs little time)
        cases["autocast fp16"] = lambda: step(model, torch.float16)
    top = muppet_fx.prepare(model, ladder=(8, "fp32"))
    top.set_precision("fp32")
    cases["prepared, fp32 level"] = lambda: step(top)
    emu = muppet_fx.prepare(model, ladder=(8, "fp32"), backend="emulate")
    cases["emulate 8-bit"] = lambda: step(emu)
    for bits in levels:
        pm = muppet_fx.prepare(model, ladder=(bits, "fp32"))
        cases[f"{pm._muppet_state.route_for(x.device)} {bits}-bit"] = (lambda pm=pm: step(pm))
        if compile_ and bits == 8:
            compiled = torch.compile(pm)
            cases[f"torch.compile, {pm._muppet_state.route_for(x.device)} {bits}-bit"] = \
                (lambda c=compiled: step(c))
            if device == "cuda":  # Inductor replays the step's launches as CUDA graphs (cudagraph trees)
                graphed = torch.compile(pm, mode="reduce-overhead")
                cases[f"torch.compile reduce-overhead, {pm._muppet_state.route_for(x.device)} {bits}-bit"] = \
                    (lambda c=graphed: step(c))
    if fp16_grad_weight and device == "cuda":
        from muppet_fx.kernels import conv_triton

        pm16 = muppet_fx.prepare(model, ladder=(8, "fp32"))

        def fp16_grad_weight_step():
            chosen, conv_triton.GRAD_WEIGHT_MMA = conv_triton.GRAD_WEIGHT_MMA, "fp16"
            try:
                step(pm16)
            finally:
                conv_triton.GRAD_WEIGHT_MMA = chosen
        cases[f"{pm16._muppet_state.route_for(x.device)} 8-bit, dW on fp16 MMA"] = fp16_grad_weight_step
    if master:
        pm = muppet_fx.prepare(model, ladder=(8, "fp32"))
        opt_m = muppet_fx.MasterCopyOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True), pm)

        def master_step():
            opt_m.zero_grad(set_to_none=True)
            F.cross_entropy(pm(x).float().flatten(0, -2), y).backward()
            opt_m.step()
        cases[f"{pm._muppet_state.route_for(x.device)} 8-bit, master copy"] = master_step
    return cases


def saved_mib(run) -> float:
    """MiB of tensors autograd saves for backward during one call of ``run`` (each storage
    counted once): the activation memory of a step, the same on every device."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values()) / 2**20


def cuda_peak_mib(run) -> float:
    """Peak CUDA memory allocated during one call of ``run`` (after a first call built everything)."""
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def peak_memory_mib(name: str, case: str, batch: int, threads: int, allocator: str, compile_: bool) -> float:
    """Peak memory of ``case`` in a fresh process: max RSS on the CPU, max allocated on CUDA."""
    out = subprocess.run([sys.executable, __file__, "--models", name, "--only", case, "--batch", str(batch),
                          "--threads", str(threads), "--allocator", allocator] + (["--compile"] if compile_ else []),
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("PEAK_MIB")[1].split()[0])


def _rss_high_water_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _only(args, device) -> None:
    run = make_cases(args.models, args.batch, device, args.compile, master=True, fp16_grad_weight=True)[args.only]
    run()  # first step: kernels built, workspaces allocated
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # reset the RSS high-water mark so import-time peaks do not hide the step's
        Path("/proc/self/clear_refs").write_text("5")
    run()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_high_water_mib()
    print(f"PEAK_MIB {peak:.1f}")


def cuda_graphed(run, warmup: int = 3):
    """``run`` captured once as a CUDA graph; returns its replay: the device's time for the step
    without the host's. The Triton route draws its stochastic-rounding seeds on the device, so
    each replay rounds afresh; what ``run`` decides on the host (the precision level among it)
    is frozen at capture."""
    return capture(run, warmup=warmup)[0].replay


_FAILED = object()


def _first_call(key, make, first: dict, sync):
    """``make()``, its seconds into ``first[key]``; if it raises (a compiler's or a graph
    capture's limit, say), the reason goes to stderr and ``_FAILED`` comes back."""
    sync()
    t0 = time.perf_counter()
    try:
        result = make()
        sync()
    except Exception as e:  # noqa: BLE001 (reported: why it failed is the finding)
        print(f"{key}: failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
        return _FAILED
    first[key] = time.perf_counter() - t0
    return result


def add_cuda_graphs(cases: dict, first: dict, sync) -> None:
    """A CUDA-graph replay of autocast and of each quantised level, next to its eager step; a
    configuration whose capture fails is reported on stderr and left out. The eager step's
    first call is timed into ``first`` before the capture warms it further, and the capture's
    seconds go in as the replay's first step."""
    for name in [k for k in cases if k.startswith(("autocast", "triton"))]:
        if _first_call(name, cases[name], first, sync) is _FAILED:
            continue
        replay = _first_call(f"{name}, CUDA graph", lambda: cuda_graphed(cases[name]), first, sync)
        if replay is not _FAILED:
            cases[f"{name}, CUDA graph"] = replay


def drop_failing(cases: dict, keys, first: dict, sync) -> None:
    """Runs the first step of each of ``keys`` (its seconds into ``first``); a configuration
    that raises is left out, so the others still make the table."""
    for key in keys:
        if _first_call(key, cases[key], first, sync) is _FAILED:
            del cases[key]


def _or_none(measure, key):
    try:
        return measure()
    except Exception as e:  # noqa: BLE001
        print(f"{key}: memory not measured: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
        return None


def eager_levels(cases: dict) -> dict:
    """Word length -> the configuration of the real route's eager step at it ("triton 8-bit",
    "aten 16-bit"): not emulated, compiled, graphed or through the master copy."""
    return {int(k.split()[1][:-len("-bit")]): k for k in cases
            if len(k.split()) == 2 and k.endswith("-bit") and not k.startswith("emulate")}


def host_profile(run, sync, steps: int = 3, top: int = 25) -> str:
    """Where the host's time goes in ``steps`` calls of ``run`` (``cProfile``, functions by their
    own time), for an eager GPU step the host cannot feed fast enough."""
    import cProfile
    import io
    import pstats

    run()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        run()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def device_profile(run, sync, cuda: bool, steps: int = 3, top: int = 25) -> str:
    """Kernels by their own time over ``steps`` calls of ``run`` (``torch.profiler``): device
    time on CUDA, where the Triton kernels show under their names next to cuDNN's and
    Inductor's; CPU time elsewhere."""
    from torch.profiler import ProfilerActivity, profile

    run()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            run()
        sync()
    return prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=top)


class _Reporting(dict):
    """Warm-up seconds per configuration, each also printed to stderr as it completes: the first
    step builds, tunes and caches the kernels, and a run stopped by a time limit still says
    where its time went."""

    def __init__(self, model: str):
        super().__init__()
        self.model = model

    def __setitem__(self, key, seconds):
        if key in self:  # the first call only (a CUDA-graph capture times its eager step first)
            return
        print(f"{self.model}: first step of {key}: {seconds:.2f} s", file=sys.stderr, flush=True)
        super().__setitem__(key, seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--levels", type=lambda v: tuple(int(b) for b in v.split(",")), default=(8, 12, 14, 16),
                   help="fixed-point levels to time, e.g. 8,16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--master", action="store_true",
                   help="add the 8-bit step with MasterCopyOptimizer around a fused SGD")
    p.add_argument("--fp16-grad-weight", action="store_true",
                   help="CUDA: add the 8-bit step with weight gradients on FP16 MMA (and its CUDA graph)")
    p.add_argument("--device-profile", action="store_true",
                   help="print the kernels' own device time in autocast bf16 and the 8/16-bit steps (torch.profiler)")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile of the 8-bit model (on CUDA also mode='reduce-overhead')")
    p.add_argument("--host-profile", action="store_true",
                   help="after the table, cProfile the eager 8-bit step (the host's share of it)")
    p.add_argument("--memory", action="store_true", help="add peak memory, one fresh process per configuration")
    p.add_argument("--saved", action="store_true", help="add the activation memory saved for backward")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on CUDA, add CUDA-graph replays of autocast and of each level (device time without the host's)")
    p.add_argument("--allocator", choices=("reuse", "default"), default="reuse",
                   help="reuse: keep freed CPU memory mapped (muppet_fx.reuse_cpu_memory) for all configurations")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one case, print its peak
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.allocator == "reuse":
        muppet_fx.reuse_cpu_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.only:
        return _only(args, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name in args.models.split(","):
        cases = make_cases(name, args.batch, device, args.compile, args.levels, args.master, args.fp16_grad_weight)
        first = _Reporting(name)
        drop_failing(cases, [k for k in cases if k.startswith("torch.compile")], first, sync)
        if args.cuda_graphs and device == "cuda":
            add_cuda_graphs(cases, first, sync)
        med = interleaved(cases, args.reps, sync=sync, first=first)
        base, amp = med["fp32 eager"], med["autocast bf16"]
        headers = ["configuration", "s/step", "speed-up vs fp32", "vs autocast", "first step s"]
        rows = [[k, v, base / v, amp / v, first[k]] for k, v in med.items()]
        if args.saved:
            headers += ["saved for backward MiB", "saved vs fp32"]
            saved = {k: _or_none(lambda k=k: saved_mib(cases[k]), k)
                     for k in med if not k.endswith("CUDA graph")}  # a replay saves nothing
            for row in rows:
                row += [saved[row[0]], saved[row[0]] / saved["fp32 eager"]] if saved.get(row[0]) is not None \
                    else [None, None]
        if args.memory:
            headers.append("peak MiB (RSS)" if device == "cpu" else "peak MiB allocated")
            for row in rows:
                row.append(None if row[0].endswith("CUDA graph") else _or_none(
                    lambda k=row[0]: cuda_peak_mib(cases[k]) if device == "cuda"
                    else peak_memory_mib(name, k, args.batch, args.threads, args.allocator, args.compile), row[0]))
        print(f"\n{name}, batch {args.batch}, {device}, threads {args.threads}, allocator {args.allocator}, "
              f"torch {torch.__version__}")
        print(tabulate(rows, headers=headers, floatfmt=".3f"))
        eager = eager_levels(cases)
        if args.device_profile:
            for key in ["autocast bf16", *(eager[b] for b in (8, 16) if b in eager)]:
                print(f"\n{name}: {'device' if device == 'cuda' else 'CPU'} profile of '{key}', 3 steps\n"
                      + device_profile(cases[key], sync, device == "cuda"))
        if args.host_profile and 8 in eager:
            print(f"\n{name}: host profile of '{eager[8]}', 3 steps\n" + host_profile(cases[eager[8]], sync))
        if not all(bool(torch.isfinite(q).all()) for q in cases.parameters):
            print("warning: the shared weights became NaN/inf during the run (a configuration diverged); "
                  "steps on non-finite values take other paths, so these ratios do not compare")


if __name__ == "__main__":
    main()
