"""Shared Triton pieces: the activation, the selection test, and the matrix product.

Accumulation is fp32 everywhere. Dot operands stay in the model's dtype (bf16/fp16 tensor cores),
except for fp32 models, whose products are full fp32 (no TF32 rounding), and under
``TRITON_INTERPRET=1`` (CPU tests), where bf16/fp16 arithmetic is unreliable: there ``mma`` upcasts.
"""

import functools
import os

import torch

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2}

# Token counts (T, and NTB: token blocks) reach the kernels as plain ints, and Triton compiles one variant per
# value class (1, a multiple of 16, other). vLLM's CUDA graphs fix T to their captured sizes, but a prefill chunk
# above the largest one (and every step in eager mode) runs at whatever T the scheduler made: a class no earlier
# call had compiled the kernel again in the middle of serving (the H100 serve run of session 57: vLLM's JIT
# monitor caught the grouped path's six kernels compiling at batch 256, 1-6 s stalls inside timed runs). Kernels
# that run at such sizes take their token counts unspecialized: one compile per config, whatever T. The decode
# kernels (T <= a few tokens, always inside a captured graph when serving) keep the specialization.
ANY_TOKEN_COUNT = dict(do_not_specialize=("T", "NTB"))

try:  # grid dependency control (programmatic dependent launch, sm_90+; triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_PDL = True
except ImportError:  # pragma: no cover - older triton: PDL is never switched on
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


try:  # host-side tensor descriptors (TMA; triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
    HAS_TMA = True
except ImportError:  # pragma: no cover - older triton: TMA is never switched on
    HAS_TMA = False


def _sm90_kernels(x: torch.Tensor) -> bool:
    """Whether kernels on ``x`` may use sm_90 instructions: compiled (not the interpreter), CUDA, sm_90+."""
    if INTERPRET or not x.is_cuda:
        return False
    return _sm90_device(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm90_device(index: int) -> bool:
    """Cached per device index (not per tensor: a cache keyed by tensors would keep them alive)."""
    return torch.cuda.get_device_capability(index)[0] >= 9


def _bulk_copyable(weights) -> bool:
    """Every weight (None skipped) contiguous, 16-byte aligned, rows a multiple of 16 bytes: what the
    bulk copy engine (L2 prefetch, tensor descriptors) needs."""
    return all(w.is_contiguous() and w.data_ptr() % 16 == 0 and (w.shape[-1] * w.element_size()) % 16 == 0
               for w in weights if w is not None)


def use_pdl(cfg: dict, x: torch.Tensor) -> bool:
    """Whether a path's kernels launch as programmatic dependents (``"pdl": true`` in its config):
    the launch overlaps the previous kernel's tail instead of waiting for it (a CUDA graph keeps the
    edge). Needs sm_90+, a triton with grid dependency control, and not the interpreter."""
    return bool(cfg.get("pdl", False)) and HAS_PDL and _sm90_kernels(x)


def pdl_launch(pdl: bool) -> dict:
    """The launch keyword that goes with ``use_pdl`` (none when off: the interpreter knows no such option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def await_producer(PDL: tl.constexpr):
    """First statement of a kernel launched with ``pdl_launch``: wait until the previous kernel has
    finished and its writes are visible (nothing is read before), then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def prefetch_ok(cfg_value, x: torch.Tensor, *weights: torch.Tensor) -> int:
    """The PREFETCH switch of a kernel (its config value, 0 = off) where the device can take it: sm_90+
    (``cp.async.bulk.prefetch.L2``), not the interpreter, and every weight 16-byte aligned with rows
    of a multiple of 16 bytes (the bulk copy's granularity); else 0."""
    if not cfg_value or not _sm90_kernels(x):
        return 0
    return int(cfg_value) if _bulk_copyable(weights) else 0


def tma_ok(cfg_value, x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a kernel may read its weights through tensor descriptors (``TMA`` in its config; the
    copy engine moves whole tiles into shared memory, one request per tile instead of a 16-byte
    ``cp.async`` per thread): a triton with host descriptors, sm_90+ on CUDA (the interpreter emulates
    them, so the CPU tests run the same code), and weights contiguous, 16-byte aligned, with rows of a multiple of 16 bytes. Where it
    is on, a kernel's PREFETCH is off (the prefetch does pointer arithmetic on the weights)."""
    if not cfg_value or not HAS_TMA or not (INTERPRET or _sm90_kernels(x)):
        return False
    return _bulk_copyable(weights)


def rows_descriptor(w: torch.Tensor, block_rows: int, block_cols: int):
    """A tensor descriptor over an expert weight [E, e, n] viewed as its E*e rows [E*e, n]: tiles of
    ``block_rows`` x ``block_cols``, zero outside the matrix (the copy engine's bounds)."""
    return TensorDescriptor.from_tensor(w.view(-1, w.shape[-1]), [block_rows, block_cols])


@triton.jit
def prefetch_l2(ptr, n_elems, NUM_THREADS: tl.constexpr):
    """Ask L2 for ``n_elems`` contiguous elements from ``ptr`` without waiting for them (sm_90 bulk
    prefetch, one chunk per thread): weights a program will stream are in flight from HBM at once,
    instead of a few pipeline stages at a time, so its later loads hit L2. The host checks alignment
    (``prefetch_ok``); the result changes nothing but timing."""
    ESIZE: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    nbytes = n_elems.to(tl.int64) * ESIZE
    chunk = tl.cdiv(nbytes, NUM_THREADS * 16) * 16  # bytes, a multiple of 16
    offs = tl.arange(0, NUM_THREADS).to(tl.int64) * chunk
    size = tl.minimum(tl.maximum(nbytes - offs, 0), chunk).to(tl.int32)
    addr = ptr.to(tl.int64) + offs
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def activation(h, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(h, 0.0)
    elif ACT == 1:  # exact GELU
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    else:  # tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return 0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))


@triton.jit
def selected(scores_ptr, rowmax_ptr, tau, offs_t, tmask, e, stride_s):
    """Boolean [BLOCK_T]: token t runs expert e (R_te >= tau * max_e R_te)."""
    s = tl.load(scores_ptr + offs_t * stride_s + e, mask=tmask, other=-1.0).to(tl.float32)
    m = tl.load(rowmax_ptr + offs_t, mask=tmask, other=0.0).to(tl.float32)
    return (s >= tau * m) & tmask


@triton.jit
def neuron_selected(scores_ptr, rowmax_ptr, tau, offs_t, tmask, offs_n, nmask, ES, stride_s, counters_ptr, T,
                    count_tokens):
    """Boolean [BLOCK_T, BLOCK_N] for a tile over the E*e neurons laid end to end (it may span small
    experts): token t runs neuron n's expert. Counts the tile's (token, expert) pairs where each
    expert's first neuron lies, and the T tokens where ``count_tokens`` (one program)."""
    s = tl.load(scores_ptr + offs_t[:, None] * stride_s + (offs_n // ES)[None, :],
                mask=tmask[:, None] & nmask[None, :], other=-1.0).to(tl.float32)
    m = tl.load(rowmax_ptr + offs_t, mask=tmask, other=0.0).to(tl.float32)
    sel = (s >= tau * m[:, None]) & tmask[:, None] & nmask[None, :]
    first = (offs_n % ES == 0) & nmask
    n_first = tl.sum(tl.sum((sel & first[None, :]).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(counters_ptr + 1, n_first.to(tl.int64), sem="relaxed")
    if count_tokens:
        tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T, sem="relaxed")
    return sel


def fp32_dots(x) -> bool:
    """The UPCAST switch of the kernels for input ``x``."""
    return INTERPRET or x.dtype == torch.float32


def num_programs(x: torch.Tensor, per_sm: int) -> int:
    """A persistent grid's size: ``per_sm`` programs per SM of x's device (4 under the interpreter)."""
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count * per_sm
    return 4


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def count_selected(sel, counters_ptr, e, c, T):
    """Compute accounting from a per-expert program: pairs executed (once per expert), tokens (once)."""
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    if c == 0:
        tl.atomic_add(counters_ptr + 1, n_sel.to(tl.int64), sem="relaxed")
        if e == 0:
            tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T, sem="relaxed")
    return n_sel


@triton.jit
def expert_hidden(
    x_ptr, x_rows, xmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, e, offs_j, jmask, D, ES,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr = False, row0=0,
):
    """h = act(x w_in^T + b_in) * (x w_up^T) for token rows ``x_rows`` and neurons ``offs_j`` of
    expert e: the first half of every expert kernel, fp32 accumulation, [BM, BN]. With TMA, w_in /
    w_up are ``rows_descriptor``s and the tile is rows ``row0 ..`` (= e * ES + offs_j; rows past the
    expert are the caller's to mask, as ``jmask`` does for the pointer loads)."""
    w_rows = (e * ES + offs_j).to(tl.int64) * D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < D
        xk = tl.load(x_ptr + x_rows[:, None] * stride_x + offs_k[None, :], mask=xmask[:, None] & kmask[None, :],
                     other=0.0)
        wmask = jmask[:, None] & kmask[None, :]
        if TMA:
            wi = w_in_ptr.load([row0, k0])
        else:
            wi = tl.load(w_in_ptr + w_rows[:, None] + offs_k[None, :], mask=wmask, other=0.0)
        acc += mma(xk, tl.trans(wi), UPCAST)
        if GATED:
            if TMA:
                wu = w_up_ptr.load([row0, k0])
            else:
                wu = tl.load(w_up_ptr + w_rows[:, None] + offs_k[None, :], mask=wmask, other=0.0)
            acc_up += mma(xk, tl.trans(wu), UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_in_ptr + e * ES + offs_j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    h = activation(acc, ACT)
    if GATED:
        h = h * acc_up
    return h


@triton.jit
def add_down_partial(h, w_out_ptr, rows, rmask, DO, part, offs_t, tmask, accumulate,
                     UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """part[t, :] = (part[t, :] if ``accumulate``) + h w_out[rows] over the output width: the down half of
    the kernels that give each program its own fp32 partial [T, d_out] (balanced, persistent decode).
    h [BLOCK_T, BLOCK_R] in w_out's dtype (fp32 under UPCAST), ``rows`` the tile's rows of [E * e]."""
    for n0 in range(0, DO, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < DO
        w = tl.load(w_out_ptr + rows.to(tl.int64)[:, None] * DO + offs_n[None, :],
                    mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = mma(h, w, UPCAST)
        pp = part + offs_t[:, None] * DO + offs_n[None, :]
        pmask = tmask[:, None] & nmask[None, :]
        if accumulate:
            acc += tl.load(pp, mask=pmask, other=0.0)
        tl.store(pp, acc, mask=pmask)


@triton.jit
def router_hidden_block(x_ptr, stride_x, w1_ptr, D, offs_t, tmask, offs_w, wmask,
                        UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """The router's first layer for a block of its hidden units, x W1^T rounded to W1's dtype (as
    cuBLAS returns it): [BLOCK_T, BLOCK_W]. Only for small routers (every program reads W1 from L2)."""
    acc = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < D
        xk = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=tmask[:, None] & kmask[None, :],
                     other=0.0)
        w1 = tl.load(w1_ptr + offs_w.to(tl.int64)[:, None] * D + offs_k[None, :], mask=wmask[:, None] & kmask[None, :],
                     other=0.0)
        acc += mma(xk, tl.trans(w1), UPCAST)
    return acc.to(w1_ptr.dtype.element_ty)


@triton.jit
def router_tile(hid_ptr, stride_h, w1_ptr, D, w2_ptr, offs_t, tmask, offs_e, emask, W,
                UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr,
                FULL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Router scores |relu(hid) W2^T| for token rows ``offs_t`` and experts ``offs_e``: [BLOCK_T, BLOCK_E]
    fp32, rounded to W2's dtype as the torch router's output is. ``hid`` is the router's first layer
    x W1^T before the ReLU: read from ``hid_ptr`` (one cuBLAS GEMM), or with FULL computed here from
    x (``hid_ptr``/``stride_h`` are then x's) and W1 [W, D]. The second layer accumulates in fp32."""
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        wmask = offs_w < W
        if FULL:
            hd = router_hidden_block(hid_ptr, stride_h, w1_ptr, D, offs_t, tmask, offs_w, wmask,
                                     UPCAST, BLOCK_T, BLOCK_W, BLOCK_K)
        else:
            hd = tl.load(hid_ptr + offs_t[:, None] * stride_h + offs_w[None, :], mask=tmask[:, None] & wmask[None, :],
                         other=0.0)
        hd = tl.where(hd > 0, hd, tl.zeros_like(hd))
        w2 = tl.load(w2_ptr + offs_e.to(tl.int64)[:, None] * W + offs_w[None, :], mask=emask[:, None] & wmask[None, :],
                     other=0.0)
        acc += mma(hd, tl.trans(w2), UPCAST)
    return tl.abs(acc).to(w2_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def router_select(hid_ptr, stride_h, w1_ptr, D, w2_ptr, offs_t, tmask, e, E, W,
                  UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr,
                  FULL: tl.constexpr, BLOCK_K: tl.constexpr):
    """In-kernel router tail for one expert's program: (score of router expert e [BLOCK_T], row max
    over all E router experts [BLOCK_T]) for the token rows ``offs_t``. The second layer is small
    (E x w), so a program may recompute it for its tokens instead of a separate launch; with FULL
    the first layer too (small routers: saves the router GEMM's launch)."""
    rmax = tl.zeros((BLOCK_T,), dtype=tl.float32)
    s_e = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < E
        s = router_tile(hid_ptr, stride_h, w1_ptr, D, w2_ptr, offs_t, tmask, offs_e, emask, W,
                        UPCAST, BLOCK_T, BLOCK_E, BLOCK_W, FULL, BLOCK_K)
        rmax = tl.maximum(rmax, tl.max(tl.where(emask[None, :], s, 0.0), axis=1))
        s_e += tl.sum(tl.where(offs_e[None, :] == e, s, 0.0), axis=1)
    return s_e, rmax


@triton.jit
def load_acquire(ptr):
    """An int32 scalar read with acquire semantics at GPU scope (a plain load, not an atomic: many
    programs can poll one address without serialising at L2); later reads see what was released
    before the value it returns."""
    v = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l",
                                  [(ptr + tl.arange(0, 1)).to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)
    return tl.max(v, axis=0)


@triton.jit
def grid_barrier(count_ptr, num_progs):
    """Every program of the grid waits here until all ``num_progs`` have arrived; writes before it
    are visible to every program after it. ``count_ptr`` (int32) is 0 before the barrier; the caller
    resets it once every program is known to have left (the persistent decode kernel resets one
    barrier's counter behind the next barrier). One acq_rel add per program, then acquire-polls of a
    plain load. Only for grids whose programs are all resident at once (one per SM), never under the
    interpreter (it runs programs one after another)."""
    tl.debug_barrier()  # the whole program's writes are issued before its arrival is released
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel") + 1
    while arrived < num_progs:
        arrived = load_acquire(count_ptr)
    tl.debug_barrier()
