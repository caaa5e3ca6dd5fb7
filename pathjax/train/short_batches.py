"""The size the extract stage's last, short batch runs at.

Every batch but a cohort's last is full and runs at the one compiled size. The last runs either
padded to that size or at a size of its own: one more trace and compile (the persistent
compilation cache keeps it for later runs) against the padding's rows. On a GPU or TPU a row
costs a fraction of a millisecond and a compile seconds, so it is padded. On CPU it depends on
the network (2 Zen 5 cores): VGG-16 at 512 px costs 0.45 s a row (a last batch of 35 took 28.5 s
padded to 64 and 22.8 s at 48, compile included), ViT-S/16 29 ms a row against 1.1 s to trace
and compile, a test's tiny network microseconds. So there a short batch runs at its own size
when the rows it saves would take longer than the first size's trace and compile took
(`Extractor.padding_costs_more`, rows costed by `padding_seconds`).
"""

from typing import Callable

OWN_SIZES = 8  # a short batch's own size is a multiple of about batch_size / OWN_SIZES
# A CPU device's float32 rate, roughly: one Zen 5 core ran ViT-S/16 at 140 GFLOP/s, VGG-16 at
# 512 px at 170; an AVX2 core reaches about half.
CPU_DEVICE_FLOPS = 100e9


def own_size_step(batch_size: int, whole: int, platform: str) -> int:
    """What a short batch's own size is a multiple of: on CPU the smallest multiple of `whole`
    (what a batch must split into: devices x micro-batches) of at least batch_size / OWN_SIZES,
    so a network has at most OWN_SIZES sizes to compile and cache; on a GPU or TPU the whole
    batch (no size of its own)."""
    if platform != 'cpu':
        return batch_size
    return whole * max(1, -(-batch_size // (OWN_SIZES * whole)))


def padding_seconds(rows: int, batch_flops: float, batch_size: int, devices: int) -> float:
    """Seconds `rows` rows of padding take on `devices` CPU devices: a full batch's FLOPs
    (`batch_flops`, XLA's count) per row, at CPU_DEVICE_FLOPS per device."""
    return rows * batch_flops / batch_size / (CPU_DEVICE_FLOPS * devices)


def run_size(rows: int, batch_size: int, step: int, compiled: set[int],
             padding_costs_more: Callable[[int], bool]) -> int:
    """The size a batch of `rows` <= batch_size images runs at: its own, the smallest multiple of
    `step` that holds them (at most batch_size), where that needs no compile beyond the first
    (the size is in `compiled`, or nothing is: a cohort that fits one batch) or where
    `padding_costs_more(own size)`; else batch_size."""
    own = min(-(-rows // step) * step, batch_size)
    if own == batch_size or own in compiled or not compiled or padding_costs_more(own):
        return own
    return batch_size
