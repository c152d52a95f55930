"""Shard I/O: read samples from tar shards anywhere, write them deterministically."""
from .codecs import (
    decode_image, decode_json, decode_label_map, decode_npy, encode_json, encode_npy, encode_png, get_field,
    image_field,
)
from .pipeline import Output, dist_info, iter_loaded, iter_samples, run_stage
from .sink import FolderSink, StdoutSink, open_sink, write_atomic
from .tario import TarSampleWriter, iter_tar
from .urls import expand_urls, open_url

__all__ = [
    "Output", "run_stage", "iter_samples", "iter_loaded", "dist_info", "expand_urls", "open_url", "iter_tar",
    "TarSampleWriter", "open_sink", "FolderSink", "StdoutSink", "write_atomic", "decode_image", "decode_label_map",
    "decode_npy", "decode_json", "encode_json", "encode_npy", "encode_png", "get_field", "image_field",
]
