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
import math
import pickle
import random
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import BadSample, Handler, PartkitError, stop
from .io.tario import iter_tar
from .io.urls import expand_urls, is_stream, iter_streams

__all__ = ["SampleStream", "StreamLoader", "shuffled", "seeded_generator", "pack_items", "unpack_items", "packed_bytes",
           "run_length", "default_workers"]


def default_workers(workers: Optional[int], device) -> int:
    """``--workers`` as given, or when not given: 2 on CUDA (decoding overlaps the device's work), 0 on CPU,
    where training already uses every core and a worker process competes with it (measured on 2 cores: a step
    with 2 workers 6-10% slower than decoding in the training process)."""
    if workers is not None:
        return int(workers)
    return 2 if str(getattr(device, "type", device)).startswith("cuda") else 0


def seeded_generator(*words: int):
    """A CPU ``torch.Generator`` seeded from integers (numpy's SeedSequence mixes them): the generator of
    one sample's or one step's random draws, the same after a resume and whatever ran before."""
    import torch

    state = np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


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

    ``load(sample)`` turns a raw sample into what training uses (it may raise :class:`BadSample`), and
    ``transform(item, generator)``, when given, augments it with the position's own generator
    (:meth:`generator`; both run in the loader's workers);
    ``exclude`` holds keys known to be bad (from the trainer's scan), left out before shuffling so
    positions do not depend on the error policy; ``per_epoch`` (the number of samples an epoch
    yields, when known) lets a resume skip whole epochs without reading them.
    """

    def __init__(self, inputs: Sequence[str], load: Callable[[dict], object], *, seed: int = 0, buffer: int = 256,
                 rank: int = 0, world: int = 1, exclude: Sequence[str] = (), per_epoch: Optional[int] = None,
                 shuffle_shards: bool = True, transform: Optional[Callable] = None):
        self.urls = expand_urls(inputs)
        if any(is_stream(u) and not u.startswith("pipe:") for u in self.urls):
            raise PartkitError("training streams its input once per epoch, and '-' (stdin) can be read only once; "
                               "write the shards to files (or pass pipe:CMD) and train on those")
        if not self.urls:
            raise PartkitError("the training input names no shards; pass tar files, folders or brace patterns")
        self.load, self.seed, self.buffer = load, seed, max(1, int(buffer))
        self.rank, self.world = rank, world
        self.exclude, self.per_epoch, self.shuffle_shards = frozenset(exclude), per_epoch, shuffle_shards
        self.transform = transform

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

    def generator(self, g: int):
        """The random generator of global position ``g``: augmentation drawn from it is the same whatever
        the number of workers or ranks, and after a resume."""
        return seeded_generator(self.seed, g)

    def item_bytes(self, item) -> int:
        """The packed bytes a worker sends for a loaded ``item`` (after :attr:`transform`, drawn at position 0):
        what :class:`StreamLoader` sizes its runs by (``item_bytes``); 0 for None."""
        if item is None:
            return 0
        return packed_bytes(item if self.transform is None else self.transform(item, self.generator(0)))

    def _loaded(self, sample: dict, g: int):
        try:
            item = self.load(sample)
            return ("ok", item if self.transform is None else self.transform(item, self.generator(g)))
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
                        yield self._loaded(sample, g)
                g += 1
            if n == 0:
                yield ("error", "the training input holds no usable samples")
                return
            epoch += 1

    def chunks(self, start: int, worker: int, workers: int, chunk: int) -> Iterator[tuple]:
        """:meth:`items` in runs of ``chunk``, each packed by :func:`pack_items` (what a worker sends)."""
        run: list = []
        for item in self.items(start, worker, workers, chunk):
            run.append(item)
            if len(run) == chunk or item[0] == "error":
                yield pack_items(run)
                if item[0] == "error":
                    return
                run = []


_ALIGN = 64  # each array's offset in a packed run


class _Packer(pickle.Pickler):
    """Pickles items with their numpy arrays and CPU tensors set aside (persistent ids), to be copied
    into one buffer: a worker then sends a run of items as one shared-memory segment plus a few
    hundred bytes, instead of a segment per tensor or megabytes through the pipe (both cost the
    training process more than decoding the items itself)."""

    def __init__(self, file):
        import torch

        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays: list = []
        self.tensor = torch.Tensor  # persistent_id runs for every object pickled: no import there
        self.numpy_dtypes = {torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                             torch.int32, torch.int64, torch.bool}

    def persistent_id(self, obj):
        if type(obj) is np.ndarray and obj.dtype.kind in "biuf":
            kind, arr = "np", obj
        elif (type(obj) is self.tensor and obj.device.type == "cpu" and not obj.requires_grad
              and obj.dtype in self.numpy_dtypes):
            kind, arr = "torch", obj.numpy()
        else:
            return None
        self.arrays.append(np.ascontiguousarray(arr))
        return kind, len(self.arrays) - 1, arr.dtype.str, arr.shape


class _Unpacker(pickle.Unpickler):
    def __init__(self, file, buffer: np.ndarray, offsets: list):
        import torch

        super().__init__(file)
        self.buffer, self.offsets, self.from_numpy = buffer, offsets, torch.from_numpy

    def persistent_load(self, pid):
        kind, i, dtype, shape = pid
        dtype = np.dtype(dtype)
        start = self.offsets[i]
        arr = self.buffer[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        return self.from_numpy(arr) if kind == "torch" else arr


def pack_items(items: list) -> tuple:
    """Items as ``(pickle bytes, offsets, uint8 tensor of their arrays)`` for the trip from a loader
    worker (see :class:`_Packer`); :func:`unpack_items` gives them back, arrays as views of the buffer."""
    import torch

    f = io.BytesIO()
    packer = _Packer(f)
    packer.dump(items)
    offsets, total = [], 0
    for arr in packer.arrays:
        offsets.append(total)
        total += -(-arr.nbytes // _ALIGN) * _ALIGN
    buffer = torch.empty(max(total, 1), dtype=torch.uint8)
    flat = buffer.numpy()
    for arr, start in zip(packer.arrays, offsets):
        flat[start:start + arr.nbytes] = arr.reshape(-1).view(np.uint8)
    return f.getvalue(), offsets, buffer


def packed_bytes(item) -> int:
    """The bytes of ``item``'s arrays in a packed run (what :class:`StreamLoader` sizes its runs by)."""
    return int(pack_items([item])[2].numel())


def unpack_items(packed: tuple) -> list:
    data, offsets, buffer = packed
    return _Unpacker(io.BytesIO(data), buffer.numpy(), offsets).load()


RUN_BYTES = 8 << 20  # a worker's message holds about this many bytes of items (whole batches, at most 8)


def run_length(batch: int, item_bytes: int) -> int:
    """Items per worker message: whole batches up to :data:`RUN_BYTES` (``item_bytes``: one item's arrays,
    0 if unknown). Each message costs the training process a fixed ~1 ms (the shared-memory handle's
    round trip to the worker, the DataLoader's bookkeeping), so small items travel several batches at
    a time; memory is ``prefetch`` runs per worker."""
    per_batch = max(1, batch * int(item_bytes))
    return batch * max(1, min(8, RUN_BYTES // per_batch))


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
    Workers send runs of whole batches as one packed message (:func:`pack_items`; ``item_bytes``, one item's
    :func:`packed_bytes`, sizes the runs: :func:`run_length`); on CUDA the trainer's
    :func:`partkit.training.to_device` pins what it copies."""

    def __init__(self, stream: SampleStream, *, batch: int, workers: int = 0, prefetch: int = 2,
                 handler: Handler = stop, item_bytes: int = 0):
        self.stream, self.batch, self.workers = stream, batch, workers
        self.prefetch, self.handler = prefetch, handler
        self.run = run_length(batch, item_bytes)
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

            # workers send runs of whole batches, packed (one message per run, its arrays in one shared buffer);
            # its own generator: making an iterator draws a worker seed, which must not move the global RNG
            loader = DataLoader(_dataset(self.stream, self.position, self.run), batch_size=None,
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
