"""Training and evaluation data: from documents on disk (or the hub) to packed sequences.

  packing.py    documents -> fixed-length sequences, EOS between them, boundaries recorded
  sampler.py    the resumable sampler that gives each data-parallel rank its own shard
  prepare.py    tokenise and pack once to disk (datasets, Arrow), found again by fingerprint
  tokenizer.py  the recipe's tokenizer, and a byte-level one that needs no download
  corpus.py     the generated demo corpus

The repository's top-level data/ holds the scripts that call these and the demo corpus itself.
"""

from ringpatch.data.packing import pack_documents
from ringpatch.data.sampler import ResumableSampler

__all__ = ["pack_documents", "ResumableSampler"]
