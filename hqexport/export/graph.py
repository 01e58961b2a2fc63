"""The decoder graph, built directly from the config and the HQQ weights (onnx_ir), in the ops onnxruntime fuses.

Per decoder layer (the shape onnxruntime-genai's model builder gives its own models):

    SkipSimplifiedLayerNormalization -> HQQMatMul (q, k, v packed) -> GroupQueryAttention (rotary inside,
    KV cache [batch, kv_heads, sequence, head_dim]) -> HQQMatMul (o) -> SkipSimplifiedLayerNormalization ->
    HQQMatMul (gate, up packed) -> Split -> activation -> Mul -> HQQMatMul (down)

(lowering turns the HQQMatMul nodes into MatMulNBits or HQQMatMulNBits ones, and folds a SiLU gating into its
HQQMatMulNBits gate/up node: lower/swiglu.py).

The residual stream runs through the Skip norms' fourth output, which is named `block_output_name(i)` after
layer i (validate reads the blocks there). Layers sharing an input and an HQQ format (axis 1) are packed
into one node by concatenating their codes, scales and zeros along N: exact, since HQQ's groups of one row never
reach another. When an adapter targets one of a packed node's layers, the node's output is split, and the LoRA
branch is added to that layer's part (adapters/graph.py).

Every weight is an `ir.LazyTensor`: its data is computed from the source only when the file is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
import transformers

from hqexport.errors import UnsupportedModelError
from hqexport.export.architectures import architecture, embedding_scale, head_dim, rotary_class, sliding_window
from hqexport.export.decoder import DecoderIO
from hqexport.export.lazy import lazy_tensor
from hqexport.formats.dequant import numpy_dtype, tensor_to_numpy
from hqexport.manifest import Lowering
from hqexport.model import QuantizedLinear, QuantizedModel
from hqexport.ops.half import OP_TYPE as HALF_OP_TYPE
from hqexport.ops.inputs import packed_inputs
from hqexport.ops.schema import DOMAIN, HQQ_OP, MS_DOMAIN, OP_TYPE, SINCE_VERSION
from hqexport.ops.shortlist import OP_TYPE as SHORTLIST_OP_TYPE


def node_name(layer_path: str) -> str:
    return f"{layer_path}/{OP_TYPE}"


def block_output_name(index: int) -> str:
    """The residual stream after decoder layer `index` (the output validate compares per block)."""
    return f"model.layers.{index}.output"


@dataclass(frozen=True)
class LayerNode:
    """Where one quantized layer ended up in the graph, and the op computing it there (lowering may change both)."""

    node: str
    initializers: dict[str, str | None]  # op input ("weight", "scale", "zero", "bias") -> initializer name
    shape: tuple[int, int]  # the layer's [out_features, in_features]
    module: str  # the node's module path: the layer's, or a packed node's (e.g. model.layers.0.mlp.gate_up_proj)
    op: str = HQQ_OP
    rows: tuple[int, int] | None = None  # the layer's output rows in a packed node, [start, stop)
    output: str | None = None  # the value holding only this layer's output, split off a packed node's
    lowering: Lowering | None = None  # what the lowering pass did with the node


@dataclass
class DecoderGraph:
    model: ir.Model
    layers: dict[str, LayerNode] = field(default_factory=dict)  # by module path


def build_decoder(
    qmodel: QuantizedModel,
    config: transformers.PretrainedConfig,
    io: DecoderIO,
    *,
    opset: int,
    own_outputs: Collection[str] = (),
    head: QuantizedLinear | None = None,
    shortlist: int | None = None,
    half_head: torch.dtype | None = None,
    grid: QuantizedLinear | None = None,
) -> DecoderGraph:
    """The decoder graph of `qmodel`; the layers in `own_outputs` (adapter targets) get an output value of their
    own (`LayerNode.output`: their part of a packed node's output, split off).

    head: an HQQ layer computing lm_head in place of the fp head (convert --lm-head, lower/lm_head.py).
    shortlist: with `head`, recompute that many of its largest logits per position from the fp head's rows.
    half_head: torch.float16 or torch.bfloat16, a dtype that holds every value of the fp head (lower/lm_head.py's
    exact_half_head): the fp head's table is stored in it, and a tied embedding reads the same table; without a
    shortlist the head is computed from it by hqexport.HalfMatMul (ops/half.py).
    grid: with a shortlist, the fp head's values as an exact int8 grid (lower/lm_head.py's exact_int8_head): the
    rows it rescores (one hqexport.GridShortlist node, ops/shortlist.py), and a tied embedding's
    (GatherBlockQuantized), come from the grid instead of a fp table.
    """
    builder = _Builder(qmodel, config, io, opset, set(own_outputs), head, shortlist, half_head, grid)
    return DecoderGraph(builder.build(), builder.layers)


class _Builder:
    def __init__(
        self, qmodel: QuantizedModel, config: transformers.PretrainedConfig, io: DecoderIO, opset: int, own_outputs: set[str],
        head: QuantizedLinear | None, shortlist: int | None, half_head: torch.dtype | None = None,
        grid: QuantizedLinear | None = None,
    ) -> None:
        self.qmodel, self.config, self.io, self.own_outputs = qmodel, config, io, own_outputs
        self.half_head = numpy_dtype(half_head) if half_head is not None else None
        self.shortlist = shortlist if head is not None else None
        self.grid = grid if self.shortlist else None
        # the fp head's table: the embedding's when tied
        self.head_table = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        self.quantized = {**qmodel.linears, **({head.name: head} if head is not None else {})}
        self.arch = architecture(config)
        self.act = numpy_dtype(io.dtype)
        self.graph = ir.Graph([], [], nodes=[], name="decoder", opset_imports={"": opset, MS_DOMAIN: 1, DOMAIN: SINCE_VERSION})
        self.layers: dict[str, LayerNode] = {}
        self.eps = float(config.rms_norm_eps)

    # ------------------------------------------------------------ graph plumbing

    def op(
        self, op_type: str, inputs: Sequence[ir.Value | None], *, name: str, domain: str = "", outputs: int = 1,
        dtype: ir.DataType | None = None, **attributes,
    ) -> ir.Value | tuple[ir.Value, ...]:
        """Append a node; its outputs have `dtype` (the activation dtype unless given; a Cast's target)."""
        node = ir.node(op_type, list(inputs), attributes or None, domain=domain, name=name, num_outputs=outputs)
        dtype = attributes.get("to", dtype) if op_type == "Cast" else dtype
        for index, output in enumerate(node.outputs):
            output.name = f"{name}/output_{index}"
            output.type = ir.TensorType(dtype or ir.DataType.from_numpy(self.act))
        self.graph.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        dtype = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=dtype, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def weight(self, name: str, dtype: np.dtype, shape: Sequence[int], load: Callable[[], np.ndarray]) -> ir.Value:
        """A lazily loaded initializer, or the one already registered under `name`: a table that two nodes read (a
        tied embedding and the rows a lossy head rescores)."""
        existing = self.graph.initializers.get(name)
        if existing is not None:
            if existing.dtype != ir.DataType.from_numpy(np.dtype(dtype)) or tuple(existing.shape) != tuple(shape):
                raise ValueError(f"initializer {name} is already registered with another dtype or shape")
            return existing
        tensor = lazy_tensor(name, dtype, shape, load)
        value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def fp_tensor(self, key: str, offset: float = 0.0) -> ir.Value:
        """An fp tensor of the source (e.g. a norm weight) in the activation dtype; `offset` is added in fp32 first."""
        tensor = self.qmodel.tensors[key]  # config.check_weights made sure the source has it
        dtype = np.dtype(self.act)

        def load(tensor: torch.Tensor = tensor) -> np.ndarray:
            array = tensor_to_numpy(tensor).astype(np.float32 if offset else dtype)
            return (array + np.float32(offset)).astype(dtype) if offset else array

        return self.weight(key, dtype, tuple(tensor.shape), load)

    # ------------------------------------------------------------ the decoder

    def build(self) -> ir.Model:
        io, config, graph = self.io, self.config, self.graph
        act_type = ir.TensorType(ir.DataType.from_numpy(self.act))
        int64 = ir.TensorType(ir.DataType.INT64)
        input_ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "sequence"]), type=int64)
        attention_mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "total_sequence"]), type=int64)
        position_ids = ir.Value(name="position_ids", shape=ir.Shape(["batch", "sequence"]), type=int64)
        graph.inputs.extend([input_ids, attention_mask, position_ids])
        cache_shape = ir.Shape(["batch", io.num_key_value_heads, "past_sequence", io.head_dim])
        past = [ir.Value(name=name, shape=cache_shape, type=act_type) for name in io.past_names]
        graph.inputs.extend(past)

        seqlens_k, total_length = self.sequence_lengths(attention_mask)
        cos, sin = self.rotary_caches()
        hidden = self.embeddings(input_ids)
        residual = hidden
        normed = self.rms_norm(hidden, "model.layers.0.input_layernorm", "/model/layers.0/input_layernorm")
        presents: list[ir.Value] = []
        for index in range(io.num_layers):
            prefix = f"model.layers.{index}"
            attention, key, value = self.attention(
                index, normed, past[2 * index : 2 * index + 2], seqlens_k, total_length, cos, sin, position_ids
            )
            presents += [key, value]
            normed, residual = self.skip_norm(attention, residual, f"{prefix}.post_attention_layernorm", f"/{prefix}/post_attention_layernorm")
            mlp = self.mlp(prefix, normed)
            last = index == io.num_layers - 1
            gamma = "model.norm" if last else f"model.layers.{index + 1}.input_layernorm"
            normed, residual = self.skip_norm(mlp, residual, gamma, f"/{gamma}" if last else f"/model/layers.{index + 1}/input_layernorm")
            residual.name = block_output_name(index)
        logits = self.lm_head(normed)
        logits.name, logits.shape = "logits", ir.Shape(["batch", "sequence", config.vocab_size])
        for value, name in zip(presents, io.present_names):
            value.name, value.shape = name, ir.Shape(["batch", io.num_key_value_heads, "total_sequence", io.head_dim])
        graph.outputs.extend([logits, *presents])
        return ir.Model(graph, ir_version=10, producer_name="hqexport")

    def sequence_lengths(self, attention_mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        """GroupQueryAttention's seqlens_k (attended tokens - 1, int32 [batch]) and total length (int32 scalar)."""
        name = "/model/attn_mask_reformat"
        axis = self.constant("one_axis", np.array([1], np.int64))
        summed = self.op("ReduceSum", [attention_mask, axis], keepdims=0, dtype=ir.DataType.INT64, name=f"{name}/ReduceSum")
        minus_one = self.op("Sub", [summed, self.constant("one_int64", np.array(1, np.int64))], dtype=ir.DataType.INT64, name=f"{name}/Sub")
        seqlens_k = self.op("Cast", [minus_one], to=ir.DataType.INT32, name=f"{name}/Cast_seqlens")
        total = self.op("Shape", [attention_mask], start=1, end=2, dtype=ir.DataType.INT64, name=f"{name}/Shape")
        total = self.op("Squeeze", [total], dtype=ir.DataType.INT64, name=f"{name}/Squeeze")
        return seqlens_k, self.op("Cast", [total], to=ir.DataType.INT32, name=f"{name}/Cast_total")

    def rotary_caches(self) -> tuple[ir.Value, ir.Value]:
        """cos and sin [max_positions, head_dim / 2] from transformers' own rotary module (so every rope type it computes statically matches)."""
        cos, sin = rotary_tables(self.config)
        return self.constant("cos_cache", cos.astype(self.act)), self.constant("sin_cache", sin.astype(self.act))

    def embeddings(self, input_ids: ir.Value) -> ir.Value:
        hidden = self.table_rows("model.embed_tokens.weight", input_ids, "/model/embed_tokens")
        if self.arch.scale_embeddings:  # Gemma: in the activation dtype, as transformers rounds it
            scale = self.constant("/model/embed_tokens/scale", np.array(embedding_scale(self.config), self.act))
            hidden = self.op("Mul", [hidden, scale], name="/model/embed_tokens/Mul")
        return hidden

    def norm_weight(self, module: str) -> ir.Value:
        return self.fp_tensor(f"{module}.weight", offset=self.arch.norm_offset)

    def rms_norm(self, x: ir.Value, module: str, name: str, *, eps: float | None = None) -> ir.Value:
        """RMSNorm in plain ops, computed in fp32 like transformers (where no Skip norm can fuse it)."""
        eps = self.eps if eps is None else eps
        x32 = self.op("Cast", [x], to=ir.DataType.FLOAT, name=f"{name}/Cast") if self.act != np.float32 else x
        f32 = ir.DataType.FLOAT
        square = self.op("Mul", [x32, x32], dtype=f32, name=f"{name}/Square")
        axes = self.constant(f"{name}/axes", np.array([-1], np.int64))
        mean = self.op("ReduceMean", [square, axes], keepdims=1, dtype=f32, name=f"{name}/ReduceMean")
        shifted = self.op("Add", [mean, self.constant(f"{name}/epsilon", np.array(eps, np.float32))], dtype=f32, name=f"{name}/Add")
        root = self.op("Sqrt", [shifted], dtype=f32, name=f"{name}/Sqrt")
        normed = self.op("Mul", [x32, self.op("Reciprocal", [root], dtype=f32, name=f"{name}/Reciprocal")], dtype=f32, name=f"{name}/Mul")
        if self.act != np.float32:
            normed = self.op("Cast", [normed], to=ir.DataType.from_numpy(self.act), name=f"{name}/Cast_back")
        return self.op("Mul", [normed, self.norm_weight(module)], name=f"{name}/Mul_weight")

    def skip_norm(self, x: ir.Value, skip: ir.Value, module: str, name: str) -> tuple[ir.Value, ir.Value]:
        """(RMSNorm(x + skip), x + skip) in one com.microsoft node."""
        normed, mean, inverse_std, summed = self.op(
            "SkipSimplifiedLayerNormalization", [x, skip, self.norm_weight(module)],
            domain=MS_DOMAIN, outputs=4, epsilon=self.eps, name=f"{name}/SkipLayerNorm",
        )
        mean.type = inverse_std.type = ir.TensorType(ir.DataType.FLOAT)
        return normed, summed

    def attention(
        self, index: int, x: ir.Value, past: Sequence[ir.Value], seqlens_k: ir.Value, total_length: ir.Value,
        cos: ir.Value, sin: ir.Value, position_ids: ir.Value,
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(attention output after o_proj, present key, present value) of layer `index`; past is (key, value)."""
        prefix = f"model.layers.{index}"
        config, io = self.config, self.io
        q_size, kv_size = config.num_attention_heads * io.head_dim, io.num_key_value_heads * io.head_dim
        sizes = [q_size, kv_size, kv_size]
        projections = self.linears(prefix, self.arch.attention, x, "self_attn.qkv_proj", sizes, parts=self.arch.qk_norm)
        if self.arch.qk_norm:  # q, k and v each (no qk-norm family stores them packed)
            q, k, v = projections
            q = self.head_norm(q, f"{prefix}.self_attn.q_norm", config.num_attention_heads)
            k = self.head_norm(k, f"{prefix}.self_attn.k_norm", io.num_key_value_heads)
            projections = [q, k, v]
        query, key, value = (projections + [None, None])[:3] if len(projections) == 1 else projections
        window = sliding_window(config, index)
        output, present_key, present_value = self.op(
            "GroupQueryAttention",
            [query, key, value, *past, seqlens_k, total_length, cos, sin, position_ids],
            domain=MS_DOMAIN, outputs=3, name=f"/{prefix}/self_attn/GroupQueryAttention",
            num_heads=config.num_attention_heads, kv_num_heads=io.num_key_value_heads, do_rotary=1,
            rotary_interleaved=0, scale=float(io.head_dim ** -0.5), local_window_size=window if window else -1,
        )
        return self.linear(f"{prefix}.{self.arch.attention_out}", output), present_key, present_value

    def head_norm(self, x: ir.Value, module: str, heads: int) -> ir.Value:
        """Qwen3's RMSNorm over each head of q or k: [.., heads * head_dim] -> per head -> back."""
        name = f"/{module.replace('.', '/')}"
        heads_shape = self.constant(f"{name}/heads_shape", np.array([0, 0, heads, self.io.head_dim], np.int64))
        per_head = self.op("Reshape", [x, heads_shape], name=f"{name}/Reshape")
        normed = self.rms_norm(per_head, module, name)
        merged_shape = self.constant(f"{name}/merged_shape", np.array([0, 0, heads * self.io.head_dim], np.int64))
        return self.op("Reshape", [normed, merged_shape], name=f"{name}/Reshape_back")

    def mlp(self, prefix: str, x: ir.Value) -> ir.Value:
        intermediate = self.config.intermediate_size
        parts = self.linears(prefix, self.arch.mlp_in, x, "mlp.gate_up_proj", [intermediate, intermediate], parts=True)
        gate, up = parts if len(parts) == 2 else self.split(parts[0], [intermediate, intermediate], f"/{prefix}/mlp/gate_up_proj/Split")
        name = f"/{prefix}/mlp/act"
        if self.arch.activation == "silu":
            activated = self.op("Mul", [gate, self.op("Sigmoid", [gate], name=f"{name}/Sigmoid")], name=f"{name}/Mul")
        else:
            activated = self.op("FastGelu", [gate], domain=MS_DOMAIN, name=f"{name}/FastGelu")
        return self.linear(f"{prefix}.{self.arch.mlp_out}", self.op("Mul", [activated, up], name=f"/{prefix}/mlp/Mul"))

    def split(self, x: ir.Value, sizes: list[int], name: str) -> list[ir.Value]:
        return list(self.op("Split", [x, self.constant(f"{name}/sizes", np.array(sizes, np.int64))], axis=-1, outputs=len(sizes), name=name))

    def table_rows(self, key: str, ids: ir.Value, name: str) -> ir.Value:
        """Rows `ids` of the fp table `key` in the activation dtype, read from the form the table is stored in: the
        fp head's exact int8 grid or half dtype where it has one, else the fp tensor; all the same values."""
        if key == self.head_table and self.grid is not None:
            codes, scales, zero_points = self.grid_tensors()
            return self.op("GatherBlockQuantized", [codes, ids, scales, zero_points], domain=MS_DOMAIN,
                           name=f"{name}/GatherBlockQuantized", bits=8, block_size=self.grid.fmt.group_size,
                           quantize_axis=1, gather_axis=0)
        if key == self.head_table and self.half_head is not None:
            table = self.half_table(key)
            rows = self.op("Gather", [table, ids], name=f"{name}/Gather", dtype=table.dtype)
            return self.op("Cast", [rows], name=f"{name}/Cast", to=ir.DataType.from_numpy(self.act))
        return self.op("Gather", [self.fp_tensor(key), ids], name=f"{name}/Gather")

    def half_table(self, key: str) -> ir.Value:
        """The fp tensor `key` stored in the half head's dtype, which holds its values exactly."""
        tensor = self.qmodel.tensors[key]
        return self.weight(key, self.half_head, tuple(tensor.shape), lambda: tensor_to_numpy(tensor).astype(self.half_head))

    def grid_tensors(self) -> list[ir.Value]:
        """The int8 grid as GatherBlockQuantized reads it: codes [vocab, hidden], scales and zero points
        [vocab, hidden / block]."""
        names = [f"{self.head_table}.grid_{part}" for part in ("codes", "scales", "zero_points")]
        grid = self.grid
        vocab, hidden = grid.shape
        blocks = (vocab, hidden // grid.fmt.group_size)
        return [
            self.weight(names[0], np.dtype(np.uint8), (vocab, hidden), lambda: grid.packed.reshape(vocab, hidden).numpy()),
            self.weight(names[1], self.act, blocks, lambda: tensor_to_numpy(grid.scale).reshape(blocks).astype(self.act)),
            self.weight(names[2], np.dtype(np.uint8), blocks, lambda: tensor_to_numpy(grid.zero).reshape(blocks).astype(np.uint8)),
        ]

    def lm_head(self, x: ir.Value) -> ir.Value:
        if self.shortlist:
            return self.rescored(self.linear("lm_head", x), x)
        if self.half_head is not None:
            table = self.half_table(self.head_table)
            vocab, hidden = table.shape
            return self.op(HALF_OP_TYPE, [x, table], domain=DOMAIN, name="/lm_head/HalfMatMul", N=vocab, K=hidden)
        if not self.config.tie_word_embeddings or "lm_head" in self.quantized:
            return self.linear("lm_head", x)
        table = self.graph.initializers["model.embed_tokens.weight"]  # tied: the embedding read as [hidden, vocab]
        transposed = self.op("Transpose", [table], perm=[1, 0], name="/lm_head/Transpose")
        return self.op("MatMul", [x, transposed], name="/lm_head/MatMul")

    def rescored(self, logits: ir.Value, x: ir.Value) -> ir.Value:
        """`logits` with the shortlist's entries (its largest per position) recomputed as fp head row . x: one
        hqexport.GridShortlist node where the rows are the exact int8 grid, else stock ops."""
        name = "/lm_head/shortlist"
        k = min(self.shortlist, self.config.vocab_size)
        if self.grid is not None:
            return self.op(SHORTLIST_OP_TYPE, [logits, x, *self.grid_tensors()], domain=DOMAIN, name=f"{name}/GridShortlist",
                           k=k, block_size=self.grid.fmt.group_size)
        count = self.constant(f"{name}/k", np.array([k], np.int64))
        _, tokens = self.op("TopK", [logits, count], axis=-1, outputs=2, name=f"{name}/TopK")
        tokens.type = ir.TensorType(ir.DataType.INT64)
        last = self.constant(f"{name}/last_axis", np.array([-1], np.int64))
        gathered = self.table_rows(self.head_table, tokens, name)  # [batch, sequence, k, hidden]
        column = self.op("Unsqueeze", [x, last], name=f"{name}/Unsqueeze")  # [batch, sequence, hidden, 1]
        exact = self.op("Squeeze", [self.op("MatMul", [gathered, column], name=f"{name}/MatMul"), last], name=f"{name}/Squeeze")
        return self.op("ScatterElements", [logits, tokens, exact], axis=-1, name=f"{name}/ScatterElements")

    # ------------------------------------------------------------ linears

    def linears(
        self, prefix: str, modules: Sequence[str], x: ir.Value, packed_module: str, sizes: list[int], *, parts: bool = False
    ) -> list[ir.Value]:
        """The outputs of `modules` reading x: one packed node when they can share one, else one node each.

        A single module (Phi-3's qkv_proj) returns one output. Packed modules return [packed output], or, with
        `parts` or when one of them needs an output of its own, the packed output split into each module's.
        """
        paths = [f"{prefix}.{module}" for module in modules]
        layers = [self.quantized.get(path) for path in paths]
        if len(paths) == 1 or not _packable(layers):
            return [self.linear(path, x) for path in paths]
        packed = self.packed_linear(f"{prefix}.{packed_module}", paths, x)
        if not parts and not self.own_outputs.intersection(paths):
            return [packed]
        outputs = self.split(packed, sizes, f"/{prefix}/{packed_module.replace('.', '/')}/Split")
        for path, output in zip(paths, outputs):
            self.layers[path] = dataclasses.replace(self.layers[path], output=output.name)
        return outputs

    def linear(self, path: str, x: ir.Value) -> ir.Value:
        if path in self.quantized:
            return self.packed_linear(path, [path], x)
        weight = self.qmodel.tensors[f"{path}.weight"]  # an fp linear (config.check_weights)
        transposed = self.weight(f"{path}.weight.transposed", self.act, tuple(reversed(weight.shape)),
                                 lambda weight=weight: np.ascontiguousarray(tensor_to_numpy(weight).astype(self.act).T))
        y = self.op("MatMul", [x, transposed], name=f"/{path}/MatMul")
        if f"{path}.bias" in self.qmodel.tensors:
            y = self.op("Add", [y, self.fp_tensor(f"{path}.bias")], name=f"/{path}/Add")
        return y

    def packed_linear(self, name: str, paths: Sequence[str], x: ir.Value) -> ir.Value:
        """One hqexport.HQQMatMul computing the layers `paths` (concatenated along N) from x."""
        layers = [self.quantized[path] for path in paths]
        inputs = packed_inputs(layers, self.act)
        values = {
            key: self.weight(f"{name}.{_SUFFIXES[key]}", spec.dtype, spec.shape, spec.load) for key, spec in inputs.tensors.items()
        }
        node = node_name(name)
        operands = [x, values["weight"], values["scale"], values["zero"], values.get("bias")]
        y = self.op(OP_TYPE, operands, domain=DOMAIN, name=node, **inputs.attributes)
        initializers = {key: (values[key].name if key in values else None) for key in _SUFFIXES}
        start = 0
        for path, layer in zip(paths, layers):
            rows = (start, start + layer.out_features) if len(paths) > 1 else None
            self.layers[path] = LayerNode(node, initializers, layer.shape, name, rows=rows)
            start += layer.out_features
        return y


#: op input -> initializer name suffix ("<module path>.<suffix>")
_SUFFIXES = {"weight": "weight_packed", "scale": "scale", "zero": "zero", "bias": "bias"}


def _packable(layers: Sequence[QuantizedLinear | None]) -> bool:
    """Quantized, one format and compute dtype, groups along K (axis 1): the concatenation along N is exact."""
    if any(layer is None for layer in layers):
        return False
    first = layers[0]
    def key(layer: QuantizedLinear) -> tuple:
        return (layer.fmt, layer.compute_dtype, layer.in_features)

    return first.fmt.axis == 1 and all(key(layer) == key(first) for layer in layers)


def rotary_tables(config: transformers.PretrainedConfig) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [max_position_embeddings, head_dim / 2], float32, as the model's rotary module computes them."""
    rotary = rotary_class(config)(config=config)
    positions = torch.arange(int(config.max_position_embeddings), dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros((), dtype=torch.float32), positions)
    half = head_dim(config) // 2
    if cos.shape[-1] != 2 * half:
        raise UnsupportedModelError(f"{config.model_type}: a rotary embedding over {cos.shape[-1]} of {2 * half} head dimensions is not supported")
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()
