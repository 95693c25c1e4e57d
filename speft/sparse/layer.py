"""The sparse delta layer: W = W0 + α·scatter(indices, values) on a frozen linear layer.

The base weight is kept merged (it holds W0 + α·Δ in its own dtype) so the forward pass is one
plain ``F.linear``. The trainable ``values`` are fp32 master copies, and ``base_values`` keeps W0 at
the selected entries, so the merged entries are rewritten from fp32 after every update (small
updates are not rounded away in bf16) and unmerging restores W0 bit-exactly.

In backward, the values' gradient is computed only where the mask lives: a :class:`GradPlan`, built
once per index set (and again whenever a dynamic mask changes the indices), covers the selected
entries with dense blocks (rows R × columns C of the whole layer, or per band of 64 rows or 64
columns), and each block costs one small product Xᵀ[:, C]·G[:, R] over the tokens; or, on CPU, the
product is sampled at the selected entries only (``torch.sparse.sampled_addmm``: one dot product over
the tokens per entry, about 1/6 of a dense product's rate per entry but nothing computed elsewhere).
Per layer the cheapest of these structures and the plain dense product is chosen; a layer with no
selected entry pays nothing for a weight gradient. The base weight never gets a ``.grad``, unless it
asks for one (salience scoring during training), when the dense gradient is formed and the values
read from it.

On a quantized base (bitsandbytes NF4/int8, ``model.quantization``) the delta cannot be merged: each forward
de-quantizes the weight, scatters α·Δ into that copy and forms one product (again in backward for the input's
gradient; nothing dense is kept between them), or for a single token on CUDA adds the delta from its entries
alone beside bitsandbytes' own 4-bit kernel. The values' gradient uses the same plans.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speft.models.quantization import dense_weight, is_quantized, weight_shape

VALUES_GROUP = "sparse"  # the optimizer parameter group holding every layer's values (masks find it by this name)
BAND = 64  # rows (or columns) per band of the banded structures; measured on SmolLM2-135M gradient masks
# torch warns once that CSR tensors are "beta"; the sampled product is tested against the dense one here
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass(frozen=True)
class PlanCosts:
    """The backward plans' cost model on one device type, in units of one entry of a dense product."""

    gather: float  # one gathered row/column of G or X (a memory-bound copy)
    block: float  # the fixed cost of one block product (call or kernel launch overhead)
    sampled: float | None  # one entry of the sampled product (a dot product over the tokens); None: not offered


# Per device type, measured: CPU here (experiments/efficiency/plan_costs.py; one block call ~10 µs). Other device
# types come from MEASURED_COSTS, written from the GPU check's `plans` step (experiments/gpu/check.sh); a device
# type without costs forms the values' gradient with one dense product: thousands of small block kernels per
# micro-batch would likely cost more than one GEMM, and building the plans syncs the device.
def measured_costs(path: Path) -> dict[str, PlanCosts]:
    """``{"<device type>": {"gather": .., "block": .., "sampled": ..}}`` from ``path`` (none when it is absent)."""
    if not path.is_file():
        return {}
    try:
        return {device: PlanCosts(**costs) for device, costs in json.loads(path.read_text()).items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected {{device type: {{gather, block, sampled}}}}: {e}") from None


PLAN_COSTS = {"cpu": PlanCosts(gather=16, block=512, sampled=6.0),
              **measured_costs(Path(__file__).with_name("plan_costs.json"))}
# A quantized base on these device types reads its 4-bit weight without de-quantizing it for inputs of at most
# this many tokens (bitsandbytes' fused inference kernel, decoding), so the sparse delta is added from its entries
# alone there; otherwise the weight is de-quantized once and the delta scattered into it (one product, not two).
SPARSE_PRODUCT_TOKENS = {"cuda": 1}


@dataclass
class _Block:
    rows: slice | torch.Tensor  # output features of the block: a range, or gathered indices
    cols: slice | torch.Tensor  # input features of the block
    pos: torch.Tensor  # positions of the block's entries in its flattened product (int32 if it fits)
    n_rows: int
    n_cols: int
    transposed: bool = False  # the product is formed as Xᵀ·G (cols × rows): faster for blocks than Gᵀ·X


@dataclass
class GradPlan:
    """How the values' gradient is formed for one index set of an (out, in) weight."""

    kind: str  # "empty", "dense", "rows_cols", "row_bands", "col_bands" or "sampled"
    idx: torch.Tensor  # flat indices in ``values`` order: the layer's own buffer (int32 where it fits), no copy
    blocks: list[_Block]
    gather: torch.Tensor | None  # per value, its place among the computed entries (None: in order)
    computed: int  # entries of the products per token (out·in for dense)
    dense: int  # out·in
    csr: tuple[torch.Tensor, torch.Tensor] | None = None  # "sampled": row offsets and columns, row-major

    @property
    def fraction(self) -> float:
        """Share of the dense weight gradient's entries the plan computes."""
        return self.computed / self.dense if self.dense else 0.0

    @property
    def active(self) -> bool:
        """Whether there is a values' gradient to form (an empty plan needs neither X nor a product)."""
        return self.kind != "empty"

    def values_grad(self, g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The gradient at the selected entries (in ``values`` order) from G (tokens, out), X (tokens, in)."""
        if self.csr is not None:
            out = _sampled(self.csr, g2, x2)
        elif not self.blocks:
            return g2.new_zeros(0)
        else:
            parts = []
            for b in self.blocks:
                g = g2[:, b.rows] if isinstance(b.rows, slice) else g2.index_select(1, b.rows)
                x = x2[:, b.cols] if isinstance(b.cols, slice) else x2.index_select(1, b.cols)
                prod = x.t().mm(g) if b.transposed else g.t().mm(x)
                parts.append(prod.view(-1).index_select(0, b.pos))
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.gather is not None:
            out = out.index_select(0, self.gather)
        return out


def _sampled(csr: tuple[torch.Tensor, torch.Tensor], g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """(Gᵀ·X) at the CSR pattern's entries, in row-major order: one dot product over the tokens per entry.
    sampled_addmm takes fp32/fp64 only; bf16 inputs are widened (products accumulate in fp32 either way)."""
    if g2.dtype not in (torch.float32, torch.float64):
        g2, x2 = g2.float(), x2.float()
    crow, col = csr
    pattern = torch.sparse_csr_tensor(crow, col, g2.new_zeros(col.numel()), (g2.shape[1], x2.shape[1]),
                                      check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, g2.t(), x2, beta=0.0).values()


def _selector(touched: torch.Tensor, other: int, costs: PlanCosts) -> tuple[slice | torch.Tensor, int, int]:
    """A range over the touched (sorted, unique) features or their gathered indices, whichever costs
    less with ``other`` features on the other side; returns (selector, count, start)."""
    lo, hi = int(touched[0]), int(touched[-1]) + 1
    n = touched.numel()
    if (hi - lo - n) * other <= costs.gather * n:
        return slice(lo, hi), hi - lo, lo
    return touched, n, -1


def _block(rows: torch.Tensor, cols: torch.Tensor, costs: PlanCosts) -> tuple[_Block, int]:
    """One block covering the entries at (rows, cols); returns it and its cost."""
    ur, r_inv = torch.unique(rows, return_inverse=True)
    uc, c_inv = torch.unique(cols, return_inverse=True)
    rsel, nr, r0 = _selector(ur, uc.numel(), costs)
    csel, nc, c0 = _selector(uc, nr, costs)
    ri = rows - r0 if r0 >= 0 else r_inv
    ci = cols - c0 if c0 >= 0 else c_inv
    cost = nr * nc + costs.gather * ((0 if r0 >= 0 else nr) + (0 if c0 >= 0 else nc)) + costs.block
    # Formed as Xᵀ[C]·G[:, R] (cols × rows): for a row band (its rows a strided slice of G) MKL forms
    # this up to 2.5x faster than Gᵀ[R]·X[:, C], other blocks take the same time either way; on
    # SmolLM2-135M's grad masks (512 tokens, CPU) all plans together take about 10 % less.
    return _Block(rsel, csel, _compact(ci * nr + ri, nr * nc), nr, nc, True), cost


def _places(order: torch.Tensor) -> torch.Tensor | None:
    """Each value's place among entries computed in ``order`` (the inverse permutation); None when the
    order is the values' own."""
    n = order.numel()
    return None if torch.equal(order, torch.arange(n, device=order.device)) else _compact(torch.argsort(order), n)


def _compact(index: torch.Tensor, bound: int) -> torch.Tensor:
    """int32 when every value fits (index_select takes either; half the memory of int64)."""
    return index.to(torch.int32) if bound <= torch.iinfo(torch.int32).max else index


def _banded(rows: torch.Tensor, cols: torch.Tensor, by_rows: bool,
            costs: PlanCosts) -> tuple[list[_Block], torch.Tensor, int]:
    band = torch.div(rows if by_rows else cols, BAND, rounding_mode="floor")
    order = torch.sort(band, stable=True).indices
    counts = torch.bincount(band[order]).tolist()
    blocks, cost, start = [], 0, 0
    for c in counts:
        if c:
            sl = order[start:start + c]
            b, bc = _block(rows[sl], cols[sl], costs)
            blocks.append(b)
            cost += bc
        start += c
    return blocks, order, cost


def _sampled_plan(idx: torch.Tensor, wide: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  shape: tuple[int, int]) -> GradPlan:
    """The CSR pattern of the entries (row-major, as the sampled product returns them) and, when the
    indices are not sorted (after a regrow), each value's place in that order."""
    out_f, in_f = shape
    n = idx.numel()
    order = torch.argsort(wide)
    crow = torch.zeros(out_f + 1, dtype=torch.int64, device=idx.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), 0)
    bound = max(in_f, n)
    return GradPlan("sampled", idx, [], _places(order), n, out_f * in_f,
                    (_compact(crow, bound), _compact(cols[order], bound)))


def candidate_plans(indices: torch.Tensor, shape: tuple[int, int]) -> list[tuple[GradPlan, int]]:
    """Every structure for these flat indices with its estimated cost: dense, rows × columns, row
    bands, column bands and, where its cost was measured, the sampled product (or only "empty" when there is no
    index; only dense on a device type without :data:`PLAN_COSTS`). ``indices`` are kept as given (the layer's
    buffer) in each plan."""
    out_f, in_f = shape
    dense_n = out_f * in_f
    idx = indices.reshape(-1)
    if idx.numel() == 0:
        return [(GradPlan("empty", idx, [], None, 0, dense_n), 0)]
    dense = GradPlan("dense", idx, [_Block(slice(None), slice(None), idx, out_f, in_f)], None, dense_n, dense_n)
    costs = PLAN_COSTS.get(idx.device.type)
    if costs is None:
        return [(dense, dense_n)]
    wide = idx.to(torch.int64)
    rows, cols = torch.div(wide, in_f, rounding_mode="floor"), wide % in_f
    blk, cost = _block(rows, cols, costs)
    plans = [(dense, dense_n + costs.block), (GradPlan("rows_cols", idx, [blk], None, blk.n_rows * blk.n_cols,
                                                       dense_n), cost)]
    for by_rows in (True, False):
        blocks, order, cost = _banded(rows, cols, by_rows, costs)
        plans.append((GradPlan("row_bands" if by_rows else "col_bands", idx, blocks, _places(order),
                               sum(b.n_rows * b.n_cols for b in blocks), dense_n), cost))
    if costs.sampled is not None:
        # the kernel copies Gᵀ and Xᵀ to contiguous rows first: one gathered row per feature
        cost = int(costs.sampled * idx.numel()) + costs.gather * (out_f + in_f) + costs.block
        plans.append((_sampled_plan(idx, wide, rows, cols, shape), cost))
    return plans


def build_plan(indices: torch.Tensor, shape: tuple[int, int]) -> GradPlan:
    """The cheapest structure for these flat indices (see :func:`candidate_plans`)."""
    return min(candidate_plans(indices, shape), key=lambda pc: pc[1])[0]  # ties: the first (dense)


def _values_grad(plan: GradPlan, grad_out: torch.Tensor, x: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """α times the values' gradient, from the plan's blocks (fp32; an empty plan has none to form)."""
    if not plan.active:
        return torch.zeros(0, dtype=torch.float32, device=grad_out.device)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad = plan.values_grad(g2, x.reshape(-1, x.shape[-1])).float()
    return grad.mul_(scaling) if scaling != 1.0 else grad


def _delta_backward(ctx, grad_out: torch.Tensor, weight) -> tuple:
    """(input's, values') gradients of y = x @ Wᵀ when W is formed from the values (``weight(values, dtype)``):
    the unmerged paths, whose dense W is formed again here rather than kept from forward."""
    x, values = ctx.saved_tensors
    grad_x = grad_out @ weight(values, grad_out.dtype) if ctx.needs_input_grad[0] else None
    grad_values = _values_grad(ctx.plan, grad_out, x, ctx.scaling) if ctx.needs_input_grad[1] else None
    return grad_x, grad_values


class _SparseDeltaLinear(torch.autograd.Function):
    """F.linear over the merged weight. Backward forms the values' gradient from the plan's blocks;
    the dense weight gradient is formed (and the values read from it) only when the weight asks for
    it (salience scoring during training: reselect and regrow masks)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, plan, scaling):
        keep_x = weight.requires_grad or (values.requires_grad and plan.active)
        ctx.save_for_backward(x if keep_x else None, weight)
        ctx.plan, ctx.scaling = plan, scaling
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        grad_x = grad_values = grad_weight = grad_bias = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[2]:
            grad_weight = g2.t().mm(x.reshape(-1, x.shape[-1]))
            if ctx.needs_input_grad[1]:
                grad_values = grad_weight.view(-1).index_select(0, plan.idx).float()
                if ctx.scaling != 1.0:
                    grad_values.mul_(ctx.scaling)
        elif ctx.needs_input_grad[1]:
            grad_values = _values_grad(plan, grad_out, x, ctx.scaling)
        if ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0)
        return grad_x, grad_values, grad_weight, grad_bias, None, None


class _SparseDelta(torch.autograd.Function):
    """y = x @ (α·scatter(values))ᵀ for the dropout path, where the delta cannot stay merged. The
    values' gradient comes from the plan's blocks, as in :class:`_SparseDeltaLinear`."""

    @staticmethod
    def forward(ctx, x, values, plan, shape, scaling):
        ctx.save_for_backward(x if plan.active else None, values)
        ctx.plan, ctx.shape, ctx.scaling = plan, shape, scaling
        return F.linear(x, _dense(values, plan.idx, shape, scaling, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return *_delta_backward(ctx, grad_out, lambda values, dtype: _dense(values, ctx.plan.idx, ctx.shape,
                                                                            ctx.scaling, dtype)), None, None, None


class _QuantizedDeltaLinear(torch.autograd.Function):
    """F.linear over dequantize(W0) + α·scatter(values) for a quantized base: the delta cannot be merged into a
    4-bit or int8 weight. The dense weight is formed in forward and again in backward (for the input's gradient),
    never kept between them, so the quantized model's memory stays quantized; the values' gradient comes from the
    plan's blocks, as in :class:`_SparseDeltaLinear`."""

    @staticmethod
    def forward(ctx, x, values, base, plan, scaling):
        ctx.save_for_backward(x if (values.requires_grad and plan.active) else None, values)
        ctx.base, ctx.plan, ctx.scaling = base, plan, scaling
        return F.linear(x, _with_delta(base, values, plan.idx, scaling, x.dtype), base.bias)

    @staticmethod
    def backward(ctx, grad_out):
        return *_delta_backward(ctx, grad_out, lambda values, dtype: _with_delta(ctx.base, values, ctx.plan.idx,
                                                                                 ctx.scaling, dtype)), None, None, None


def _with_delta(base: nn.Module, values, indices, scaling, dtype) -> torch.Tensor:
    """dequantize(W0) + α·scatter(values), dense, in ``dtype`` (a fresh tensor: the quantized weight is untouched)."""
    w = dense_weight(base).to(dtype)
    w.view(-1)[indices] += (scaling * values.detach()).to(dtype)
    return w


def sparse_product(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int],
                   scaling: float) -> torch.Tensor:
    """x @ (α·scatter(values))ᵀ from the selected entries alone: tokens × entries products gathered into their
    output features (autograd gives the values' gradient). For a token or two (decoding) this costs far less than
    forming the dense (out, in) delta."""
    wide = indices.to(torch.int64)
    rows, cols = torch.div(wide, shape[1], rounding_mode="floor"), wide % shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    contrib = x2.index_select(1, cols) * (scaling * values).to(x.dtype)
    out = x2.new_zeros(x2.shape[0], shape[0]).index_add(1, rows, contrib)
    return out.view(*x.shape[:-1], shape[0])


def _dense(values, indices, shape, scaling, dtype) -> torch.Tensor:
    d = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    d[indices] = (scaling * values).to(dtype)  # indexing takes int32 indices (index_copy_ wants int64)
    return d.view(shape)


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


class SparseDeltaLinear(nn.Module):
    """Wraps a ``nn.Linear``; trains ``values`` at flat ``indices`` of its weight."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, scaling: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        # Dropout on the delta's input, as in the reference implementation; with p > 0 the delta
        # cannot stay merged while training, so it takes a separate (slower) path.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.base = base
        # A quantized (bitsandbytes) base cannot hold the delta merged: it is added beside it in every forward.
        self.quantized = is_quantized(base)
        self.shape = weight_shape(base)
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        weight = dense_weight(base)
        idx = torch.sort(indices.reshape(-1).to(torch.int64)).values
        if idx.numel() and (idx[0] < 0 or idx[-1] >= weight.numel()):
            raise ValueError("sparse indices outside the weight")
        self.scaling = float(scaling)
        self.register_buffer("indices", idx.to(device=weight.device, dtype=index_dtype(weight.numel())))
        self.register_buffer("base_values", weight.detach().reshape(-1)[idx].clone())
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=weight.device))
        self._synced = None  # values._version last written into the weight; None: weight holds W0
        self._origin = None  # (indices, pretrained values) of all entries ever selected, after a reselect
        self._plan_key = None  # (storage, version) of ``indices`` the cached plan was built for
        self._plan_cache = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def plan(self) -> GradPlan:
        """The backward plan of the current ``indices``; rebuilt whenever they change
        (a reselect assigns new ones, a regrow or a state-dict load writes them in place)."""
        key = (self.indices.data_ptr(), self.indices._version, self.indices.device)
        if self._plan_key != key:
            with torch.no_grad():
                self._plan_cache = build_plan(self.indices, self.shape)
            self._plan_key = key
        return self._plan_cache

    @torch.no_grad()
    def sync(self) -> None:
        """Write W0 + α·values into the merged weight entries (after the values changed); a quantized base keeps
        the delta apart."""
        if self.quantized or self._synced == self.values._version:
            return
        merged = self.base_values.float() + self.scaling * self.values
        self.base.weight.view(-1)[self.indices] = merged.to(self.base.weight.dtype)
        self._synced = self.values._version

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pretrained weight exactly (also after reselections merged earlier deltas)."""
        if self.quantized:
            return
        w = self.base.weight.view(-1)
        w[self.indices] = self.base_values
        if self._origin is not None:
            w.index_copy_(0, self._origin[0], self._origin[1])
        self._synced = None

    @torch.no_grad()
    def reselect(self, indices: torch.Tensor) -> nn.Parameter:
        """Merge the learned delta into the base, then train new ``indices`` from zero.

        The pretrained values of every entry ever selected are kept, so :meth:`unmerge` and
        :meth:`export` still refer to the original weight. Returns the new ``values`` parameter.
        """
        if self.quantized:
            raise ValueError("a quantized base cannot take a merged delta: re-selection (mask=reselect) needs "
                             "model.quantization=none")
        self.sync()
        w = self.base.weight.view(-1)
        old = self.indices.long()
        if self._origin is None:
            self._origin = (old.clone(), self.base_values.clone())
        idx = torch.sort(indices.reshape(-1).to(device=w.device, dtype=torch.int64)).values
        fresh = idx[~torch.isin(idx, self._origin[0])]  # untouched so far: they still hold W0
        self._origin = (torch.cat([self._origin[0], fresh]), torch.cat([self._origin[1], w[fresh].clone()]))
        self.indices = idx.to(self.indices.dtype)
        self.base_values = w[idx].clone()
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=w.device))
        self._synced = self._plan_key = None  # the plan is rebuilt for the new indices
        return self.values

    @torch.no_grad()
    def regrow(self, slots: torch.Tensor, indices: torch.Tensor) -> None:
        """Drop the entries at ``slots`` (their weight returns to W0) and train ``indices`` there from zero.

        Entries in other slots keep their values (and, in the optimizer, their moments).
        """
        w = dense_weight(self.base).view(-1)
        slots = slots.to(device=w.device, dtype=torch.int64)
        if not self.quantized:  # the merged entries return to W0 (a quantized weight never held them)
            w.index_copy_(0, self.indices.long()[slots], self.base_values[slots])
        new = indices.to(device=w.device, dtype=torch.int64)
        self.indices[slots] = new.to(self.indices.dtype)
        self.base_values[slots] = w[new]
        self.values[slots] = 0.0
        self._synced = self._plan_key = None  # the plan is rebuilt for the new indices

    @torch.no_grad()
    def checkpoint_state(self) -> dict:
        """Everything that differs from a freshly injected layer on the pretrained weight, for an exact
        resume (bytes per trainable entry, never the base weight): indices, values, their base values,
        the record of every entry ever selected (reselect) and the weight at all touched entries."""
        idx = self.indices.long()
        touched = idx if self._origin is None else torch.unique(torch.cat([idx, self._origin[0]]))
        synced = "none" if self._synced is None else ("current" if self._synced == self.values._version else "stale")
        return {"indices": self.indices.clone(), "values": self.values.detach().clone(),
                "base_values": self.base_values.clone(), "origin": self._origin, "synced": synced,
                # entries touched: the current ones (not stored again) or, after a reselect, all ever selected
                "touched": None if self._origin is None else touched.to(index_dtype(self.base_values.numel())),
                # a quantized weight never changes: nothing of it to store
                "weight_touched": None if self.quantized else self.base.weight.view(-1)[touched].clone()}

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict) -> nn.Parameter:
        """Restore :meth:`checkpoint_state`; returns the new ``values`` parameter (swap it into the optimizer)."""
        dev = self.indices.device
        if state["weight_touched"] is not None:
            w = self.base.weight.view(-1)
            touched = state["indices"] if state["touched"] is None else state["touched"]
            w.index_copy_(0, touched.to(dev, torch.int64), state["weight_touched"].to(dev, w.dtype))
        self.indices = state["indices"].to(dev)
        self.base_values = state["base_values"].to(dev)
        origin = state["origin"]
        self._origin = None if origin is None else (origin[0].to(dev), origin[1].to(dev))
        self.values = nn.Parameter(state["values"].to(dev).clone(), requires_grad=self.values.requires_grad)
        self._synced = {"none": None, "current": self.values._version, "stale": -1}[state["synced"]]
        self._plan_key = None
        return self.values

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted flat indices, fp32 values) with W = W_pretrained + α·scatter(values): an adapter's content."""
        if self._origin is None:
            idx, values = self.indices.long(), self.values.detach().float()
        else:
            self.sync()
            idx, w0 = self._origin
            values = (self.base.weight.view(-1)[idx].float() - w0.float()) / self.scaling
        order = torch.argsort(idx)
        return idx[order].to(self.indices.dtype), values[order]

    def delta(self) -> torch.Tensor:
        """Dense α·Δ (for tests and analysis)."""
        d = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32, device=self.values.device)
        d[self.indices.long()] = self.scaling * self.values.detach()
        return d.view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.dropout, nn.Dropout):
            if self._synced is not None:
                self.unmerge()
            delta = _SparseDelta.apply(self.dropout(x), self.values, self.plan, self.shape, self.scaling)
            return self.base(x) + delta
        if self.quantized:
            tokens = x.numel() // x.shape[-1]
            if tokens <= SPARSE_PRODUCT_TOKENS.get(x.device.type, 0):
                return self.base(x) + sparse_product(x, self.values, self.indices, self.shape, self.scaling)
            return _QuantizedDeltaLinear.apply(x, self.values, self.base, self.plan, self.scaling)
        self.sync()
        w = self.base.weight
        return _SparseDeltaLinear.apply(x, self.values, w, self.base.bias, self.plan, self.scaling)


def inject(model: nn.Module, indices: dict[str, torch.Tensor], scaling: float = 1.0,
           dropout: float = 0.0) -> dict[str, SparseDeltaLinear]:
    """Replace each named ``nn.Linear`` by a :class:`SparseDeltaLinear` with the given indices."""
    layers = {}
    for name, idx in indices.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
        layer = SparseDeltaLinear(base, idx, scaling, dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def sparse_layers(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
