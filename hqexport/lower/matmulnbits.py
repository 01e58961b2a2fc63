"""Lower hqexport.HQQMatMul to onnxruntime's com.microsoft.MatMulNBits where that op expresses the layer.

HQQ zero points are fractional; MatMulNBits runs its fast kernels only with uint8 zero points. So each group's
zero z is split into an integer part and a correction (design.md §5):

    (q - z) * s  =  (q - zr) * s  +  (zr - z) * s,         zr = clip(round(z), 0, 2^bits - 1)
    Y = MatMulNBits(A; q, s, zr)  +  (A @ G) @ corr^T,   corr = (zr - z) * s

where G [K, K / group_size] is 1 where input k belongs to group j (A @ G sums A over each group). Exact up to
float rounding. 3-bit codes ride in a 4-bit container and 1-bit codes in a 2-bit one.

In mode "auto", with fp32 activations, the right-hand side is one hqexport.HQQMatMulNBits node (ops/nbits.py,
carrying the accuracy level): its function body is that expression in stock ops, and hqexport's library runs it
as one kernel. Otherwise (fp16, or mode "ort") the pass writes the expression itself, the group sums shared by
the layers reading the same input. Layers whose zeros are integers already are a MatMulNBits alone.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from hqexport.errors import HQExportError
from hqexport.export.lazy import lazy_tensor
from hqexport.formats.canonical import pack_canonical, unpack_canonical
from hqexport.manifest import Lowering
from hqexport.ops.nbits import ACCURACY_LEVEL, COMPUTE_DTYPE
from hqexport.ops.nbits import OP_TYPE as NBITS_OP_TYPE
from hqexport.ops.schema import DOMAIN, HQQ_OP, MS_DOMAIN, OP_TYPE

_CONTAINER_BITS = {1: 2, 2: 2, 3: 4, 4: 4, 8: 8}


@dataclass(frozen=True)
class LayerDecision:
    """What the pass did with one HQQMatMul node (recorded in the manifest)."""

    op: str  # "com.microsoft.MatMulNBits", "hqexport.HQQMatMulNBits" (with its correction) or "hqexport.HQQMatMul"
    reason: str | None = None  # why the layer stayed an hqexport op
    node: str | None = None  # the MatMulNBits / HQQMatMulNBits node now computing the layer
    initializers: dict[str, str] | None = None  # its inputs: "B", "scales", "zero_points" (+ "zero_correction")
    container_bits: int | None = None
    accuracy_level: int | None = None
    zero_correction: bool | None = None  # False when every zero point was already an integer in range

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def record(self) -> Lowering:
        """The manifest's record of it: why the layer was kept, or the MatMulNBits form it got."""
        return Lowering(self.reason, self.container_bits, self.accuracy_level, self.zero_correction)


def matmulnbits_blocker(*, bits: int, group_size: int, axis: int, in_features: int) -> str | None:
    """Why MatMulNBits cannot express this layer exactly, or None when it can."""
    if axis != 1:
        return "axis 0 groups run along the output dimension; MatMulNBits blocks run along K"
    if bits not in _CONTAINER_BITS:
        return f"{bits}-bit storage has no MatMulNBits container"
    if group_size < 16 or group_size & (group_size - 1):
        return f"group size {group_size} is not a power of 2 >= 16"
    if in_features % group_size:
        return f"group size {group_size} does not divide K={in_features}, so groups straddle rows"
    return None


class LowerToMatMulNBits(ir.passes.InPlacePass):
    """Replace every expressible HQQMatMul node by MatMulNBits (+ exact zero-point correction).

    mode "auto" keeps the others as hqexport ops and fuses each exact correction into an HQQMatMulNBits node, and
    also the nodes named in `fuse`, whose correction is zero (onnxruntime's CPU MatMulNBits has no fast fp32 path
    for 8-bit weights; hqexport's library has), and every layer of a float16 / bfloat16 compute dtype, whose
    roundings only the node's kernel reproduces (its compute_dtype attribute, ops/nbits.py). mode "ort" writes
    onnxruntime's ops only (for those layers, weights within one rounding of hqq's: the manifest calls it lossy) and
    raises HQExportError for the first layer that cannot be lowered. `decisions` maps node names to what was done.
    """

    def __init__(self, mode: str = "auto", accuracy_level: int = 0, fuse: Collection[str] = ()) -> None:
        super().__init__()
        if mode not in ("auto", "ort"):
            raise ValueError(f"mode must be 'auto' or 'ort', not {mode!r}")
        self.mode = mode
        self.accuracy_level = accuracy_level
        self.fuse = frozenset(fuse)  # nodes fused although their zero points are integers (see `_lower`)
        self.decisions: dict[str, LayerDecision] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        self._group_sums: dict[tuple[ir.Value, int], ir.Value] = {}
        self._indicators: dict[tuple[int, int, str], ir.Value] = {}
        for node in list(graph):
            if node.domain != DOMAIN or node.op_type != OP_TYPE:
                continue
            attrs = {key: node.attributes.get_int(key) for key in ("N", "K", "bits", "group_size", "axis")}
            blocker = matmulnbits_blocker(
                bits=attrs["bits"], group_size=attrs["group_size"], axis=attrs["axis"], in_features=attrs["K"]
            )
            if blocker is not None:
                if self.mode == "ort":
                    raise HQExportError(f"--ops ort: layer {node.name} cannot run as MatMulNBits: {blocker}")
                self.decisions[node.name] = LayerDecision(op=HQQ_OP, reason=blocker)
                continue
            self.decisions[node.name] = self._lower(graph, node, **attrs)
            modified = True
        if modified:
            graph.sort()
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.RemoveUnusedFunctionsPass()(model)
            common_passes.RemoveUnusedOpsetsPass()(model)
        return ir.passes.PassResult(model, modified)

    def _indicator(self, graph: ir.Graph, K: int, group_size: int, dtype: np.dtype) -> ir.Value:
        """The group-sum matrix for (K, group size), one initializer shared by every layer that needs it."""
        key = (K, group_size, np.dtype(dtype).name)
        if key not in self._indicators:
            name = f"zero_correction.group_sum_K{K}_g{group_size}_{key[2]}"
            value = ir.Value(name=name, const_value=ir.tensor(_group_indicator(K, group_size, dtype), name=name))
            graph.register_initializer(value)
            self._indicators[key] = value
        return self._indicators[key]

    def _lower(self, graph: ir.Graph, node: ir.Node, *, N: int, K: int, bits: int, group_size: int, axis: int) -> LayerDecision:
        a, w, scale, zero, *rest = node.inputs
        bias = rest[0] if rest else None
        act_dtype = a.dtype
        if act_dtype is None:
            raise HQExportError(f"layer {node.name}: the input's dtype is unknown, cannot lower it")
        act_np = act_dtype.numpy()
        container = _CONTAINER_BITS[bits]
        blocks = K // group_size
        weight, split = _const(w, node), _ZeroSplit(_const(scale, node), _const(zero, node), N, blocks, container)
        b_shape = (N, blocks, group_size * container // 8)

        prefix = node.name or w.name
        new_nodes: list[ir.Node] = []
        names: dict[str, str] = {}

        def initializer(
            suffix: str, data: np.ndarray | Callable[[], np.ndarray], dtype: type | None = None, shape: tuple[int, ...] = ()
        ) -> ir.Value:
            """A new initializer: `data` is an array, or a function computing it when written (with its dtype, shape)."""
            name = names[suffix] = f"{prefix}.{suffix}"
            tensor = lazy_tensor(name, dtype, shape, data) if callable(data) else ir.tensor(data, name=name)
            value = ir.Value(name=name, const_value=tensor)
            graph.register_initializer(value)
            return value

        def add(op_type: str, inputs: list[ir.Value | None], domain: str = "", **attributes) -> ir.Value:
            new = ir.node(op_type, inputs, attributes or None, domain=domain, name=f"{prefix}/{op_type}_{len(new_nodes)}")
            new_nodes.append(new)
            return new.outputs[0]

        quantized = [
            a,
            initializer("B", lambda: _repacked(weight.numpy(), K, bits, container).reshape(b_shape), np.uint8, b_shape),
            initializer("scales", lambda: split.scale.reshape(-1).astype(act_np), act_np, (N * blocks,)),
            initializer("zero_points", split.packed_zero_points, np.uint8, split.zero_points_shape),
        ]
        shape = dict(K=K, N=N, bits=container, block_size=group_size)
        needs_correction = split.needs_correction()
        # hqq rounds a float16 / bfloat16 layer's weights to that dtype, which only the fused node's kernel reproduces
        compute = _COMPUTE_DTYPES.get(_const(scale, node).dtype)
        fused = self.mode == "auto" and act_np == np.float32 and (needs_correction or node.name in self.fuse or compute is not None)
        if needs_correction or fused:  # integer zero points need none: MatMulNBits alone is exact
            correction = initializer("zero_correction", lambda: split.correction().T.astype(act_np), act_np, (blocks, N))
            indicator = self._indicator(graph, K, group_size, act_np)
        if fused:  # one node: a compiled kernel where the library is registered, else its body (ops/nbits.py)
            level = {ACCURACY_LEVEL: self.accuracy_level} if self.accuracy_level else {}
            rounding = {COMPUTE_DTYPE: compute} if compute is not None else {}
            y = add(NBITS_OP_TYPE, [*quantized, indicator, correction], domain=DOMAIN, **shape, **level, **rounding)
        else:
            y = add("MatMulNBits", quantized, domain=MS_DOMAIN, accuracy_level=self.accuracy_level, **shape)
            if needs_correction:
                group_sums = self._group_sums.get((a, group_size))
                if group_sums is None:  # layers reading the same input share their group sums
                    group_sums = self._group_sums[(a, group_size)] = add("MatMul", [a, indicator])
                y = add("Add", [y, add("MatMul", [group_sums, correction])])
        if bias is not None:
            y = add("Add", [y, bias])
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [y])
        for value in (w, scale, zero):
            if not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]
        return LayerDecision(
            op=f"{DOMAIN}.{NBITS_OP_TYPE}" if fused else f"{MS_DOMAIN}.MatMulNBits",
            node=new_nodes[0].name,
            initializers={key: names[key] for key in ("B", "scales", "zero_points", "zero_correction") if key in names},
            container_bits=container,
            accuracy_level=self.accuracy_level,
            zero_correction=needs_correction,
        )


#: a layer's scale dtype -> HQQMatMulNBits' compute_dtype (float: the attribute's default, left out)
_COMPUTE_DTYPES = {ir.DataType.FLOAT16: int(ir.DataType.FLOAT16), ir.DataType.BFLOAT16: int(ir.DataType.BFLOAT16)}


def _group_indicator(K: int, group_size: int, dtype: np.dtype) -> np.ndarray:
    """G [K, K / group_size]: G[k, j] = 1 where input k is in group j (A @ G sums each group of A)."""
    return np.kron(np.eye(K // group_size, dtype=dtype), np.ones((group_size, 1), dtype=dtype))


def _repacked(codes: np.ndarray, K: int, bits: int, container: int) -> np.ndarray:
    """Canonical packed codes in the container width: the same bytes for 2/4/8 bits, repacked for 1 and 3."""
    return codes if bits == container else pack_canonical(unpack_canonical(codes, K, bits), container)


class _ZeroSplit:
    """One layer's zero points split into uint8 zero points and the correction (module docstring).

    Each part is computed from the scale and zero tensors when asked for, so that a lowered layer holds no
    arrays of its own until it is written.
    """

    def __init__(self, scale: ir.TensorProtocol, zero: ir.TensorProtocol, N: int, blocks: int, container: int) -> None:
        self._scale, self._zero = scale, zero
        self._shape, self._container = (N, blocks), container
        self.zero_points_shape = (N * -(-blocks // (8 // container)),)  # each row's zero points padded to bytes

    @property
    def scale(self) -> np.ndarray:
        return self._scale.numpy().astype(np.float64).reshape(self._shape)

    def _zeros(self) -> tuple[np.ndarray, np.ndarray]:
        """(z, zr): hqq's zero points and their integer parts in the container's range."""
        z = self._zero.numpy().astype(np.float64).reshape(self._shape)
        return z, np.clip(np.round(z), 0, (1 << self._container) - 1)

    def packed_zero_points(self) -> np.ndarray:
        return pack_canonical(self._zeros()[1].astype(np.uint8), self._container).reshape(-1)

    def correction(self) -> np.ndarray:
        z, zr = self._zeros()
        return (zr - z) * self.scale

    def needs_correction(self) -> bool:
        return bool(np.any(self.correction() != 0))


def _const(value: ir.Value | None, node: ir.Node) -> ir.TensorProtocol:
    if value is None or value.const_value is None:
        raise HQExportError(f"layer {node.name}: packed weights, scale and zero must be initializers to lower it")
    return value.const_value
