"""Pack throughput and peak memory on a generated >= 2 GB checkpoint, next to baselines
measured in the same run.

    python benchmarks/pack.py [--layers 5] [--hidden 4096] [--intermediate 11008] [--keep DIR]

Generates a Llama-7B-shaped bf16 model directory (q/k/v/o 4096 x 4096, gate/up/down
4096 x 11008 per layer, a 32000 x 4096 embedding; ~2.2 GB with 5 layers, 2 shards) in a
temporary directory (in a subprocess, so this parent stays small), then runs each method
in its own subprocess (so peak RSS is that method's alone: ``VmHWM``, see ``peak_rss``):

- ``copy``: plain safetensors copy (``load_file`` + ``save_file`` per shard);
- ``fp8``: a plain torch per-channel FP8 pipeline: read each shard, every 2-D float
  tensor -> absmax/448 row scale, cast to float8_e4m3fn, ``save_file`` the shard;
- ``pack``: ``umqcli.pack.pack`` (k=1, fp8_e4m3, one scale per row) with its default
  two worker threads, measuring each tensor's error as the CLI does;
- ``pack-noerr``: the same without the error measurement;
- ``pack-serial``: no worker thread (everything on the calling thread).

Throughput is source bytes / wall seconds. Prints a table; deletes the data afterwards.
The targets (issue 3): pack >= 1.0x the fp8 pipeline; peak RSS <= 3 x largest tensor +
400 MB.

    python benchmarks/pack.py --cli [--repeat 3] [--keep DIR]

The user's view (issue 15): a 1 GiB float16 file (16 tensors of 4096 x 8192) packed by the
``umq pack SRC -o OUT`` command (k = 1, fp8_e4m3, its defaults) against a plain torch
script doing per-row FP8 (read with ``load_file``, cast, ``save_file``), each a fresh
process timed from start to exit (imports included), alternating, best of ``--repeat``.
Target: umq >= 1.0x the script's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("copy", "fp8", "pack", "pack-noerr", "pack-serial")


def generate(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    """Write the model with umq's streaming writer (one tensor in memory at a time)."""
    from umqcli.io import SafetensorsWriter, write_index

    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen).mul_(0.02)
        w[:, torch.randperm(cols, generator=gen)[: cols // 64]] *= 20.0  # outlier input channels
        return w.to(torch.bfloat16)

    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{n}.weight", (hidden, hidden)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        specs += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, intermediate))]
        specs += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    specs += [("model.norm.weight", (hidden,))]
    half = len(specs) // 2
    shards = {"model-00001-of-00002.safetensors": specs[:half], "model-00002-of-00002.safetensors": specs[half:]}
    weight_map, total = {}, 0
    for file, items in shards.items():
        writer = SafetensorsWriter(directory / file, [(n, torch.bfloat16, s) for n, s in items],
                                   metadata_reserve={"format": "pt"})
        with writer:
            for name, shape in items:
                tensor = weight(*shape) if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16)
                writer.write(name, tensor)
                weight_map[name] = file
                total += tensor.numel() * 2
            writer.close({"format": "pt"})
    write_index(directory, weight_map, total)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    largest = max(int(torch.tensor(s).prod()) * 2 for _, s in specs)
    return {"bytes": total, "largest": largest, "tensors": len(specs)}


def run_method(method: str, src: Path, out: Path) -> dict:
    """Runs inside the child process."""
    from safetensors.torch import load_file, save_file

    from umqcli.format import QuantParams
    from umqcli.pack import pack

    shard_files = sorted(src.glob("*.safetensors"))
    started = time.perf_counter()
    if method == "copy":
        out.mkdir()
        for f in shard_files:
            save_file(load_file(str(f)), str(out / f.name), metadata={"format": "pt"})
    elif method == "fp8":
        out.mkdir()
        for f in shard_files:
            result = {}
            for name, tensor in load_file(str(f)).items():
                if tensor.dim() == 2 and tensor.is_floating_point():
                    w = tensor.float()
                    scale = w.abs().amax(1, keepdim=True).div_(448.0)
                    q = (w / scale.clamp_min(1e-30)).clamp_(-448, 448).to(torch.float8_e4m3fn)
                    result[name + ".fp8"] = q
                    result[name + ".scale"] = scale
                else:
                    result[name] = tensor
            save_file(result, str(out / f.name), metadata={"format": "pt"})
    else:
        pack(src, out, params=QuantParams(k=1), with_error=method != "pack-noerr",
             workers=0 if method == "pack-serial" else 2)
    seconds = time.perf_counter() - started
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": seconds, "max_rss": peak_rss(), "out_bytes": out_bytes}


# The plain per-row FP8 pipeline a user would write instead of umq (--cli).
FP8_SCRIPT = """
import sys
import torch
from safetensors.torch import load_file, save_file

result = {}
for name, tensor in load_file(sys.argv[1]).items():
    w = tensor.float()
    scale = w.abs().amax(1, keepdim=True).div_(448.0)
    result[name + ".fp8"] = (w / scale.clamp_min(1e-30)).clamp_(-448, 448).to(torch.float8_e4m3fn)
    result[name + ".scale"] = scale
save_file(result, sys.argv[2], metadata={"format": "pt"})
"""


def generate_file(path: Path, tensors: int = 16, rows: int = 4096, cols: int = 8192) -> int:
    """One float16 .safetensors file of ``tensors`` weights (1 GiB by default)."""
    from umqcli.io import SafetensorsWriter

    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.weight" for i in range(tensors)]
    writer = SafetensorsWriter(path, [(n, torch.float16, (rows, cols)) for n in names], metadata_reserve={"format": "pt"})
    with writer:
        for name in names:
            w = torch.randn(rows, cols, generator=gen).mul_(0.02)
            w[:, torch.randperm(cols, generator=gen)[: cols // 64]] *= 20.0  # outlier input channels
            writer.write(name, w.to(torch.float16))
        writer.close({"format": "pt"})
    return tensors * rows * cols * 2


def run_cli(work: Path, repeat: int) -> None:
    """``umq pack`` as a command vs the plain FP8 script, process start included."""
    src = work / "weights.safetensors"
    if not src.exists():
        generate_file(src)
    size = src.stat().st_size
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    commands = {
        "fp8 script": [sys.executable, "-c", FP8_SCRIPT, str(src), str(work / "fp8.safetensors")],
        "umq pack": [sys.executable, "-c", "import sys; from umqcli.cli import main; sys.argv[0] = 'umq'; main()",
                     "pack", str(src), "-o", str(work / "umq.safetensors"), "--force"],
    }
    print(f"source: {size / 2**30:.2f} GiB float16, 16 x 4096 x 8192; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    best: dict[str, float] = {}
    for attempt in range(repeat):
        for label, command in commands.items():
            with open(src, "rb") as fh:  # same start for both: the source in the page cache
                while fh.read(1 << 26):
                    pass
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
            best[label] = min(best.get(label, seconds), seconds)
            print(f"  run {attempt + 1} {label:<10} {seconds:6.2f} s", flush=True)
    (work / "fp8.safetensors").unlink(missing_ok=True)
    (work / "umq.safetensors").unlink(missing_ok=True)
    base = best["fp8 script"]
    print()
    print("| process (start to exit) | best seconds | MB/s | vs fp8 script |")
    print("| --- | ---: | ---: | ---: |")
    for label, seconds in best.items():
        print(f"| {label} | {seconds:.2f} | {size / 1e6 / seconds:.0f} | {base / seconds:.2f}x |")


def peak_rss() -> int:
    """This process's peak resident memory in bytes since it exec'd.

    ``VmHWM`` from /proc (Linux): ``getrusage().ru_maxrss`` is not used because Linux
    carries the parent's high-water mark over fork + exec, so a child started by a big
    parent would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--keep", type=Path, help="use/keep the generated model here instead of a temp dir")
    parser.add_argument("--cli", action="store_true", help="umq pack (the command) vs a plain FP8 script on 1 GiB")
    parser.add_argument("--repeat", type=int, default=3, help="--cli: runs of each, the best counts")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SRC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        path, *dims = args.generate
        print(json.dumps(generate(Path(path), *map(int, dims))))
        return
    if args.child:
        method, src, out = args.child
        print(json.dumps(run_method(method, Path(src), Path(out))))
        return

    work = Path(tempfile.mkdtemp(prefix="umq-bench-pack-")) if args.keep is None else args.keep
    if args.cli:
        work.mkdir(parents=True, exist_ok=True)
        try:
            run_cli(work, args.repeat)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        return
    try:
        model = work / "model"
        started = time.perf_counter()
        if (model / "model.safetensors.index.json").exists():
            from umqcli.io import open_checkpoint

            with open_checkpoint(model) as ckpt:
                info = {"bytes": sum(ckpt.entry(n).nbytes for n in ckpt.names()),
                        "largest": max(ckpt.entry(n).nbytes for n in ckpt.names()), "tensors": len(ckpt.names())}
        else:
            child = subprocess.run([sys.executable, __file__, "--generate", str(model), str(args.layers),
                                    str(args.hidden), str(args.intermediate), str(args.vocab)],
                                   capture_output=True, text=True, check=True)
            info = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"checkpoint: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB bf16 in 2 shards, largest "
              f"tensor {info['largest'] / 1e6:.0f} MB (generated in {time.perf_counter() - started:.0f} s); "
              f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results = {}
        for method in args.methods.split(","):
            out = work / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            # Same start for everyone: the source in the page cache.
            for f in model.glob("*.safetensors"):
                with open(f, "rb") as fh:
                    while fh.read(1 << 26):
                        pass
            child = subprocess.run([sys.executable, __file__, "--child", method, str(model), str(out)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                print(f"{method}: failed\n{child.stderr[-2000:]}", flush=True)
                continue
            results[method] = json.loads(child.stdout.strip().splitlines()[-1])
            shutil.rmtree(out, ignore_errors=True)
            r = results[method]
            print(f"  {method:<12} {r['seconds']:7.1f} s  {info['bytes'] / 1e6 / r['seconds']:7.0f} MB/s  "
                  f"peak RSS {r['max_rss'] / 1e6:6.0f} MB  out {r['out_bytes'] / 1e9:.2f} GB", flush=True)
        base = results.get("fp8")
        limit = 3 * info["largest"] + 400e6
        print()
        print(f"| method | seconds | MB/s | vs fp8 pipeline | peak RSS (MB) | RSS / (3 x largest + 400 MB) | output (GB) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for method, r in results.items():
            speed = info["bytes"] / 1e6 / r["seconds"]
            ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
            print(f"| {method} | {r['seconds']:.1f} | {speed:.0f} | {ratio} | {r['max_rss'] / 1e6:.0f} | "
                  f"{r['max_rss'] / limit:.2f} | {r['out_bytes'] / 1e9:.2f} |")
        print(f"\nlargest tensor {info['largest'] / 1e6:.0f} MB -> RSS limit 3 x largest + 400 MB = {limit / 1e6:.0f} MB")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
