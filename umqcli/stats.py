"""Activation statistics: what the inputs of each linear layer look like, per channel.

``umq calibrate`` runs a model on real text and records, for every weight tensor ``W``
(named as in the checkpoint, e.g. ``encoder.layer.0.attention.self.query.weight``) of
shape ``[R, C]``, statistics of the ``C`` input channels that multiply it. They are stored
in an ordinary safetensors file:

| tensor | dtype | shape | content |
| --- | --- | --- | --- |
| ``W.act_sq`` | float32 | ``[C]`` | mean of ``x_j^2`` over all rows seen (E[x_j^2]) |
| ``W.absmax`` | float32 | ``[C]`` | largest ``|x_j|`` seen |
| ``W.outliers`` | int64 | ``[C]`` | how many rows had ``|x_j| > 6.0`` (LLM.int8 outlier features) |
| ``W.sample`` | float32 | ``[S, C]`` | ``S`` real input rows, a uniform sample (seeded) |
| ``W.hessian`` | float32 | ``[C, C]`` | ``E[x x^T]``, optional (version 2), stored once per distinct input |

Header metadata (strings): ``umq.stats`` = ``"2"`` (the version; ``"1"`` files, without
Hessians, still load), ``tokens`` (rows seen
by the layer that saw most), ``samples`` (sequences run), ``seed``, ``source`` (model and
data), ``outlier_threshold``, ``rows``: a JSON object ``W -> rows seen``, and (version 2,
when Hessians were collected) ``hessians``: a JSON object ``W -> the weight whose
``.hessian`` tensor holds W's input Hessian``. Layers that read the same input (q, k and v
projections; gate and up) share one Hessian: the GPTQ method (:mod:`umqcli.gptq`) needs
``H = E[x x^T]`` per input, and an input of width C costs ``4 C^2`` bytes (float32).

The statistics are streamed (:class:`ActivationAccumulator`): running sums in float64,
a running max and count, and a fixed-size sample; memory is ``O(C * S)`` per tensor no
matter how much text is run. Nothing here prints.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch

from .errors import UMQError

STATS_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
OUTLIER_THRESHOLD = 6.0  # LLM.int8 (Dettmers et al. 2022): |x| > 6 marks an outlier feature

META_VERSION = "umq.stats"
ACT_SQ = "act_sq"
ABSMAX = "absmax"
OUTLIERS = "outliers"
SAMPLE = "sample"
FIELDS = (ACT_SQ, ABSMAX, OUTLIERS, SAMPLE)
HESSIAN = "hessian"  # optional, version 2
_FIELD_DTYPES = {ACT_SQ: torch.float32, ABSMAX: torch.float32, OUTLIERS: torch.int64, SAMPLE: torch.float32}


@dataclass(frozen=True)
class ChannelStats:
    """Input-channel statistics of one weight ``[R, C]``.

    - ``act_sq``: float32 ``[C]``, E[x_j^2] over every row seen.
    - ``absmax``: float32 ``[C]``, max |x_j|.
    - ``outliers``: int64 ``[C]``, number of rows with ``|x_j| > 6.0``.
    - ``sample``: float32 ``[S, C]``, real input rows (may be ``[0, C]``).
    - ``rows``: how many input rows (tokens) the statistics cover (0 if unknown).
    - ``hessian``: float32 ``[C, C]``, ``E[x x^T]`` over every row seen, or None (not
      collected); the same tensor object for weights that read the same input.
    """

    act_sq: torch.Tensor
    absmax: torch.Tensor
    outliers: torch.Tensor
    sample: torch.Tensor
    rows: int = 0
    hessian: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.act_sq.shape[0])

    @property
    def outlier_channels(self) -> int:
        """How many channels ever exceeded the outlier threshold."""
        return int((self.outliers > 0).sum())

    def check(self, name: str | None = None, file: str | Path | None = None) -> None:
        """Raise :class:`UMQError` (rule ``stats``) unless dtypes and shapes agree."""
        channels = self.act_sq.shape[0] if self.act_sq.dim() == 1 else -1
        for field, tensor in zip(FIELDS, (self.act_sq, self.absmax, self.outliers, self.sample)):
            expected_dim = 2 if field == SAMPLE else 1
            if tensor.dtype != _FIELD_DTYPES[field] or tensor.dim() != expected_dim or tensor.shape[-1] != channels:
                raise UMQError(
                    f"{field} has dtype {tensor.dtype} and shape {tuple(tensor.shape)}; expected "
                    f"{_FIELD_DTYPES[field]} with {channels} channels ({expected_dim}-D)",
                    rule="stats",
                    file=file,
                    tensor=name,
                )
        if not bool(torch.isfinite(self.act_sq).all()) or bool((self.act_sq < 0).any()):
            raise UMQError("act_sq holds negative or non-finite values", rule="stats", file=file, tensor=name)
        if self.hessian is not None and (self.hessian.dtype != torch.float32
                                         or tuple(self.hessian.shape) != (channels, channels)):
            raise UMQError(f"hessian has dtype {self.hessian.dtype} and shape {tuple(self.hessian.shape)}; "
                           f"expected float32 ({channels}, {channels})", rule="stats", file=file, tensor=name)

    @classmethod
    def uniform(cls, channels: int) -> "ChannelStats":
        """Statistics that weight every channel equally (act_sq = 1): the weights-only case."""
        return cls(
            act_sq=torch.ones(channels, dtype=torch.float32),
            absmax=torch.zeros(channels, dtype=torch.float32),
            outliers=torch.zeros(channels, dtype=torch.int64),
            sample=torch.zeros(0, channels, dtype=torch.float32),
            rows=0,
        )


# --------------------------------------------------------------------------- accumulate


def _stream_seed(seed: int) -> int:
    # One generator per tensor, all seeded alike: the sample of one layer does not depend
    # on the order in which hooks of other layers fire, and layers that see the same rows
    # (q, k and v) keep the same sampled rows (the same tokens).
    return int(seed) % (2**63 - 1)


class _Running:
    """Running statistics of one tensor's inputs (float64 sums, bottom-S sample)."""

    def __init__(self, name: str, channels: int, sample_rows: int, seed: int, threshold: float) -> None:
        self.channels = channels
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)
        self.absmax = torch.zeros(channels, dtype=torch.float32)
        self.outliers = torch.zeros(channels, dtype=torch.int64)
        self.rows = 0
        self.sample_rows = sample_rows
        self.threshold = threshold
        self.generator = torch.Generator().manual_seed(_stream_seed(seed))
        # Bottom-S sampling: every row gets a uniform random key; the S smallest keys are a
        # uniform sample without replacement of all rows seen, computable batch by batch.
        self.keys = torch.empty(0, dtype=torch.float64)
        self.index = torch.empty(0, dtype=torch.int64)
        self.sample = torch.empty(0, channels, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        rows = x.shape[0]
        if rows == 0:
            return
        # One batch's sum in float32 (torch's reductions are pairwise: relative error
        # ~1e-7 for any batch size here), the running total in float64.
        self.sum_sq += x.square().sum(0).double()
        low, high = torch.aminmax(x, dim=0)
        batch_absmax = torch.maximum(high, low.neg_())
        torch.maximum(self.absmax, batch_absmax, out=self.absmax)
        hot = (batch_absmax > self.threshold).nonzero().squeeze(1)  # outliers are rare: count only there
        if hot.numel():
            self.outliers[hot] += (x[:, hot].abs() > self.threshold).sum(0)
        if self.sample_rows:
            keys = torch.rand(rows, generator=self.generator, dtype=torch.float64)
            index = torch.arange(self.rows, self.rows + rows, dtype=torch.int64)
            all_keys = torch.cat([self.keys, keys])
            keep = all_keys.topk(min(self.sample_rows, all_keys.numel()), largest=False).indices
            old = self.keys.numel()
            from_old = keep[keep < old]
            from_new = keep[keep >= old] - old
            self.keys = torch.cat([self.keys[from_old], keys[from_new]])
            self.index = torch.cat([self.index[from_old], index[from_new]])
            self.sample = torch.cat([self.sample[from_old], x[from_new]])
        self.rows += rows

    def result(self) -> ChannelStats:
        order = self.index.argsort()  # sample rows in the order they were seen
        mean_sq = (self.sum_sq / max(self.rows, 1)).to(torch.float32)
        return ChannelStats(
            act_sq=mean_sq,
            absmax=self.absmax.clone(),
            outliers=self.outliers.clone(),
            sample=self.sample[order].contiguous(),
            rows=self.rows,
        )


class ActivationAccumulator:
    """Streaming per-channel statistics of the inputs of many weights.

    ``update(name, x)`` takes float ``[N, C]`` rows (any leading shape is flattened) for
    the weight ``name``; ``result()`` returns ``{name: ChannelStats}``. Memory per weight is
    three ``[C]`` vectors plus the ``[sample_rows, C]`` sample, independent of N. For a
    given seed, the same rows in the same order give bit-identical statistics.
    """

    def __init__(self, *, sample_rows: int = 128, seed: int = 0, outlier_threshold: float = OUTLIER_THRESHOLD) -> None:
        # Hessians: running float32 sums of x^T x per distinct input (the key), the rows
        # they cover, and which key each weight reads.
        self._hessian_sums: dict[str, torch.Tensor] = {}
        self._hessian_rows: dict[str, int] = {}
        self._hessian_of: dict[str, str] = {}
        self._same_as: dict[str, str] = {}  # weight -> the weight whose input rows it shares
        self._names: dict[str, None] = {}  # every weight, in the order first seen
        if sample_rows < 0:
            raise UMQError(f"sample_rows must be >= 0, got {sample_rows}", rule="stats")
        self.sample_rows = sample_rows
        self.seed = seed
        self.outlier_threshold = outlier_threshold
        self._running: dict[str, _Running] = {}

    def update(self, name: str, x: torch.Tensor, *, hessian_key: str | None = None,
               same_input_as: str | None = None) -> None:
        """Add input rows ``x`` (float ``[..., C]``) of weight ``name``. With
        ``hessian_key`` also ``x^T x`` into the Hessian of that key, once per call for the
        first weight of the key (weights that read the same input name the same key and
        pass the same rows; only the key's own weight adds them).

        ``same_input_as``: another weight that was handed these very rows just before
        (q/k/v, gate/up): ``name`` then gets that weight's statistics without computing
        them again (a copy in :meth:`result`). It must name the same weight on every call."""
        self._names.setdefault(name)
        if same_input_as is not None and same_input_as != name:
            if self._same_as.setdefault(name, same_input_as) != same_input_as or name in self._running:
                raise UMQError(f"shares its input with {same_input_as} now, not before", rule="stats", tensor=name)
            if hessian_key is not None:
                self._hessian_of.setdefault(name, hessian_key)
            return
        x = x.reshape(-1, x.shape[-1])
        if hessian_key is not None:
            self._hessian_of.setdefault(name, hessian_key)
            if hessian_key == name:
                x32 = x.detach().to(torch.float32)
                total = self._hessian_sums.get(name)
                if total is None:
                    total = self._hessian_sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32)
                    self._hessian_rows[name] = 0
                total.addmm_(x32.T, x32)
                self._hessian_rows[name] += x32.shape[0]
        running = self._running.get(name)
        if running is None:
            running = _Running(name, x.shape[-1], self.sample_rows, self.seed, self.outlier_threshold)
            self._running[name] = running
        elif running.channels != x.shape[-1]:
            raise UMQError(
                f"input has {x.shape[-1]} channels, earlier inputs had {running.channels}",
                rule="stats",
                tensor=name,
            )
        running.update(x)

    def names(self) -> list[str]:
        return list(self._names)

    def result(self) -> dict[str, ChannelStats]:
        hessians = {key: total / max(self._hessian_rows[key], 1) for key, total in self._hessian_sums.items()}
        computed = {name: running.result() for name, running in self._running.items()}
        out = {}
        for name in self.names():
            if name in computed:
                item = computed[name]
            else:  # its own tensors (a stats file may not hold one tensor twice)
                source = computed[self._same_as[name]]
                item = replace(source, act_sq=source.act_sq.clone(), absmax=source.absmax.clone(),
                               outliers=source.outliers.clone(), sample=source.sample.clone())
            key = self._hessian_of.get(name)
            if key in hessians and hessians[key].shape[0] == item.channels:
                item = replace(item, hessian=hessians[key])
            out[name] = item
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the running state (for the bounded-memory check)."""
        total = 0
        for r in self._running.values():
            for t in (r.sum_sq, r.absmax, r.outliers, r.keys, r.index, r.sample):
                total += t.numel() * t.element_size()
        return total + sum(t.numel() * t.element_size() for t in self._hessian_sums.values())


# --------------------------------------------------------------------------- file


def save_stats(path: str | Path, stats: Mapping[str, ChannelStats], metadata: Mapping[str, object] | None = None) -> None:
    """Write ``stats`` to ``path`` atomically (temp file in the same directory, renamed).

    ``metadata`` values are stored as strings; ``umq.stats`` and ``rows`` are added.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, item in stats.items():
        item.check(name)
        tensors[f"{name}.{ACT_SQ}"] = item.act_sq.contiguous()
        tensors[f"{name}.{ABSMAX}"] = item.absmax.contiguous()
        tensors[f"{name}.{OUTLIERS}"] = item.outliers.contiguous()
        tensors[f"{name}.{SAMPLE}"] = item.sample.contiguous()
    # One .hessian tensor per distinct Hessian object, under the first weight holding it.
    owners: dict[int, str] = {}
    hessian_of: dict[str, str] = {}
    for name, item in stats.items():
        if item.hessian is not None:
            owner = owners.setdefault(id(item.hessian), name)
            hessian_of[name] = owner
            if owner == name:
                tensors[f"{name}.{HESSIAN}"] = item.hessian.contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[META_VERSION] = STATS_VERSION
    meta["rows"] = json.dumps({name: int(item.rows) for name, item in stats.items()}, separators=(",", ":"))
    if hessian_of:
        meta["hessians"] = json.dumps(hessian_of, separators=(",", ":"))
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stats_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a statistics file's bytes: how a recipe names the exact statistics
    it was calibrated with."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_stats_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a stats file (validated version), without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UMQError("statistics file not found", rule="stats-file", file=path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise UMQError(f"not a safetensors file ({exc})", rule="stats-file", file=path) from None
    version = metadata.get(META_VERSION)
    if version is None:
        raise UMQError("not an activation statistics file (no umq.stats metadata; made by umq calibrate?)",
                       rule="stats-version", file=path)
    if version not in READABLE_VERSIONS:
        raise UMQError(f"umq.stats version {version!r} is not supported (this reader knows "
                       f"{', '.join(READABLE_VERSIONS)})",
                       rule="stats-version", file=path)
    return dict(metadata)


def load_stats(path: str | Path) -> dict[str, ChannelStats]:
    """Read a stats file written by :func:`save_stats`: ``{weight name: ChannelStats}``.

    Raises :class:`UMQError` naming the file (and tensor) for a missing file, a file that
    is not safetensors, an unknown ``umq.stats`` version, or a weight whose four tensors
    are missing or disagree in dtype/shape.
    """
    from safetensors import safe_open

    path = Path(path)
    metadata = read_stats_metadata(path)
    try:
        rows = json.loads(metadata.get("rows", "{}"))
    except json.JSONDecodeError:
        rows = {}
    fields: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            name, _, field = key.rpartition(".")
            if field not in FIELDS + (HESSIAN,) or not name:
                raise UMQError(f"unexpected tensor {key!r} (expected NAME.{{{','.join(FIELDS)}}})",
                               rule="stats", file=path, tensor=key)
            fields.setdefault(name, {})[field] = handle.get_tensor(key)
    result: dict[str, ChannelStats] = {}
    for name, parts in fields.items():
        missing = [f for f in FIELDS if f not in parts]
        if missing:
            raise UMQError(f"missing {', '.join(name + '.' + m for m in missing)}", rule="stats", file=path, tensor=name)
        item = ChannelStats(parts[ACT_SQ], parts[ABSMAX], parts[OUTLIERS], parts[SAMPLE], int(rows.get(name, 0)))
        item.check(name, path)
        result[name] = item
    try:
        hessian_of = json.loads(metadata.get("hessians", "{}"))
    except json.JSONDecodeError:
        raise UMQError("the hessians metadata is not valid JSON", rule="stats", file=path) from None
    for name, owner in hessian_of.items():
        hessian = fields.get(owner, {}).get(HESSIAN)
        if name not in result or hessian is None:
            raise UMQError(f"hessians names {owner}.{HESSIAN}, which the file lacks", rule="stats",
                           file=path, tensor=name)
        result[name] = replace(result[name], hessian=hessian)
        result[name].check(name, path)
    return result

