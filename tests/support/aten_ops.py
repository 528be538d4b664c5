"""Record the aten ops a piece of eager PyTorch code runs (for tests of what an export will see)."""
from torch.utils._python_dispatch import TorchDispatchMode


def record_ops(fn):
    """Run ``fn()``; return (its result, [(op name, op args)] for every aten op it ran, in order)."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func.overloadpacket.__name__, args))
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, seen
