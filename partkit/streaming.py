"""Training samples streamed from shards: memory bounded by a shuffle buffer, not by the dataset.

The stream is a pure function of ``(seed, epoch)``: each epoch visits the shards in a seeded order
and passes their samples through a seeded shuffle buffer (the webdataset idioms). Epochs follow
one another without end, so the stream is a sequence of *positions*; position ``g`` belongs to
rank ``g % world`` (every rank reads every shard and keeps its share of the samples, so ranks get
the same number of samples whatever the shard sizes, and a rank with no shard of its own works).
A rank's samples are decoded (``load``) in DataLoader worker processes, worker ``w`` of ``W``
taking every ``W``-th one, so the loader's round-robin gives them back in stream order whatever
``W``. Exact resume: the trainer checkpoints how many of its positions it consumed and the
stream restarts there (whole epochs are skipped without reading; inside an epoch, samples before
the position are read but not decoded).

>>> stream = SampleStream(["train-{0..9}.tar"], load, seed=0, buffer=256)  # doctest: +SKIP
>>> batches = StreamLoader(stream, batch=8, workers=2); batches.seek(0); batches.next_batch()  # doctest: +SKIP
"""
from __future__ import annotations

import io
import pickle
import random
from collections import deque
from typing import Callable, Iterator, Optional, Sequence

from .errors import BadSample, Handler, PartkitError, stop
from .io.tario import iter_tar
from .io.urls import expand_urls, is_stream, iter_streams

__all__ = ["SampleStream", "StreamLoader", "shuffled"]


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: keep ``buffer`` items, emit a random one as each new one arrives, then the rest."""
    buf: list = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        j = rng.randrange(buffer)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


class SampleStream:
    """The seeded, endless, position-numbered stream of one rank's samples (see the module docstring).

    ``load(sample)`` turns a raw sample into what training uses (it may raise :class:`BadSample`);
    ``sample["__position__"]`` is its global stream position ``g``, so a load that draws random
    numbers can seed them from it and give the same item whatever ``--workers`` and on resume;
    ``exclude`` holds keys known to be bad (from the trainer's scan), left out before shuffling so
    positions do not depend on the error policy; ``per_epoch`` (the number of samples an epoch
    yields, when known) lets a resume skip whole epochs without reading them.
    """

    def __init__(self, inputs: Sequence[str], load: Callable[[dict], object], *, seed: int = 0, buffer: int = 256,
                 rank: int = 0, world: int = 1, exclude: Sequence[str] = (), per_epoch: Optional[int] = None,
                 shuffle_shards: bool = True):
        self.urls = expand_urls(inputs)
        if any(is_stream(u) and not u.startswith("pipe:") for u in self.urls):
            raise PartkitError("training streams its input once per epoch, and '-' (stdin) can be read only once; "
                               "write the shards to files (or pass pipe:CMD) and train on those")
        if not self.urls:
            raise PartkitError("the training input names no shards; pass tar files, folders or brace patterns")
        self.load, self.seed, self.buffer = load, seed, max(1, int(buffer))
        self.rank, self.world = rank, world
        self.exclude, self.per_epoch, self.shuffle_shards = frozenset(exclude), per_epoch, shuffle_shards

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Raw samples of one epoch: shards in a seeded order, through a seeded shuffle buffer."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        urls = list(self.urls)
        if self.shuffle_shards:
            rng.shuffle(urls)

        def raw() -> Iterator[dict]:
            for url, stream in iter_streams(urls):
                for sample in iter_tar(stream, url, on_error=lambda msg: None):  # the scan reported it
                    if sample["__key__"] not in self.exclude:
                        yield sample

        return shuffled(raw(), self.buffer, rng)

    def _loaded(self, sample: dict):
        try:
            return ("ok", self.load(sample))
        except BadSample as bad:
            return ("bad", bad.key, bad.reason)
        except PartkitError as e:
            return ("error", str(e))

    def items(self, start: int = 0, worker: int = 0, workers: int = 1, chunk: int = 1) -> Iterator[tuple]:
        """This rank's items from its position ``start`` on, the share of ``worker`` of ``workers``:
        ``("ok", item)``, ``("bad", key, reason)`` or ``("error", message)``, one per position. Positions
        go to workers in runs of ``chunk`` (run ``r`` after ``start`` to worker ``r % workers``)."""
        first = start * self.world + self.rank  # the global position of this rank's item ``start``
        epoch = first // self.per_epoch if self.per_epoch else 0
        g = epoch * self.per_epoch if self.per_epoch else 0
        while True:
            n = 0
            for sample in self.epoch(epoch):
                n += 1
                if g % self.world == self.rank:
                    q = g // self.world
                    if q >= start and ((q - start) // chunk) % workers == worker:
                        sample["__position__"] = g
                        yield self._loaded(sample)
                g += 1
            if n == 0:
                yield ("error", "the training input holds no usable samples")
                return
            epoch += 1

    def chunks(self, start: int, worker: int, workers: int, chunk: int) -> Iterator[bytes]:
        """:meth:`items` in runs of ``chunk``, each packed by :func:`pack_items` (what a worker sends)."""
        run: list = []
        for item in self.items(start, worker, workers, chunk):
            run.append(item)
            if len(run) == chunk or item[0] == "error":
                yield pack_items(run)
                if item[0] == "error":
                    return
                run = []


class _Packer(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays: one copy through the pipe instead of a shared-memory
    segment per tensor (which costs the receiving training process more than the decode it saves)."""

    def reducer_override(self, obj):
        import torch

        if (isinstance(obj, torch.Tensor) and type(obj) is torch.Tensor and obj.device.type == "cpu"
                and not obj.requires_grad and obj.dtype in _NUMPY_DTYPES):
            return _from_numpy, (obj.numpy(),)
        return NotImplemented


_NUMPY_DTYPES: set = set()


def _from_numpy(arr):
    import torch

    return torch.from_numpy(arr)


def pack_items(items: list) -> bytes:
    """Items as one bytes object for the trip from a loader worker (see :class:`_Packer`)."""
    import torch

    if not _NUMPY_DTYPES:
        _NUMPY_DTYPES.update({torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                              torch.int32, torch.int64, torch.bool})
    buf = io.BytesIO()
    _Packer(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(items)
    return buf.getvalue()


def unpack_items(data: bytes) -> list:
    return pickle.loads(data)


def _identity(x):
    return x

def _dataset(stream: SampleStream, start: int, chunk: int):
    import torch.utils.data

    class _Chunks(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            w, n = (info.id, info.num_workers) if info is not None else (0, 1)
            return stream.chunks(start, w, n, chunk)

    return _Chunks()


class StreamLoader:
    """Batches of a :class:`SampleStream` through a ``torch.utils.data.DataLoader`` (``workers`` processes;
    0 decodes in this process). ``position`` counts the stream items consumed; :meth:`seek` restarts there.
    Workers send runs of ``batch`` items as one packed message (:func:`pack_items`); on CUDA the trainer's
    :func:`partkit.training.to_device` pins what it copies."""

    def __init__(self, stream: SampleStream, *, batch: int, workers: int = 0, prefetch: int = 2,
                 handler: Handler = stop):
        self.stream, self.batch, self.workers = stream, batch, workers
        self.prefetch, self.handler = prefetch, handler
        self.position = 0
        self._it = self._loader_it = None

    def seek(self, position: int) -> None:
        self.close()
        self.position = position

    def _iterator(self):
        if self._it is None:
            if self.workers == 0:
                self._it = self.stream.items(self.position)
                return self._it
            import torch
            from torch.utils.data import DataLoader

            # workers send runs of a batch's length, packed (one message per run, tensors as numpy arrays);
            # its own generator: making an iterator draws a worker seed, which must not move the global RNG
            loader = DataLoader(_dataset(self.stream, self.position, self.batch), batch_size=None,
                                num_workers=self.workers, collate_fn=_identity, prefetch_factor=self.prefetch,
                                persistent_workers=False, generator=torch.Generator().manual_seed(0))
            chunks = iter(loader)
            self._loader_it = chunks

            def items():
                for data in chunks:
                    yield from unpack_items(data)

            self._it = items()
        return self._it

    def next_item(self):
        """The next usable item; bad ones go to the handler (and are counted as consumed)."""
        it = self._iterator()
        while True:
            kind, *rest = next(it)
            self.position += 1
            if kind == "ok":
                return rest[0]
            if kind == "bad":
                self.handler(BadSample(rest[0], rest[1]))
                continue
            self.close()
            raise PartkitError(rest[0])

    def next_batch(self) -> list:
        return [self.next_item() for _ in range(self.batch)]

    def close(self) -> None:
        loader_it, self._it, self._loader_it = self._loader_it, None, None
        if loader_it is not None:
            loader_it._shutdown_workers()
