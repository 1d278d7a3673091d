"""A sparse safetensors format: every tensor in its smallest exact encoding.

A file is an ordinary safetensors file (no pickle anywhere) whose header says
how to rebuild each tensor of a state dict:

- ``dense``: stored as is, under its own name;
- ``bitmask``: ``NAME::bits``, one bit per element marking the nonzero ones
  (packed, first element in the most significant bit, as ``numpy.packbits``),
  and ``NAME::values``, the nonzero elements in order, in the tensor's dtype;
- ``csr``: the tensor seen as a matrix (rows = its first dimension; a scalar or
  a vector is one row), with ``NAME::indptr`` (row pointers, int32 or int64),
  ``NAME::indices`` (the column of each nonzero, in the smallest integer type
  that holds them) and ``NAME::values``.

"Zero" means all bits zero, except that a floating-point -0.0 is a zero too:
pruning by multiplication (``torch.nn.utils.prune``, and prunelab runs stored
before pruned weights were made +0.0) leaves -0.0 wherever a weight was
negative, and counting those as nonzero would make such files dense. Their signs are kept in ``NAME::zero_signs``, one
bit per zero element, stored only when at least one zero is negative. Values
are moved as raw bits, so every tensor comes back bit-identical, NaN payloads
included. The encoding of each tensor is the one with the fewest bytes, each
extra stored tensor counted with its header entry; ties go to dense.

The header's string metadata holds ``prunelab.format``,
``prunelab.format_version``, ``prunelab.tensors`` (JSON: name -> encoding,
shape, dtype, negative_zeros) and the caller's own entries.

Loading bounds its memory. A CSR tensor of any shape takes a few bytes, so a
hostile header could ask for terabytes. Before decoding anything,
:func:`load_sparse` computes from the header an upper bound of the bytes each
tensor's decoding allocates beyond the file's own tensors: its output, its
1-byte flags (nonzeros; zero signs and negative zeros if it has any -0.0) and
its temporaries (the check of its values; a CSR tensor's int64 row pointers,
row ids and positions), all counted as if alive at once, on top of the
outputs of the tensors decoded before it (see ``_decode_bytes``). The file is
refused, naming the tensor, when that exceeds ``max(4 GiB, 4096 x the file's
size)``: no real pruned model comes close, while a 453-byte file asking for a
``[1, 2**32]`` tensor does. The decoder uses only operations whose memory
that bound covers: masked scatters and fills, no boolean sums or boolean
indexing, whose int64 temporaries are eight times the tensor.
"""

from prunelab.deploy.sparse_format.decode import load_sparse, read_metadata
from prunelab.deploy.sparse_format.encode import choose_encoding, encoding_sizes, plain_state_dict, save_sparse
from prunelab.deploy.sparse_format.layout import ENCODINGS, FORMAT, VERSION

__all__ = [
    "ENCODINGS", "FORMAT", "VERSION", "choose_encoding", "encoding_sizes", "load_sparse", "plain_state_dict",
    "read_metadata", "save_sparse",
]
