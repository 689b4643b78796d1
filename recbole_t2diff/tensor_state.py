"""What tells whether tensors still hold the values something was computed from, without reading them.

A tensor's version counter moves with every in-place write (optimiser steps, EMA updates, ``load_state_dict``), and
a move to another device or a replaced ``.data`` gives new storage. So while each tensor's (storage, version) pair
is unchanged, so are its values, and a result computed from them can be kept instead of recomputed: T2Diff's item
vectors (docs/T2DIFF.md §12) and the check that a sparse index still holds a SparCode's weights (docs/SPARCODE.md).
A leaf module: the models and the index both use it, and neither may import the other.
"""


def tensor_state(tensors):
    """(storage address, version counter) of each of ``tensors``, in order: equal keys mean unchanged values, as long
    as the tensors belong to one live object (a freed tensor's address can be reused by a new one)."""
    return tuple((tensor.data_ptr(), tensor._version) for tensor in tensors)
