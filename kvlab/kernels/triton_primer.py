"""Two toy Triton kernels: the ideas the paged-attention kernel is made of, one at a time.

Triton runs one function, the *kernel*, as many *program instances* ("programs"); the launch
grid says how many. A program does not handle one element, as a CUDA thread does: it handles a
whole *block* (a tile) of elements at once, as a vector, and Triton spreads that vector over
the GPU's threads. Inside a kernel:

  tl.program_id(axis)      which program this is, along each axis of the grid
  tl.arange(0, BLOCK)      the offsets 0..BLOCK-1 of a tile (BLOCK: a power of two, tl.constexpr)
  ptr + offsets            a tile of addresses (pointer arithmetic, in elements)
  tl.load(ptrs, mask, other)   read them; where mask is False nothing is read, `other` is used
  tl.store(ptrs, values, mask) write them

`add` is the first kernel of the Triton tutorials in miniature: a 1-D grid, a tile of
offsets per program, and a mask for the last, partial tile. `gather_rows` is the paged
cache's access pattern: each program reads a 2-D tile whose rows are found through an index
table (the block table), with `[:, None]` / `[None, :]` broadcasting building the tile of
addresses and a mask on both dimensions. The kernel in `paged_attention.py` does exactly this,
then two small matrix products and an online softmax on the tiles.

Triton also has `tl.make_block_ptr` (a "block pointer": base, shape, strides, offsets) for
tiles of a contiguous tensor; a paged cache's tiles are not contiguous (each row comes from
another block), so kvlab's kernels build their addresses from offsets, as here.
"""

from __future__ import annotations

import torch

import kvlab.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no GPU, before triton loads)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvlab.kernels.paged_attention import check_launchable  # noqa: E402


@triton.jit
def add_kernel(x_ptr,              # (n,) first input
               y_ptr,              # (n,) second input
               out_ptr,            # (n,) output
               n,                  # int: number of elements
               BLOCK: tl.constexpr):   # elements per program (a power of two)
    pid = tl.program_id(0)                       # this program's index in the 1-D grid
    offs = pid * BLOCK + tl.arange(0, BLOCK)     # (BLOCK,) the elements this program owns
    mask = offs < n                              # the last program's tile hangs past the end
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


def add(x: torch.Tensor, y: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x + y with `add_kernel`: a grid of ceil(n / block) programs, each adding one tile."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape or x.dim() != 1 or x.dtype != y.dtype:
        raise ValueError(f"x and y must be 1-D tensors of one shape and dtype, got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(y.shape)} {y.dtype}")
    _check_block("block", block)
    check_launchable(dict(x=x, y=y))
    out = torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), block),)      # one program per tile
    add_kernel[grid](x, y, out, x.numel(), BLOCK=block)
    return out


@triton.jit
def gather_rows_kernel(src_ptr,        # (num_rows, width) rows to read from, row-major
                       index_ptr,      # int32 (n,) which row of src each output row reads (a "block table")
                       out_ptr,        # (n, width) output
                       n,              # int: rows to gather
                       width,          # int: elements per row
                       stride_src,     # int: elements between consecutive rows of src
                       BLOCK_R: tl.constexpr,   # rows per program
                       BLOCK_W: tl.constexpr):  # a power of two >= width
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)          # (BLOCK_R,) output rows of this program
    cols = tl.arange(0, BLOCK_W)                          # (BLOCK_W,) elements within a row
    mask_r = rows < n
    src_row = tl.load(index_ptr + rows, mask=mask_r, other=0).to(tl.int64)   # (BLOCK_R,) indirection
    mask = mask_r[:, None] & (cols[None, :] < width)                         # (BLOCK_R, BLOCK_W)
    tile = tl.load(src_ptr + src_row[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None] * width + cols[None, :], tile, mask=mask)


def gather_rows(src: torch.Tensor, index: torch.Tensor, block_rows: int = 4) -> torch.Tensor:
    """src[index] with `gather_rows_kernel`: each program copies `block_rows` rows, found through `index`."""
    if not (isinstance(src, torch.Tensor) and isinstance(index, torch.Tensor)):
        raise TypeError(f"src and index must be torch tensors, got {type(src).__name__} and {type(index).__name__}")
    if src.dim() != 2 or index.dim() != 1 or index.dtype != torch.int32:
        raise ValueError(f"src must be 2-D and index a 1-D int32 tensor, got {tuple(src.shape)} and "
                         f"{tuple(index.shape)} {index.dtype}")
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < src.shape[0]):
        raise ValueError(f"index entries must lie in 0..{src.shape[0] - 1} (rows of src), "
                         f"got {int(index.min())}..{int(index.max())}")
    _check_block("block_rows", block_rows)
    check_launchable(dict(src=src, index=index))
    n, width = index.numel(), src.shape[1]
    out = torch.empty(n, width, dtype=src.dtype, device=src.device)
    grid = (triton.cdiv(n, block_rows),)
    gather_rows_kernel[grid](src, index, out, n, width, src.stride(0), BLOCK_R=block_rows,
                             BLOCK_W=triton.next_power_of_2(max(width, 1)))
    return out


def _check_block(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two (tl.arange needs one), got {value!r}")
