"""The fused CPU runtime (``umqcli.runtime``) against dense and int8 weight-only linears.

Layer table (default): for each ``M x C x R`` shape (tokens x in x out) and each lo format
(k = 1, one scale per row), times in one run, at 1 and at 2 threads, on random weights of
``--weights`` dtype (float32: packed with float16 hi values; bfloat16, as LLM checkpoints
ship: bfloat16 hi values; every baseline multiplies the same values):

- ``fp32``: ``F.linear`` float32 (x float32, W float32);
- ``bf16``: ``F.linear`` bfloat16 (x, W bfloat16);
- ``int8 WO``: ``torch._weight_int8pack_mm`` (x bfloat16, W int8 with one bfloat16 scale
  per row: the same weights, round-to-nearest absmax per row);
- ``UMQ``: ``UMQLinear`` (backend auto: the fused runtime; x float32; x bfloat16 for the
  ``UMQ bf16x`` column), weights kept packed;

plus resident weight bytes and the ratios ``speed(UMQ) / speed(baseline)`` (> 1: UMQ is
faster; ``bf16x/bf16``: UMQ with bfloat16 activations against bfloat16 ``F.linear``, like for
like). Times: best of ``--repeat`` calls after a warm-up (the least disturbed run on a
shared machine), milliseconds. A roofline: the machine's read bandwidth measured in the
same run (a sum over 256 MiB, at each thread count) and, per row, the time int8 WO's and
UMQ's weight bytes take at that speed ("floor"), and int8 WO's measured time over UMQ's
floor ("ceil": the best "vs WO" any kernel reading UMQ's bytes could show in this run).

Small layers (SmolLM2-135M's shapes, M = 1): per-call microseconds of the same baselines
and of UMQLinear, next to its C kernel called alone, so "call - kernel" is what the
Python side adds per layer.

End to end (``--e2e``): SmolLM2-135M-Instruct (``examples/smollm2.py``, bfloat16 source)
as (a) dense float32, (b) int8 weight-only linears (``_weight_int8pack_mm``, bfloat16
activations) and (c) packed with ``umq pack`` (k = 1, int8 lo, every linear layer) and
loaded with ``load_hf`` (float32 activations, and bfloat16); greedy generation of
``--new-tokens`` tokens from one prompt, tokens/s (best of ``--e2e-repeat``), and the
generated texts side by side.

    python benchmarks/runtime.py [--shapes 1x4096x4096,...] [--small-shapes 576x192,...] [--threads 1 2] [--repeat 20]
    python benchmarks/runtime.py --e2e [--new-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from umqcli import runtime
from umqcli.codec import quantize
from umqcli.format import QuantParams
from umqcli.nn import UMQLinear

from _timing import time_ms

DEFAULT_SHAPES = "1x4096x4096,1x4096x11008,16x4096x4096,512x2048x2048"
SMALL_SHAPES = "576x192,576x576,576x1536,1536x576"
"""SmolLM2-135M's linear layers (C x R): k/v, q/o, gate/up, down projections."""


def int8_weight_only(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[R, C]`` and bfloat16 per-row scales for ``torch._weight_int8pack_mm``."""
    scale = weight.float().abs().amax(1).clamp(min=1e-12) / 127
    q = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with int8 weights (per-row scales) through ``_weight_int8pack_mm``;
    activations run in bfloat16, the output is cast back to the input dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = int8_weight_only(linear.weight.detach())
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), False)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def read_bandwidth(threads: int, repeat: int = 5) -> float:
    """Bytes per second this machine streams from memory at ``threads`` threads: the best
    of ``repeat`` sums of a 256 MiB float32 tensor (far beyond the caches)."""
    torch.set_num_threads(threads)
    big = torch.ones(64 * 2**20)
    return big.numel() * 4 / (time_ms(lambda: big.sum(), repeat) / 1000)


def layer_table(shapes: str, threads: list[int], repeat: int, source: torch.dtype = torch.float32) -> None:
    torch.manual_seed(0)
    hi = "bfloat16" if source == torch.bfloat16 else "float16"
    print(
        f"torch {torch.__version__}, runtime path {runtime.select_isa()}, k=1, one scale per row, {source} source "
        f"weights (hi {hi}), best of {repeat}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    bandwidth = {n: read_bandwidth(n) for n in threads}
    print(
        "read bandwidth (sum of 256 MiB): "
        + ", ".join(f"{n} thread(s) {bw / 1e9:.1f} GB/s" for n, bw in bandwidth.items())
        + "; 'floor' columns: the weight bytes at that speed (no kernel is faster once they stream from memory), "
        "'ceil' = int8 WO's time / UMQ's floor: the best 'vs WO' reachable in this run"
    )
    header = (
        f"{'M x C x R':>15} {'lo':>8} {'thr':>3} | {'fp32':>8} {'bf16':>8} {'int8 WO':>8} {'UMQ':>8} {'UMQ bf16x':>9} | "
        f"{'vs fp32':>7} {'vs bf16':>7} {'vs WO':>6} {'bf16x/bf16':>10} | {'WO flr':>6} {'UMQ flr':>7} {'ceil':>5} | "
        f"{'MiB fp32':>8} {'bf16':>6} {'WO':>6} {'UMQ':>6}"
    )
    print(header)
    print("-" * len(header))
    mib = lambda n: f"{n / 2**20:6.1f}"  # noqa: E731
    for shape in shapes.split(","):
        m, c, r = (int(v) for v in shape.lower().split("x"))
        weight = torch.randn(r, c) * 0.02
        weight[:, ::37] *= 10.0  # a few outlier input channels, as in real weights
        weight = weight.to(source).float()  # every baseline multiplies the same values
        x = torch.randn(m, c)
        x_bf16, w_bf16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        q, q_scale = int8_weight_only(weight)
        for lo in ("int8", "fp8_e4m3"):
            layer = UMQLinear.from_packed(quantize(weight.to(source), QuantParams(k=1, lo=lo)))
            for n in threads:
                torch.set_num_threads(n)
                with torch.inference_mode():
                    t_fp32 = time_ms(lambda: F.linear(x, weight), repeat)
                    t_bf16 = time_ms(lambda: F.linear(x_bf16, w_bf16), repeat)
                    t_wo = time_ms(lambda: torch._weight_int8pack_mm(x_bf16, q, q_scale), repeat)
                    t_umq = time_ms(lambda: layer(x), repeat)
                    path = runtime.last_path()
                    t_umq_bf16 = time_ms(lambda: layer(x_bf16), repeat)
                    path_bf16 = runtime.last_path()
                wo_bytes, umq_bytes = r * c + 2 * r, layer.weight.nbytes
                floor_wo, floor_umq = (1000 * b / bandwidth[n] for b in (wo_bytes, umq_bytes))
                print(
                    f"{shape:>15} {lo:>8} {n:>3} | {t_fp32:8.3f} {t_bf16:8.3f} {t_wo:8.3f} {t_umq:8.3f} {t_umq_bf16:9.3f} | "
                    f"{t_fp32 / t_umq:6.2f}x {t_bf16 / t_umq:6.2f}x {t_wo / t_umq:5.2f}x {t_bf16 / t_umq_bf16:9.2f}x | "
                    f"{floor_wo:6.3f} {floor_umq:7.3f} {t_wo / floor_umq:4.2f}x | "
                    f"{mib(4 * r * c):>8} {mib(2 * r * c)} {mib(wo_bytes)} {mib(umq_bytes)}  {path}, bf16x {path_bf16}"
                )


def small_layer_table(shapes: str, threads: list[int], repeat: int) -> None:
    """Per-call time of SmolLM2-sized layers at M = 1, microseconds (median: these calls
    are short enough that the best run hides the Python cost). ``kernel`` is the C call
    alone (no Python work but the ctypes call); ``call - kernel`` is what UMQLinear adds.
    Weights are bfloat16, as SmolLM2's, so the hi values are bfloat16 (the layer table's
    float32 weights get float16 hi values, a slower decode)."""
    torch.manual_seed(0)
    print(f"\nSmall layers, M = 1, bfloat16 weights, k=1 int8 (hi bfloat16), with bias, median of {repeat * 50} "
          "calls, microseconds")
    header = (
        f"{'C x R':>10} {'thr':>3} | {'fp32':>7} {'bf16':>7} {'int8 WO':>7} | {'UMQ f32x':>8} {'UMQ bf16x':>9} "
        f"{'kernel':>7} {'call-kernel':>11} | {'vs WO (bf16x)':>13} {'vs fp32':>7}"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes.split(","):
        c, r = (int(v) for v in shape.lower().split("x"))
        weight = (torch.randn(r, c) * 0.02).to(torch.bfloat16).float()
        bias = torch.randn(r)
        x = torch.randn(1, c)
        x_bf16, w_bf16, bias_bf16 = x.to(torch.bfloat16), weight.to(torch.bfloat16), bias.to(torch.bfloat16)
        q, q_scale = int8_weight_only(weight)
        layer = UMQLinear.from_packed(quantize(weight.to(torch.bfloat16), QuantParams(k=1, lo="int8")), bias)
        layer_bf16 = UMQLinear.from_packed(layer.packed, bias_bf16)
        out = torch.empty(1, r)
        for n in threads:
            torch.set_num_threads(n)
            with torch.inference_mode():
                layer(x)
                launch = layer._launch
                n_calls = repeat * 50
                t = {
                    "fp32": time_ms(lambda: F.linear(x, weight, bias), n_calls, stat="median"),
                    "bf16": time_ms(lambda: F.linear(x_bf16, w_bf16, bias_bf16), n_calls, stat="median"),
                    "wo": time_ms(lambda: torch._weight_int8pack_mm(x_bf16, q, q_scale).add_(bias_bf16), n_calls,
                                  stat="median"),
                    "umq": time_ms(lambda: layer(x), n_calls, stat="median"),
                    "umq_bf16": time_ms(lambda: layer_bf16(x_bf16), n_calls, stat="median"),
                    "kernel": time_ms(lambda: launch.run_raw(x, out, n), n_calls, stat="median"),
                }
            us = {key: 1000 * v for key, v in t.items()}
            print(
                f"{shape:>10} {n:>3} | {us['fp32']:7.1f} {us['bf16']:7.1f} {us['wo']:7.1f} | {us['umq']:8.1f} "
                f"{us['umq_bf16']:9.1f} {us['kernel']:7.1f} {us['umq'] - us['kernel']:11.1f} | "
                f"{us['wo'] / us['umq_bf16']:12.2f}x {us['fp32'] / us['umq']:6.2f}x"
            )


# --------------------------------------------------------------------------- end to end


def _examples():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import smollm2

    return smollm2


def _generate(model, tokenizer, prompt: str, new_tokens: int, repeat: int) -> tuple[float, str]:
    inputs = tokenizer(prompt, return_tensors="pt")
    best, text = float("inf"), ""
    for _ in range(repeat):
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            best = min(best, time.perf_counter() - start)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return new_tokens / best, text


def end_to_end(threads: int, new_tokens: int, repeat: int) -> None:
    import transformers

    from umqcli import load_hf
    from umqcli.nn import weight_memory
    from umqcli.pack import pack

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    source = _examples().cached_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    prompt = "The three most important things to know about the history of the printing press are"
    models: dict[str, nn.Module] = {}
    models["dense fp32"] = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    wo = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    for name, module in list(wo.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(wo.get_submodule(parent), child, Int8WeightOnlyLinear(module))
    models["int8 WO (bf16 x)"] = wo
    with tempfile.TemporaryDirectory() as tmp:
        packed_dir = Path(tmp) / "smollm2.umq"
        pack(source, packed_dir, params=QuantParams(k=1, lo="int8"), with_error=False)
        models["UMQ k=1 int8 (fp32 x)"] = load_hf(packed_dir, dtype=torch.float32)
        models["UMQ k=1 int8 (bf16 x)"] = load_hf(packed_dir, dtype=torch.bfloat16)
    print(
        f"SmolLM2-135M-Instruct, greedy, {new_tokens} new tokens, {threads} thread(s), best of {repeat}, "
        f"runtime path {runtime.select_isa()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"prompt: {prompt!r}")
    results = {}
    for name, model in models.items():
        results[name] = _generate(model, tokenizer, prompt, new_tokens, repeat)
    base_fp32 = results["dense fp32"][0]
    base_wo = results["int8 WO (bf16 x)"][0]
    print(f"{'model':>24} | {'tokens/s':>8} | {'vs fp32':>7} | {'vs int8 WO':>10} | {'weights MiB':>11}")
    for name, (speed, _) in results.items():
        memory = weight_memory(models[name]).total / 2**20
        print(f"{name:>24} | {speed:8.2f} | {speed / base_fp32:6.2f}x | {speed / base_wo:9.2f}x | {memory:11.1f}")
    print()
    for name, (_, text) in results.items():
        print(f"{name:>24}: {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="comma-separated MxCxR (tokens x in x out); empty: skip the layer table")
    parser.add_argument("--small-shapes", default=SMALL_SHAPES,
                        help="comma-separated CxR at M = 1; empty: skip the small-layer table")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--weights", choices=("float32", "bfloat16"), default="float32",
                        help="source dtype of the layer table's weights: float32 packs float16 hi values, "
                        "bfloat16 (as LLM checkpoints) bfloat16 hi values (a faster decode)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--e2e", action="store_true", help="generation with SmolLM2 instead of the layer table")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--e2e-repeat", type=int, default=3)
    args = parser.parse_args()
    if args.e2e:
        end_to_end(max(args.threads), args.new_tokens, args.e2e_repeat)
    else:
        if args.shapes:
            layer_table(args.shapes, args.threads, args.repeat, getattr(torch, args.weights))
        if args.small_shapes:
            small_layer_table(args.small_shapes, args.threads, args.repeat)


if __name__ == "__main__":
    main()
