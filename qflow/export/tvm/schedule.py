"""A CPU schedule for the convolutions and dense layers of a TVM build: what TVM's
default CPU pipeline leaves out.

TVM 0.27's Relax pipeline for ``llvm`` targets legalizes ``conv2d`` into a plain loop
nest (batch, output channel, row, column, then the reduction over input channels and
taps innermost) and applies no schedule, so LLVM gets scalar loops; its tuner
(MetaSchedule) is the intended way to schedule them. :func:`schedule_convolutions` is a
fixed schedule instead, applied to every fused function that holds a ``conv2d_nchw``
block with static channel and column extents, or a 2-d ``matmul`` block (a dense layer)
with a static output width:

- the reduction moves outside a tile of output channels (up to 8, or 16 where the
  layer is narrower than 16 columns; unrolled) times output columns (up to 16,
  vectorized), accumulated in a local buffer, so one input vector feeds several
  filters from registers (a dense layer: a vector of up to 16 outputs, for up to 8
  samples at once when the batch is fixed);
- the padded input is computed per sample, and the elementwise epilogue (the
  requantization) is inlined into one loop right after each tile, while it is in cache;
- any other function that is a chain of elementwise blocks (residual adds, casts) is
  inlined into one loop, vectorized.

Exactness: the schedule reorders the summation of each output's products. The integer
ONNX puts a convolution on float32 only where every partial sum in any order is an
integer below 2**24 (:mod:`qflow.export.int_onnx`), and integer accumulation is exact in
any order; reordering cannot change a result, and ``qflow verify`` checks the build.
A function the schedule does not fit is left as TVM made it.
"""

from __future__ import annotations

from .vnni import KERNEL_ATTR

#: output channels per tile (unrolled) and output columns per tile (vectorized), largest
#: first: without tuning, the first that divides the extent is taken
CHANNEL_TILES = (8, 4, 2)
COLUMN_TILES = (16, 8, 4, 2)
#: output channels per tile where the columns give less than a full vector: more
#: filters per input vector (resnet8's 8-wide layers: 16x8 measured 2-17% faster than 8x8)
NARROW_CHANNEL_TILES = (16, 8, 4, 2)
#: samples per tile of a dense layer with a fixed batch (unrolled): one weight vector
#: read from memory feeds this many samples' sums in registers
ROW_TILES = (4, 2)
#: the tile sizes tuning may try (:mod:`.tune`)
TUNED_CHANNEL_TILES = (16, 8, 4, 2, 1)
TUNED_COLUMN_TILES = (32, 16, 8, 4, 2)
CONV_BLOCK, DENSE_BLOCK = "conv2d_nchw", "matmul"
#: most blocks in a function whose elementwise chain is inlined into one loop
MAX_INLINED_BLOCKS = 40


def schedule_convolutions(mod, tiles: dict[str, tuple[int, int]] | None = None):
    """``mod`` (a legalized, fused Relax IRModule) with every convolution scheduled;
    ``tiles`` maps a function's name to the (channels, columns) tile to use instead of
    the default (the tuner's choice)."""
    import tvm

    scheduled = {}
    for var, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            new = schedule_function(func, (tiles or {}).get(var.name_hint))
            if new is not None:
                scheduled[var] = new
    for var, func in scheduled.items():
        mod[var] = func
    return mod


def schedule_function(func, tiles: tuple[int, int] | None = None):
    """The scheduled PrimFunc, or None when it holds no convolution or dense layer the
    schedule fits. ``tiles``: (output channels, output columns) per tile instead of the
    defaults; a dense layer uses only the columns."""
    from tvm import s_tir

    if func.attrs is not None and KERNEL_ATTR in func.attrs:
        return None  # a hand-written kernel (:mod:`.vnni`), scheduled as written
    for name, schedule in ((CONV_BLOCK, _schedule_conv), (DENSE_BLOCK, _schedule_dense)):
        sch = s_tir.Schedule(func)
        try:
            block = sch.get_sblock(name)
        except (RuntimeError, ValueError):
            continue
        try:
            schedule(sch, block, tiles)
        except (RuntimeError, ValueError):  # a shape or form the schedule does not fit
            return None
        return sch.mod["main"]
    return _schedule_elementwise(func)


def tile_candidates(func) -> list[tuple[int, int]]:
    """The distinct (channels, columns) tiles the schedule can take for ``func``'s
    convolution or dense layer, the default first; empty when it has none."""
    from tvm import s_tir

    if func.attrs is not None and KERNEL_ATTR in func.attrs:
        return []
    sch = s_tir.Schedule(func)
    for name, channel_at in ((CONV_BLOCK, 1), (DENSE_BLOCK, None)):
        try:
            loops = sch.get_loops(sch.get_sblock(name))
        except (RuntimeError, ValueError):
            continue
        columns = _static(sch, loops[3 if channel_at else 1]) if len(loops) in (3, 7) else None
        channels = _static(sch, loops[channel_at]) if channel_at else 1
        if columns is None or channels is None:
            return []
        default = _tiles(channels, columns, None)
        found = [default]
        for tiles in ((c, w) for c in TUNED_CHANNEL_TILES for w in TUNED_COLUMN_TILES):
            tiles = _tiles(channels, columns, tiles)
            if tiles not in found:
                found.append(tiles)
        return found
    return []


def _tiles(channels: int, columns: int, tiles: tuple[int, int] | None) -> tuple[int, int]:
    """The (channels, columns) tile taken for these extents: the given one where it
    divides them, else the largest default that does (a whole row at worst)."""
    channel_tiles, column_tiles = CHANNEL_TILES, COLUMN_TILES
    if tiles is not None:
        channel_tiles, column_tiles = (tiles[0], *CHANNEL_TILES), (tiles[1], *COLUMN_TILES)
    column = next((t for t in column_tiles if columns % t == 0), columns)
    if tiles is None and column < COLUMN_TILES[0]:
        channel_tiles = NARROW_CHANNEL_TILES
    return next((t for t in channel_tiles if channels % t == 0), 1), column


def _schedule_elementwise(func):
    """A chain of elementwise blocks (requantization, residual adds, pooling casts):
    inlined into its last block, whose innermost loop is vectorized."""
    from tvm import s_tir

    if not _inlinable(func):
        return None
    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        for block in blocks[:-1]:
            sch.compute_inline(block)
        last = sch.get_loops(blocks[-1])
        if not last or _static(sch, last[-1]) is None:
            return None
        sch.vectorize(last[-1])
    except (RuntimeError, ValueError):
        return None
    return sch.mod["main"]


def _inlinable(func) -> bool:
    """May the function's elementwise blocks be inlined into one another? Not when they
    hold integer division or remainder chains (the transformer ops' and the int64
    requantization's): a value read several times by each next block grows a nested
    expression exponentially once inlined (one LayerNorm took over 20 GB to compile)."""
    text = func.script()
    return ("floordiv" not in text and "floormod" not in text
            and text.count("T.sblock(") <= MAX_INLINED_BLOCKS)


def _static(sch, loop) -> int | None:
    import tvm

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else None


def _schedule_conv(sch, conv, tiles) -> None:
    if len(sch.get_loops(conv)) != 7:
        raise ValueError("not a 2-d convolution loop nest")
    accumulator = sch.cache_write(conv, 0, "local")
    batch, channel, row, column, reduce_in, reduce_y, reduce_x = sch.get_loops(conv)
    channels, columns = _static(sch, channel), _static(sch, column)
    if channels is None or columns is None:
        raise ValueError("dynamic channel or column extent")
    channel_tile, column_tile = _tiles(channels, columns, tiles)
    channel_out, channel_in = sch.split(channel, [None, channel_tile])
    column_out, column_in = sch.split(column, [None, column_tile])
    sch.reorder(batch, channel_out, row, column_out, reduce_in, reduce_y, reduce_x,
                channel_in, column_in)
    sch.unroll(channel_in)
    _accumulate(sch, conv, accumulator, column_out, column_in, reduce_in)
    _pad_per_sample(sch, batch)


def _schedule_dense(sch, dense, tiles) -> None:
    if len(sch.get_loops(dense)) != 3:
        raise ValueError("not a 2-d matrix product")
    accumulator = sch.cache_write(dense, 0, "local")
    row, column, reduce = sch.get_loops(dense)
    columns = _static(sch, column)
    if columns is None:
        raise ValueError("dynamic output width")
    _, column_tile = _tiles(1, columns, tiles)
    column_out, column_in = sch.split(column, [None, column_tile])
    rows = _static(sch, row)
    row_tile = next((t for t in ROW_TILES if rows and rows % t == 0), 1)
    row_out, row_in = sch.split(row, [None, row_tile])
    sch.reorder(row_out, column_out, reduce, row_in, column_in)
    sch.unroll(row_in)
    _accumulate(sch, dense, accumulator, column_out, column_in, reduce)


def _accumulate(sch, block, accumulator, tile, lanes, reduce) -> None:
    """Accumulate each tile in registers, vectorized over ``lanes``; the epilogue after."""
    import tvm

    sch.reverse_compute_at(accumulator, tile)
    sch.vectorize(lanes)
    init = sch.decompose_reduction(block, reduce)
    if sch.get(sch.get_loops(init)[-1]).kind != tvm.tirx.ForKind.VECTORIZED:
        sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(accumulator)[-1])
    _fuse_epilogue(sch, accumulator, tile)


def _pad_per_sample(sch, batch) -> None:
    try:
        pad = sch.get_sblock("pad_temp")
    except (RuntimeError, ValueError):
        return  # no padding
    sch.compute_at(pad, batch)


def _fuse_epilogue(sch, accumulator, column_out) -> None:
    """Inline the elementwise blocks after the convolution into the last one and compute
    it per tile, right after the accumulator is written."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    after = blocks[names.index(sch.get(accumulator).name_hint) + 1:]
    if not after or not _inlinable(sch.mod["main"]):
        return
    for block in after[:-1]:
        try:
            sch.compute_inline(block)
        except (RuntimeError, ValueError):
            return  # not a simple elementwise chain: leave the epilogue as it is
    last = after[-1]
    sch.reverse_compute_at(last, column_out)
    sch.vectorize(sch.get_loops(last)[-1])
