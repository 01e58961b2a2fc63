"""Source readers: each turns one kind of source into a QuantizedModel."""

from hqexport.read.hqq_pickle import read_hqq_pickle
from hqexport.read.hqq_safetensors import read_hqq_safetensors
from hqexport.read.live import read_live_model
from hqexport.read.source import read_source

__all__ = ["read_hqq_pickle", "read_hqq_safetensors", "read_live_model", "read_source"]
